"""The report as Markdown (report.md): the configurations, the comparison with the baseline, the
Optuna search, the figures and the jobs."""

from __future__ import annotations

from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

from msdetr.report.figures import Drawing
from msdetr.report.grouping import BANDS, Configuration, Options
from msdetr.report.jobs import (
    STATUS_NOTES,
    SUMMARY_FILE,
    USABLE,
    Job,
    common_overrides,
    is_percent,
    job_order,
)
from msdetr.report.optuna_search import OptunaSearch
from msdetr.report.stats import BOOTSTRAP_RESAMPLES, Difference

# Beyond this many configurations the figures' colours and bands get hard to tell apart.
READABLE_CONFIGURATIONS = 8


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(header: Sequence[str], left: Container[int]) -> list[str]:
    """A table's header and its rule: the columns at the indices `left` left-aligned (text), the
    others right-aligned (numbers)."""
    rule = "|".join("---" if i in left else "---:" for i in range(len(header)))
    return [_row(header), f"|{rule}|"]


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


def _costs(row: dict) -> list[str]:
    """The images/s and peak memory (GiB) cells of a job's or a configuration's row."""
    return [
        "" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}",
        "" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}",
    ]


def _metric_name(metric: str) -> str:
    return metric.replace("mask_", "mask ")


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _jobs_section(jobs: list[Job], rows: list[dict], metrics: Sequence[str]) -> list[str]:
    """The per-job table (AP and AR in %, the best of each column among the completed jobs in
    bold), the overrides common to every job and what the statuses mean."""
    # the best of a column among the jobs that completed, in bold where their values differ: a job
    # that failed, diverged or did not finish is never the best
    best = {
        m: max(vs) if len(set(vs)) > 1 else None
        for m in metrics
        for vs in [[r[m] for r in rows if r[m] is not None and r["status"] == USABLE]]
    }
    header = [
        "job",
        "overrides",
        "status",
        *map(_metric_name, metrics),
        "epochs",
        "wall time",
        "images/s",
        "peak mem (GiB)",
    ]
    lines = [
        "## Jobs",
        "",
        f"{len(jobs)} jobs; AP and AR in % (report.csv has them as logged, in [0, 1]); "
        "the best of each metric among the completed jobs in bold.",
        "",
        *_head(header, left=range(3)),
    ]
    for row in rows:
        cells = [row["job"], _cell(row["overrides"]), row["status"]]
        for m in metrics:
            v = row[m]
            text = _percent(v)
            cells.append(
                f"**{text}**"
                if v is not None and v == best[m] and row["status"] == USABLE
                else text
            )
        cells += [
            "" if row["epochs"] is None else str(row["epochs"]),
            _duration(row["wall_time_s"]),
            *_costs(row),
        ]
        lines.append(_row(cells))
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
    return lines


