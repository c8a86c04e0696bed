"""The report's figures (matplotlib, no pyplot): training loss and a validation metric per
configuration, the mean over its completed jobs with a band; Optuna's parameter importances."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msdetr.report.grouping import Configuration
from msdetr.report.jobs import Job, is_percent

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


@dataclass
class Drawing:
    """A figure written: its path, the configurations drawn, and the usable jobs left out of
    their configuration's mean and band because their curve is shorter than the others'."""

    path: Path
    drawn: int
    shorter: list[tuple[Job, Configuration]] = field(default_factory=list)


def _style(i: int) -> dict:
    """Ten colours, then the same ten dashed, dash-dotted, dotted: 40 configurations stay
    distinguishable."""
    import matplotlib

    return {
        "color": matplotlib.colormaps["tab10"](i % 10),
        "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)],
    }


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _smoothing(points: int) -> int:
    """The running mean's window for a loss curve of `points` logged steps (1: none)."""
    return max(1, points // 25) if points >= 50 else 1


def _figure(n_lines: int):
    from matplotlib.figure import Figure

    # tall enough for the legend beside it
    fig = Figure(figsize=(8, max(4.5, 0.17 * n_lines)), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig, ax, drawing: Drawing, empty_note: str, path: Path) -> Drawing:
    """The legend (or `empty_note` when nothing was drawn), integer ticks from 0, the grid; the
    figure saved to `path`, which `drawing` records."""
    from matplotlib.ticker import MaxNLocator

    if drawing.drawn:
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=8,
            ncol=1 if drawing.drawn <= 20 else 2,
            frameon=False,
            title="configuration",
            title_fontsize=8,
        )
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xlim(left=0)  # steps and epochs from 0: a one-epoch sweep still has integer ticks
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    drawing.path = path
    return drawing


def _aligned(
    curves: list[tuple[Job, dict[float, float]]],
) -> tuple[list[float], np.ndarray, list[Job]]:
    """The x values of the longest curve, a (jobs, x) array of the curves that have them all, and
    the jobs whose curves lack some (a job that stopped early)."""
    reference = max((c for _, c in curves), key=len)
    xs = sorted(reference)
    full = [(job, c) for job, c in curves if all(x in c for x in xs)]
    short = [job for job, c in curves if not all(x in c for x in xs)]
    return xs, np.array([[c[x] for x in xs] for _, c in full], dtype=float), short


def _draw_bands(
    ax,
    configs: list[Configuration],
    curve: Callable[[Job], dict[float, float]],
    band: str,
    markers: bool,
) -> Drawing:
    """Per configuration, the mean of its usable jobs' curves and a translucent band (`band`: min
    to max, or ± 1 sample std); one colour (and marker) per configuration."""
    drawing = Drawing(Path(), 0)
    for i, config in enumerate(configs):
        curves = [(job, c) for job in config.usable for c in [curve(job)] if c]
        if not curves:
            continue
        xs, values, short = _aligned(curves)
        drawing.shorter += [(job, config) for job in short]
        mean = values.mean(axis=0)
        if band == "std" and len(values) >= 2:
            spread = values.std(axis=0, ddof=1)
            low, high = mean - spread, mean + spread
        else:
            low, high = values.min(axis=0), values.max(axis=0)
        style = _style(i)
        ax.plot(
            xs,
            mean,
            label=f"{config.label} (n={len(values)})",
            linewidth=1.5,
            marker=_MARKERS[i % len(_MARKERS)] if markers or len(xs) == 1 else None,
            markersize=4,
            clip_on=False,  # a point on the axes' edge (epoch 1, AP 0) stays whole
            **style,
        )
        if len(values) >= 2:
            if len(xs) == 1:  # one point: the band is a bar
                ax.vlines(xs, low, high, color=style["color"], alpha=0.35, linewidth=6)
            else:
                ax.fill_between(xs, low, high, color=style["color"], alpha=0.18, linewidth=0)
        drawing.drawn += 1
    return drawing


def plot_loss(
    configs: list[Configuration], path: Path, title: str, band: str = "minmax"
) -> Drawing:
    """Training loss per optimizer step: per configuration the mean over its completed jobs of
    each job's running mean (once a job has 50+ points), and the band over them."""
    fig, ax = _figure(len(configs))
    smoothed = 1

    def curve(job: Job) -> dict[float, float]:
        nonlocal smoothed
        points = job.series("train/loss")
        if not points:
            return {}
        steps, losses = zip(*points)
        window = _smoothing(len(losses))
        smoothed = max(smoothed, window)
        return dict(zip(steps, _running_mean(list(losses), window)))

    drawing = _draw_bands(ax, configs, curve, band, markers=False)
    ax.set_xlabel("step")
    ax.set_ylabel(
        "train/loss" + (f" (running mean, up to {smoothed} logged steps)" if smoothed > 1 else "")
    )
    ax.set_title(f"Training loss: {title}")
    return _finish(
        fig,
        ax,
        drawing,
        "no train/loss logged by a completed job\n"
        "(trainer.log_every_n_steps more than the steps run?)",
        path,
    )


def plot_metric(
    configs: list[Configuration], metric: str, path: Path, title: str, band: str = "minmax"
) -> Drawing:
    """`metric` at each validation (x: epochs trained): per configuration the mean over its
    completed jobs and the band over them; AP / AR in %."""
    percent = is_percent(metric)
    fig, ax = _figure(len(configs))

    def curve(job: Job) -> dict[float, float]:
        return {e + 1: 100 * v if percent else v for e, v in job.series(metric, x="epoch")}

    drawing = _draw_bands(ax, configs, curve, band, markers=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    ax.set_title(f"Validation {metric}: {title}")
    if percent:
        ax.set_ylim(bottom=0)
    return _finish(
        fig,
        ax,
        drawing,
        f"no {metric} logged by a completed job\n(no validation ran: "
        "trainer.check_val_every_n_epoch <= schedule.epochs?)",
        path,
    )


def plot_importance(importances: Mapping[str, float], path: Path, title: str) -> Path:
    """Optuna's parameter importances as horizontal bars, the largest on top."""
    names = list(importances)[::-1]
    fig, ax = _figure(0)
    fig.set_size_inches(6.5, max(2.0, 0.45 * len(names) + 1.0))
    ax.barh(names, [importances[n] for n in names], color=_style(0)["color"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(f"Parameter importance: {title}")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    return path
