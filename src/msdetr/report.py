"""The report of a Hydra multirun sweep: python -m msdetr.report <sweep dir> [--out DIR] [--metric
    val/AP]

Reads every job directory of the sweep (`<sweep dir>/<job>/` with `.hydra/overrides.yaml`), its CSV
metrics (`csv/version_0/metrics.csv`) and the `run_summary.json` that `msdetr.run.train` writes
when a run ends, and writes into `<sweep dir>/report/` (or --out):

- `report.md` and `report.csv`: one row per job: the overrides that differ between jobs, status, the
  final validation AP/AP50/AP75/APs/APm/APl/AR100, epochs, wall time, training images/s (the median
  of the `throughput` callback's windows) and peak memory (CUDA max allocated; CPU peak resident
  set);
- `train_loss.png` (training loss per step) and `val_AP.png` (the --metric per epoch), one line
  per job, labelled by the overrides that differ between jobs;
- when the jobs logged to W&B, the same table as a `wandb.Table` (and the figures) in a new W&B run
  of the sweep's group (WANDB_MODE=offline works).

A job that failed, is still running or logged nothing is a row with its status and blank cells.
`report=true` on a `python train.py -m ...` sweep writes the report when the sweep ends
(`SweepReport`, a Hydra callback configured in conf/train.yaml).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# msdetr.run.summary.RUN_SUMMARY (not imported: it loads Lightning)
SUMMARY_FILE = "run_summary.json"
FINAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
WANDB_GROUP_MAX = 128
# The table's columns as written to report.csv and the wandb.Table (values as logged: AP in [0, 1]).
COLUMNS = (
    "job",
    "overrides",
    "status",
    *FINAL_METRICS,
    "epochs",
    "wall_time_s",
    "images_per_s",
    "peak_mem_gib",
    "all_overrides",
)
STATUS_NOTES = {
    "completed": "the run ended normally",
    "interrupted": "the run was stopped (Ctrl-C) and ended early",
    "stopped": "the run was stopped by a signal (preemption) with its state saved; rerunning it "
    "resumes",
    "diverged": "training stopped on steps that were not finite "
    "(see max_consecutive_skipped_steps)",
    "failed": "the run stopped on an error before its schedule ended",
    "no summary": f"no {SUMMARY_FILE}: the job failed, was stopped, is still running, or predates "
    "the summary",
    "no metrics": "nothing logged: the job failed before its first logged step",
}


class NotASweepError(ValueError):
    """The directory given is not a Hydra multirun directory."""


@dataclass
class Job:
    name: str
    path: Path
    overrides: list[str]
    status: str
    # FINAL_METRICS name -> value of the last validation
    final: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    wall_time_s: float | None = None
    images_per_s: float | None = None
    peak_mem_gib: float | None = None
    rows: list[dict[str, float]] = field(default_factory=list)  # metrics.csv, numeric cells only
    wandb: dict | None = None  # {"project", "entity", "group"} when the job logged to W&B
    label: str = ""

    def series(self, name: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) of every logged row that has both, in logging order."""
        return [(row[x], row[name]) for row in self.rows if name in row and x in row]


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job directories of a Hydra multirun directory (numbered ones in numeric order)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotASweepError(
            f"'{sweep_dir}' is not a directory; give the directory of a multirun sweep "
            "(python train.py -m ... writes multirun/<date>/<time>/ unless hydra.sweep.dir is set)."
        )
    jobs = [
        p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()
    ]
    if not jobs:
        single = (sweep_dir / ".hydra" / "overrides.yaml").is_file()
        raise NotASweepError(
            f"'{sweep_dir}' is {'a single run' if single else 'not a Hydra multirun directory'}: "
            "the report needs a sweep's directory, whose job directories (0/, 1/, ...) hold "
            ".hydra/overrides.yaml (python train.py -m ... writes multirun/<date>/<time>/ unless "
            "hydra.sweep.dir is set)."
        )
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _read_yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception:
        return None