def _configurations_section(
    configs: list[Configuration],
    rows: list[dict],
    metrics: Sequence[str],
    options: Options,
    shorter: list[tuple[Job, Configuration]],
) -> list[str]:
    """The configurations' table (mean ± std over the seeds, n), the jobs left out and why."""
    if options.group_by:
        grouping = (
            f"jobs with the same {', '.join(f'`{k}`' for k in options.group_by)} are one "
            "configuration, their other overrides repetitions"
        )
    else:
        keys = " or ".join(f"`{k}`" for k in options.seed_keys) or "no key"
        grouping = f"jobs whose overrides differ only in {keys} are the seeds of one configuration"
    header = ["configuration", "n", *map(_metric_name, metrics), "images/s", "peak mem (GiB)"]
    lines = [
        "## Configurations",
        "",
        f"{len(configs)} configurations: {grouping}. Each metric: the mean ± the sample standard "
        "deviation (ddof=1) over the configuration's completed jobs, in % (configs.csv has them "
        "in [0, 1]); — where a single seed leaves no spread; n: the completed jobs used (a metric "
        "only some of them logged shows its own n).",
        "",
        *_head(header, left=range(1)),
    ]
    for row in rows:
        cells = [_cell(row["configuration"]), str(row["n"])]
        for m in metrics:
            mean, std, n = row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_n"]
            text = (
                ""
                if mean is None
                else f"{_percent(mean)} ± {'—' if std is None else _percent(std)}"
            )
            cells.append(f"{text} (n={n})" if mean is not None and n != row["n"] else text)
        cells += _costs(row)
        lines.append(_row(cells))
    excluded = [(job, config) for config in configs for job in config.excluded]
    if excluded:
        excluded.sort(key=lambda jc: job_order(jc[0].name))
        lines += [
            "",
            f"Left out of the means, comparisons and figures (only *{USABLE}* jobs count):",
            "",
            "| job | configuration | status |",
            "|---|---|---|",
        ]
        lines += [f"| {j.name} | {_cell(c.label)} | {j.status} |" for j, c in excluded]
    if shorter:
        names = ", ".join(f"{j.name} ({c.label})" for j, c in shorter)
        lines += [
            "",
            f"Left out of the figures' means and bands, their curves being shorter than the "
            f"rest of their configuration's: job {names}.",
        ]
    if len(configs) > READABLE_CONFIGURATIONS:
        lines += [
            "",
            f"{len(configs)} configurations: the figures are hard to read beyond "
            f"{READABLE_CONFIGURATIONS} (colours repeat after 10, then dashed); "
            f"{options.name('group_by')} or a smaller sweep gives a clearer picture.",
        ]
    return lines


def _comparison_section(
    configs: list[Configuration],
    baseline: Configuration | None,
    differences: dict[tuple[int, str], Difference],
    metrics: Sequence[str],
    options: Options,
) -> list[str]:
    """Each configuration's difference from the baseline with its bootstrap interval, or how to
    ask for one."""
    if baseline is None:
        if len(configs) < 2:
            return []
        # an example from the labels, never a default: the baseline is always named
        example = next((c.label.split(", ")[0] for c in configs if "=" in c.label), "KEY=VALUE")
        return [
            "## Comparison",
            "",
            f"No baseline given: {options.name('baseline')} KEY=VALUE (e.g. {example}) adds each "
            "configuration's difference from it with a bootstrap confidence interval.",
        ]
    lines = [
        f"## Compared with {baseline.label}",
        "",
        f"The difference of each configuration's mean from the baseline's ({_cell(baseline.label)}"
        f", n={len(baseline.usable)}), in percentage points, and its bootstrap 95% interval "
        f"({BOOTSTRAP_RESAMPLES} resamples, percentiles): paired by seed where both ran the same "
        "seeds (the mean paired difference), otherwise each side's seeds resampled on their own.",
        "",
    ]
    if len(configs) == 1:
        return [*lines, "The sweep has no other configuration to compare with it."]
    if not baseline.usable:
        return [*lines, "The baseline has no completed job, so nothing is compared with it."]
    header = ["configuration", "n", "pairing", *map(_metric_name, metrics)]
    lines += _head(header, left=range(3))
    single = False
    for i, config in enumerate(configs):
        if config is baseline:
            continue
        found = [differences[(i, m)] for m in metrics if differences[(i, m)].diff is not None]
        with_ci = [d for d in found if d.low is not None]
        pairing = (
            "—"
            if not with_ci
            else "paired"
            if all(d.paired for d in with_ci)
            else "unpaired"
            if not any(d.paired for d in with_ci)
            else "paired (some metrics unpaired)"
        )
        cells = [_cell(config.label), str(len(config.usable)), pairing]
        for m in metrics:
            d = differences[(i, m)]
            if d.diff is None:
                cells.append("")
            elif d.low is None:
                single = True
                cells.append(f"{_percent(d.diff, signed=True)} (no CI)")
            else:
                mark = " \\*" if d.beyond_noise else ""
                cells.append(
                    f"{_percent(d.diff, signed=True)} [{_percent(d.low, signed=True)}, "
                    f"{_percent(d.high, signed=True)}]{mark}"
                )
        lines.append(_row(cells))
    lines += [
        "",
        "\\*: the interval excludes 0, a difference beyond seed noise. With 3 seeds a bootstrap "
        "interval is coarse (it never reaches beyond the seeds' own values), so read the mark "
        "as a screen for what to rerun with more seeds, not as a significance test.",
    ]
    if single:
        lines += [
            "",
            "No CI: one side has a single completed seed, so the difference cannot be told from "
            "seed noise.",
        ]
    return lines