def read_metrics(job_dir: Path) -> list[dict[str, float]]:
    """The rows of the job's CSVLogger file (the highest csv/version_*), each with its numeric
    cells."""
    files = sorted(
        (job_dir / "csv").glob("version_*/metrics.csv"),
        key=lambda p: (
            int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1
        ),
    )
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if not math.isnan(number):
                    row[key] = number
            rows.append(row)
    return rows


def _wandb_of(job_dir: Path, config, summary: dict) -> dict | None:
    """Where the job logged to W&B ({"project", "entity", "group"}), or None when it did not."""
    from omegaconf import OmegaConf

    node = None
    if config is not None:
        try:
            node = OmegaConf.select(config, "logger.wandb", throw_on_resolution_failure=False)
        except Exception:
            node = None
    if node is None and not (job_dir / "wandb").is_dir():
        return None

    def value(key: str):
        try:
            found = (
                OmegaConf.select(node, key, throw_on_resolution_failure=False)
                if node is not None
                else None
            )
        except Exception:
            found = None
        return found if isinstance(found, str) and found else None

    return {
        "project": value("project") or "msdetr",
        "entity": value("entity"),
        "group": summary.get("wandb_group") or value("group"),
    }


def read_job(job_dir: str | Path) -> Job:
    """One job directory of a sweep: its overrides, status, final metrics, costs and curves."""
    job_dir = Path(job_dir)
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if overrides is not None else []
    try:
        summary = json.loads((job_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = None
    rows = read_metrics(job_dir)
    status = (
        str(summary.get("status", "completed"))
        if summary
        else "no summary"
        if rows
        else "no metrics"
    )
    job = Job(job_dir.name, job_dir, overrides, status, rows=rows)
    summary = summary or {}

    validations = [row for row in rows if any(f"val/{m}" in row for m in FINAL_METRICS)]
    logged = validations[-1] if validations else {}
    job.final = {m: logged[f"val/{m}"] for m in FINAL_METRICS if f"val/{m}" in logged}
    for m, v in (summary.get("metrics") or {}).items():  # runs without a CSV logger
        if m in FINAL_METRICS and m not in job.final and v is not None:
            job.final[m] = float(v)

    epochs = [row["epoch"] for row in rows if "epoch" in row]
    job.epochs = (
        summary["epochs"]
        if summary.get("epochs") is not None
        else int(max(epochs)) + 1
        if epochs
        else None
    )
    job.wall_time_s = summary.get("wall_time_s")
    if job.wall_time_s is None and rows:
        # No summary: from the job's start (Hydra writes .hydra/ first) to its last logged row.
        started = job_dir / ".hydra" / "config.yaml"
        metrics_file = max(
            (job_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime
        )
        if started.is_file():
            job.wall_time_s = max(0.0, metrics_file.stat().st_mtime - started.stat().st_mtime)
    speeds = [v for _, v in job.series("perf/images_per_sec")]
    job.images_per_s = statistics.median(speeds) if speeds else None
    peaks = [v for _, v in job.series("perf/peak_mem_gib")]
    job.peak_mem_gib = max(peaks) if peaks else None
    job.wandb = _wandb_of(job_dir, _read_yaml(job_dir / ".hydra" / "config.yaml"), summary)
    return job


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def common_overrides(jobs: list[Job]) -> list[str]:
    """The overrides every job has, with the same value."""
    if not jobs:
        return []
    shared = set(jobs[0].overrides).intersection(*(j.overrides for j in jobs[1:]))
    return [o for o in jobs[0].overrides if o in shared]


def label_jobs(jobs: list[Job]) -> None:
    """Set each job's label to the overrides that differ between the jobs (a key some jobs lack
    counts as differing), in the order they first appear; jobs with nothing to tell them apart are
    labelled by their directory."""
    values: dict[str, list[str | None]] = {}
    for job in jobs:
        for key, _ in map(_split, job.overrides):
            values.setdefault(key, [])
    for job in jobs:
        mine = dict(map(_split, job.overrides))
        for key in values:
            values[key].append(mine.get(key))
    differing = [k for k, v in values.items() if len(set(v)) > 1]
    for job in jobs:
        mine = dict(map(_split, job.overrides))
        job.label = ", ".join(f"{k}={mine[k]}" for k in differing if k in mine) or f"job {job.name}"
    labels = [j.label for j in jobs]
    for job in jobs:
        if labels.count(job.label) > 1:
            job.label = f"{job.label} (job {job.name})"


def table(jobs: list[Job]) -> list[dict]:
    """One row per job, keyed by COLUMNS; None where a value is missing."""
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.name, "overrides": job.label, "status": job.status}
        row.update({m: job.final.get(m) for m in FINAL_METRICS})
        row.update(
            epochs=job.epochs,
            wall_time_s=job.wall_time_s,
            images_per_s=job.images_per_s,
            peak_mem_gib=job.peak_mem_gib,
            all_overrides=" ".join(job.overrides),
        )
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: "" if v is None else round(v, 6) if isinstance(v, float) else v
                    for k, v in row.items()
                }
            )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (
        f"{hours}h {minutes:02d}m"
        if hours
        else f"{minutes}m {secs:02d}s"
        if minutes
        else f"{secs} s"
    )


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def markdown(
    jobs: list[Job], rows: list[dict], sweep_dir: Path, figures: list[Path], metric: str
) -> str:
    """The report as Markdown: the table (AP and AR in %, the best of each column in bold), the
    overrides common to every job, what the statuses mean and the figures."""
    # the best of a column among the jobs that completed, in bold where their values differ: a job
    # that failed, diverged or did not finish is never the best
    best = {
        m: max(vs) if len(set(vs)) > 1 else None
        for m in FINAL_METRICS
        for vs in [[r[m] for r in rows if r[m] is not None and r["status"] == "completed"]]
    }
    header = [
        "job",
        "overrides",
        "status",
        *FINAL_METRICS,
        "epochs",
        "wall time",
        "images/s",
        "peak mem (GiB)",
    ]
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(jobs)} jobs; AP and AR in % (report.csv has them as logged, in [0, 1]); "
        "the best of each metric among the completed jobs in bold.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for row in rows:
        cells = [row["job"], _cell(row["overrides"]), row["status"]]
        for m in FINAL_METRICS:
            v = row[m]
            text = "" if v is None else f"{100 * v:.1f}"
            cells.append(
                f"**{text}**"
                if v is not None and v == best[m] and row["status"] == "completed"
                else text
            )
        cells += [
            "" if row["epochs"] is None else str(row["epochs"]),
            _duration(row["wall_time_s"]),
            "" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}",
            "" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    common = common_overrides(jobs)
    lines += [
        "",
        "Overrides common to every job: "
        + (" ".join(f"`{o}`" for o in common) if common else "none")
        + ".",
    ]
    statuses = sorted({j.status for j in jobs})
    lines += [
        "",
        "Status: " + "; ".join(f"*{s}*: {STATUS_NOTES.get(s, s)}" for s in statuses) + ".",
    ]
    lines += [
        "",
        "Images/s: the median of the `throughput` callback's windows (`perf/images_per_sec`); "
        "peak memory: `perf/peak_mem_gib` (CUDA max allocated on a GPU, the process's peak "
        "resident set on CPU); wall time: "
        f"`{SUMMARY_FILE}` (start of training to its end).",
    ]
    for figure in figures:
        lines += ["", f"![{figure.stem}]({figure.name})"]
    return "\n".join(lines) + "\n"