def _optuna_section(
    search: OptunaSearch, options: Options, importance_figure: Path | None
) -> list[str]:
    """The top trials of an Optuna sweep and its parameter importances."""
    percent = is_percent(search.metric)
    keys = list(search.params)
    lines = [
        "## Optuna search",
        "",
        f"{len(search.trials)} of {len(search.trials) + len(search.failed)} trials completed with "
        f"a value of `{search.metric}` ({search.direction}); the top "
        f"{min(options.top, len(search.trials))}{', in %' if percent else ''}:",
        "",
    ]
    header = ["rank", "job", search.metric, *keys]
    lines += _head(header, left=(1,))
    for rank, (job, value, chosen) in enumerate(search.trials[: options.top], start=1):
        shown = f"{100 * value:.2f}" if percent else f"{value:.4g}"
        params = [_cell(_param_text(chosen.get(k))) for k in keys]
        lines.append(_row([str(rank), job.name, shown, *params]))
    if search.best and "best_params" in search.best:
        best = ", ".join(f"{k}={_param_text(v)}" for k, v in search.best["best_params"].items())
        lines += [
            "",
            f"optimization_results.yaml: best value {search.best.get('best_value')} at {best}.",
        ]
    searched = ", ".join(f"`{k}: {v}`" for k, v in search.params.items())
    lines += ["", f"Searched: {searched or 'no params listed in multirun.yaml'}."]
    lines += ["", search.note]
    if search.importances:
        lines += ["", "| parameter | importance |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in search.importances.items()]
        if importance_figure is not None:
            lines += ["", f"![{importance_figure.stem}]({importance_figure.name})"]
    return lines


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4g}"
        return text if any(c in text for c in ".en") else f"{text}.0"  # 2.0 stays a float
    return str(value)


def markdown(
    sweep_dir: Path,
    jobs: list[Job],
    job_rows: list[dict],
    configs: list[Configuration],
    config_rows: list[dict],
    metrics: Sequence[str],
    options: Options,
    baseline: Configuration | None,
    differences: dict[tuple[int, str], Difference],
    drawings: list[Drawing],
    search: OptunaSearch | None = None,
    importance_figure: Path | None = None,
) -> str:
    """The report as Markdown: configurations, the comparison with the baseline, the Optuna
    search, the figures, the jobs."""
    shorter = list({(j.name, c.label): (j, c) for d in drawings for j, c in d.shorter}.values())
    lines = [f"# Sweep report: {sweep_dir}", ""]
    lines += _configurations_section(configs, config_rows, metrics, options, shorter)
    comparison = _comparison_section(configs, baseline, differences, metrics, options)
    if comparison:
        lines += ["", *comparison]
    if search is not None:
        lines += ["", *_optuna_section(search, options, importance_figure)]
    lines += [
        "",
        "## Figures",
        "",
        f"Per configuration the mean over its completed jobs and a band: {BANDS[options.band]}.",
    ]
    for drawing in drawings:
        lines += ["", f"![{drawing.path.stem}]({drawing.path.name})"]
    lines += ["", *_jobs_section(jobs, job_rows, metrics)]
    return "\n".join(lines) + "\n"