# -- figures ------------------------------------------------------------------------------------

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(i: int) -> dict:
    """Ten colours, then the same ten dashed, dash-dotted, dotted: 40 jobs stay distinguishable."""
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


def _figure(n_jobs: int):
    from matplotlib.figure import Figure

    # tall enough for the legend beside it
    fig = Figure(figsize=(8, max(4.5, 0.17 * n_jobs)), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def _finish(fig, ax, drawn: int, empty_note: str, path: Path) -> Path:
    if drawn:
        ncol = 1 if drawn <= 20 else 2
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=8,
            ncol=ncol,
            frameon=False,
            title="job",
            title_fontsize=8,
        )
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(left=0)  # steps and epochs from 0: a one-epoch sweep still has integer ticks
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_loss(jobs: list[Job], path: Path, title: str) -> Path:
    """Training loss per optimizer step, one line per job (a running mean once a job has 50+
    points)."""
    fig, ax = _figure(len(jobs))
    drawn, smoothed = 0, 1
    for i, job in enumerate(jobs):
        points = job.series("train/loss")
        if not points:
            continue
        steps, losses = zip(*points)
        window = max(1, len(losses) // 25) if len(losses) >= 50 else 1
        smoothed = max(smoothed, window)
        ax.plot(
            steps,
            _running_mean(list(losses), window),
            label=job.label,
            linewidth=1.3,
            marker="o" if len(points) == 1 else None,
            **_style(i),
        )
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(
        "train/loss" + (f" (running mean, up to {smoothed} logged steps)" if smoothed > 1 else "")
    )
    ax.set_title(f"Training loss: {title}")
    return _finish(
        fig,
        ax,
        drawn,
        "no train/loss logged by any job\n(trainer.log_every_n_steps more than the steps run?)",
        path,
    )


def plot_metric(jobs: list[Job], metric: str, path: Path, title: str) -> Path:
    """`metric` at each validation (x: epochs trained), one line per job; AP / AR in %."""
    percent = bool(re.fullmatch(r"val/A[PR]\w*", metric))
    fig, ax = _figure(len(jobs))
    drawn = 0
    for i, job in enumerate(jobs):
        points = job.series(metric, x="epoch")
        if not points:
            continue
        epochs = [e + 1 for e, _ in points]
        values = [100 * v if percent else v for _, v in points]
        ax.plot(
            epochs,
            values,
            label=job.label,
            linewidth=1.5,
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=4,
            clip_on=False,
            **_style(i),
        )  # a point on the axes' edge (epoch 1, AP 0) stays whole
        drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    ax.set_title(f"Validation {metric}: {title}")
    if percent:
        ax.set_ylim(bottom=0)
    return _finish(
        fig,
        ax,
        drawn,
        f"no {metric} logged by any job\n(no validation ran: "
        "trainer.check_val_every_n_epoch <= schedule.epochs?)",
        path,
    )


# -- W&B ----------------------------------------------------------------------------------------


def log_to_wandb(
    jobs: list[Job],
    rows: list[dict],
    figures: list[Path],
    out: Path,
    sweep_dir: Path,
    metric: str,
    group: str | None = None,
) -> str | None:
    """The table (and figures) in a new W&B run of the sweep's group, when the jobs logged to W&B;
    the run's directory, or None (no job used W&B, or wandb is not installed)."""
    logged = [j.wandb for j in jobs if j.wandb]
    if not logged:
        return None
    try:
        import wandb
    except ImportError:
        print(
            "msdetr.report: the jobs logged to W&B but the wandb package is missing here, so the "
            "W&B table is left out; pip install 'msdetr[wandb]' to add it.",
            file=sys.stderr,
        )
        return None
    where = logged[0]
    group = (
        group
        or next((w["group"] for w in logged if w["group"]), None)
        or str(sweep_dir)[-WANDB_GROUP_MAX:]
    )
    if wandb.run is not None:  # a sweep job's run left open would otherwise receive the report
        wandb.finish()
    run = wandb.init(
        project=where["project"],
        entity=where["entity"],
        group=group,
        name="sweep-report",
        job_type="sweep-report",
        dir=str(out),
        config={"sweep_dir": str(sweep_dir), "metric": metric, "jobs": len(jobs)},
    )
    try:
        data = [[row[c] for c in COLUMNS] for row in rows]
        payload: dict[str, Any] = {
            "sweep_report": wandb.Table(columns=list(COLUMNS), data=data, allow_mixed_types=True)
        }
        payload.update({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()


# -- the report ---------------------------------------------------------------------------------


def write_report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    metric: str = "val/AP",
    wandb_group: str | None = None,
    use_wandb: bool = True,
) -> dict[str, Path | str | None]:
    """Write the sweep's report (see the module's docstring) into `out` (default `<sweep
    dir>/report`); the paths written, by kind. Raises NotASweepError (one sentence) for a directory
    without jobs."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(p) for p in find_jobs(sweep_dir)]
    label_jobs(jobs)
    out = Path(out) if out is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = table(jobs)
    title = "/".join(sweep_dir.resolve().parts[-2:])
    figures = [
        plot_loss(jobs, out / "train_loss.png", title),
        plot_metric(jobs, metric, out / f"{metric.replace('/', '_')}.png", title),
    ]
    write_csv(rows, out / "report.csv")
    (out / "report.md").write_text(markdown(jobs, rows, sweep_dir, figures, metric))
    written: dict[str, Path | str | None] = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "loss_figure": figures[0],
        "metric_figure": figures[1],
        "wandb": None,
    }
    if use_wandb:
        try:
            written["wandb"] = log_to_wandb(
                jobs, rows, figures, out, sweep_dir, metric, wandb_group
            )
        except Exception as err:  # not logged in, no network: the files above stand
            print(
                f"msdetr.report: the W&B table was not logged ({type(err).__name__}: {err}); the "
                f"report's files are in {out}.",
                file=sys.stderr,
            )
    return written


class SweepReport(Callback):
    """Hydra callback: writes the report of a multirun sweep when it ends (conf/train.yaml,
    `report=true`). With `enabled` false (the default `report: false`) it does nothing."""

    def __init__(self, enabled: bool = True, out: str | None = None, metric: str | None = None):
        self.enabled = bool(enabled)
        self.out = out
        self.metric = metric

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.enabled:
            return
        from omegaconf import OmegaConf

        sweep = str(config.hydra.sweep.dir)
        metric = self.metric or config.get("optimized_metric") or "val/AP"
        # the group the jobs' W&B runs got (msdetr.lit.loggers.wandb_group), when they used W&B
        try:
            group = (
                OmegaConf.select(config, "logger.wandb.group", default=None)
                or sweep[-WANDB_GROUP_MAX:]
            )
        except Exception:
            group = None
        written = write_report(sweep, self.out, metric=metric, wandb_group=group)
        print(
            f"sweep report: {written['markdown']} (table, "
            f"figures{', W&B run' if written['wandb'] else ''})",
            flush=True,
        )

    def on_run_end(self, config, **kwargs) -> None:
        if self.enabled:
            print(
                "report=true: a single run has no sweep to report; it acts at the end of a "
                "multirun (python train.py -m ...).",
                file=sys.stderr,
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msdetr.report",
        description=(
            "Table (Markdown, CSV), figures and W&B table of a Hydra multirun sweep (python "
            "train.py -m ...)."
        ),
    )
    parser.add_argument(
        "sweep_dir", help="the sweep's directory (multirun/<date>/<time>, or hydra.sweep.dir)"
    )
    parser.add_argument("--out", default=None, help="where to write (default: <sweep_dir>/report)")
    parser.add_argument(
        "--metric",
        default="val/AP",
        help="the validation metric plotted per epoch (default val/AP)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    args = parser.parse_args(argv)
    try:
        written = write_report(
            args.sweep_dir, args.out, metric=args.metric, use_wandb=not args.no_wandb
        )
    except NotASweepError as err:
        print(f"msdetr.report: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        if path is not None:
            print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
