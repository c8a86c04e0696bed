"""The report of a Hydra multirun sweep: python -m msdetr.report <sweep dir> [--out DIR]
    [--metric val/AP] [--seed-keys seed] [--group-by KEY,...] [--baseline KEY=VALUE]
    [--band minmax|std] [--top 5] [--no-wandb]

Reads every job directory of the sweep (`<sweep dir>/<job>/` with `.hydra/overrides.yaml`), its CSV
metrics (`csv/version_0/metrics.csv`) and the `run_summary.json` that `msdetr.run.train` writes
when a run ends, and writes into `<sweep dir>/report/` (or --out):

- configurations: jobs whose overrides differ only in the seed keys (`--seed-keys`, default `seed`)
  are the seeds of one configuration; with `--group-by KEY,...` a configuration is the values of
  those keys alone, any other override a repetition. Only completed jobs count; the others are
  listed with their status.
- `report.md` and `configs.csv`: per configuration, the mean ± sample standard deviation and n of
  the final AP/AP50/AP75/APs/APm/APl/AR100 (and the mask metrics when a job logged them), mean
  images/s and peak memory; with `--baseline KEY=VALUE`, each configuration's difference of means
  from the baseline's with a bootstrap 95% interval (paired by seed when both ran the same seeds);
- `report.md` ("Jobs") and `report.csv`: one row per job: the overrides that differ between jobs,
  status, the final metrics, epochs, wall time, training images/s (the median of the `throughput`
  callback's windows) and peak memory (CUDA max allocated; CPU peak resident set);
- `train_loss.png` (training loss per step, each job's running mean) and `val_AP.png` (the --metric
  per epoch): per configuration the mean over its seeds and a band (min to max, or `--band std`);
- for an Optuna sweep (hparams_search=optuna), the top trials by `optimized_metric` and Optuna's
  parameter importances (`param_importance.png`; needs scikit-learn);
- when the jobs logged to W&B, both tables as `wandb.Table`s (and the figures) in a new W&B run of
  the sweep's group (WANDB_MODE=offline works).

`report=true` on a `python train.py -m ...` sweep writes the report when the sweep ends
(`SweepReport`, a Hydra callback configured in conf/train.yaml, with the options as `report_*`
keys).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

# msdetr.run.summary.RUN_SUMMARY (not imported: it loads Lightning)
SUMMARY_FILE = "run_summary.json"
FINAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The instance-mask metrics (val/mask_AP, ...), in the tables when some job logged them.
MASK_METRICS = tuple(f"mask_{m}" for m in FINAL_METRICS)
WANDB_GROUP_MAX = 128
# The per-job table's columns as written to report.csv and the wandb.Table (values as logged: AP in
# [0, 1]); the mask metrics follow AR100 when some job logged them (job_columns).
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
# The only status whose metrics enter the configurations' means, comparisons and figures.
USABLE = "completed"
BANDS = {"minmax": "min to max over the seeds", "std": "mean ± 1 sample standard deviation"}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Beyond this many configurations the figures' colours and bands get hard to tell apart.
READABLE_CONFIGURATIONS = 8
TOP_TRIALS = 5


class NotASweepError(ValueError):
    """The directory given is not a Hydra multirun directory."""


class ReportOptionError(ValueError):
    """An option of the report (a flag, or a report_* key of conf/train.yaml) that cannot be used:
    a malformed value, or a baseline or --group-by key the sweep does not have."""


# -- options ------------------------------------------------------------------------------------


def _key(override_key: str) -> str:
    """An override's key without Hydra's prefixes (+seed=1, ++seed=1 and seed=1 set `seed`)."""
    return override_key.lstrip("+~")


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes ("a=1,b=[2,3]": "a=1", "b=[2,3]")."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _items(value: Any) -> list[str]:
    """A command-line or config value as a list of strings: None is empty, a string is split at its
    commas, a list gives its items (each split), a mapping its KEY=VALUE pairs."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    if isinstance(value, str):
        return _split_top_level(value)
    if isinstance(value, Mapping):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, Sequence):
        return [item for v in value for item in _items(v)]
    return [str(value)]


@dataclass(frozen=True)
class Options:
    """How the report groups and compares the jobs (the command line's flags, or conf/train.yaml's
    report_* keys for the Hydra callback)."""

    # the override keys whose values only repeat a configuration (`seed`)
    seed_keys: tuple[str, ...] = ("seed",)
    # when set, a configuration is exactly these keys' values
    group_by: tuple[str, ...] = ()
    # (key, value) pairs naming the baseline configuration
    baseline: tuple[tuple[str, str], ...] = ()
    band: str = "minmax"
    top: int = TOP_TRIALS
    # errors name the command line's flags (--baseline), else conf/train.yaml's keys
    cli: bool = True

    def name(self, option: str) -> str:
        """The option as the user gave it: --group-by, or report_group_by."""
        return f"--{option.replace('_', '-')}" if self.cli else f"report_{option}"

    @classmethod
    def parse(
        cls,
        seed_keys: Any = "seed",
        group_by: Any = None,
        baseline: Any = None,
        band: Any = "minmax",
        top: Any = TOP_TRIALS,
        cli: bool = True,
    ) -> Options:
        """The options from command-line strings or config values (a string with commas, a list, a
        mapping for the baseline); a malformed one is refused in one sentence
        (ReportOptionError)."""
        plain = cls(cli=cli)
        pairs = []
        for item in _items(baseline):
            key, sep, value = item.partition("=")
            if not sep or not _key(key.strip()):
                raise ReportOptionError(
                    f"{plain.name('baseline')} takes KEY=VALUE overrides naming one configuration "
                    f"(e.g. matcher=hungarian); '{item}' has no '='."
                )
            pairs.append((_key(key.strip()), value.strip()))
        if band not in BANDS:
            raise ReportOptionError(
                f"{plain.name('band')}={band!r} is not a band; use minmax (min to max over the "
                "seeds) or std (mean ± 1 standard deviation)."
            )
        whole = isinstance(top, (int, str)) and not isinstance(top, bool)
        if not whole or not str(top).strip().isdigit() or int(top) < 1:
            raise ReportOptionError(
                f"{plain.name('top')}={top!r} is not a number of trials; give a whole number >= 1."
            )
        return cls(
            seed_keys=tuple(_key(k) for k in _items(seed_keys)),
            group_by=tuple(_key(k) for k in _items(group_by)),
            baseline=tuple(pairs),
            band=str(band),
            top=int(top),
            cli=cli,
        )


# -- jobs ---------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    path: Path
    overrides: list[str]
    status: str
    # FINAL_METRICS / MASK_METRICS name -> value of the last validation
    final: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    wall_time_s: float | None = None
    images_per_s: float | None = None
    peak_mem_gib: float | None = None
    rows: list[dict[str, float]] = field(default_factory=list)  # metrics.csv, numeric cells only
    wandb: dict | None = None  # {"project", "entity", "group"} when the job logged to W&B
    label: str = ""
    # the overrides that only repeat its configuration (its seed), set by `configurations`
    repeat: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Whether its metrics enter the configurations' means, comparisons and figures."""
        return self.status == USABLE

    def series(self, name: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) of every logged row that has both, in logging order."""
        return [(row[x], row[name]) for row in self.rows if name in row and x in row]

    def final_value(self, metric: str) -> float | None:
        """The last logged value of `metric` (a logged name, val/AP), or None."""
        short = metric.removeprefix("val/")
        if short in self.final:
            return self.final[short]
        logged = [row[metric] for row in self.rows if metric in row]
        return logged[-1] if logged else None


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
    names = FINAL_METRICS + MASK_METRICS
    job.final = {m: logged[f"val/{m}"] for m in names if f"val/{m}" in logged}
    for m, v in (summary.get("metrics") or {}).items():  # runs without a CSV logger
        if m in names and m not in job.final and v is not None:
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


def _differing(override_lists: list[list[str]]) -> list[str]:
    """For each list of overrides, the ones whose key has different values across the lists (a key
    some lists lack counts as differing), joined in the order the keys first appear."""
    values: dict[str, list[str | None]] = {}
    for overrides in override_lists:
        for key, _ in map(_split, overrides):
            values.setdefault(key, [])
    for overrides in override_lists:
        mine = dict(map(_split, overrides))
        for key in values:
            values[key].append(mine.get(key))
    differing = [k for k, v in values.items() if len(set(v)) > 1]
    labels = []
    for overrides in override_lists:
        mine = dict(map(_split, overrides))
        labels.append(", ".join(f"{k}={mine[k]}" for k in differing if k in mine))
    return labels


def label_jobs(jobs: list[Job]) -> None:
    """Set each job's label to the overrides that differ between the jobs (a key some jobs lack
    counts as differing), in the order they first appear; jobs with nothing to tell them apart are
    labelled by their directory."""
    for job, label in zip(jobs, _differing([j.overrides for j in jobs])):
        job.label = label or f"job {job.name}"
    labels = [j.label for j in jobs]
    for job in jobs:
        if labels.count(job.label) > 1:
            job.label = f"{job.label} (job {job.name})"


def logged_metrics(jobs: list[Job]) -> tuple[str, ...]:
    """The final metrics of the tables: FINAL_METRICS, and MASK_METRICS when a job logged one."""
    masks = any(m in job.final for job in jobs for m in MASK_METRICS)
    return FINAL_METRICS + (MASK_METRICS if masks else ())


def job_columns(metrics: Sequence[str]) -> tuple[str, ...]:
    """COLUMNS with the mask metrics after AR100 when `metrics` has them."""
    extra = tuple(m for m in metrics if m not in FINAL_METRICS)
    at = COLUMNS.index("AR100") + 1
    return COLUMNS[:at] + extra + COLUMNS[at:]


def table(jobs: list[Job], metrics: Sequence[str] = FINAL_METRICS) -> list[dict]:
    """One row per job, keyed by job_columns(metrics); None where a value is missing."""
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.name, "overrides": job.label, "status": job.status}
        row.update({m: job.final.get(m) for m in metrics})
        row.update(
            epochs=job.epochs,
            wall_time_s=job.wall_time_s,
            images_per_s=job.images_per_s,
            peak_mem_gib=job.peak_mem_gib,
            all_overrides=" ".join(job.overrides),
        )
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    """The rows as CSV (floats rounded to 6 decimals, None blank)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
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


# -- configurations -----------------------------------------------------------------------------


@dataclass
class Configuration:
    """Jobs that differ only in their repetition (seed) overrides."""

    # the overrides that define it (its first job's, the repetition ones left out)
    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)
    # the overrides that differ between the configurations ("defaults" where it sets none of them)
    label: str = ""

    @property
    def usable(self) -> list[Job]:
        return [j for j in self.jobs if j.usable]

    @property
    def excluded(self) -> list[Job]:
        return [j for j in self.jobs if not j.usable]

    def values(self, metric: str) -> list[tuple[tuple[str, ...], float]]:
        """(repetition, final value) of `metric` (a FINAL_METRICS / MASK_METRICS name) for each
        usable job that logged it."""
        return [(j.repeat, j.final[metric]) for j in self.usable if metric in j.final]

    def matches(self, pairs: Sequence[tuple[str, str]]) -> bool:
        mine = {_key(k): v for k, v in map(_split, self.overrides)}
        return all(mine.get(k) == v for k, v in pairs)


def configurations(jobs: list[Job], options: Options) -> list[Configuration]:
    """The jobs grouped into configurations, in the order of their first jobs: jobs whose
    overrides differ only in `options.seed_keys`, or, with `options.group_by`, jobs with the same
    values of those keys. Sets each job's `repeat` and each configuration's label. A --group-by
    key no job overrides is refused (ReportOptionError)."""
    if options.group_by:
        present = list(dict.fromkeys(_key(_split(o)[0]) for j in jobs for o in j.overrides))
        missing = [k for k in options.group_by if k not in present]
        if missing:
            raise ReportOptionError(
                f"{options.name('group_by')} {','.join(missing)}: no job of the sweep overrides "
                f"{'this key' if len(missing) == 1 else 'these keys'}; the keys its jobs override "
                f"are {', '.join(present) or 'none'}."
            )

        def defines(override: str) -> bool:
            return _key(_split(override)[0]) in options.group_by

    else:

        def defines(override: str) -> bool:
            return _key(_split(override)[0]) not in options.seed_keys

    found: dict[frozenset, Configuration] = {}
    for job in jobs:
        own = [o for o in job.overrides if defines(o)]
        job.repeat = tuple(o for o in job.overrides if not defines(o))
        identity = frozenset((_key(k), v) for k, v in map(_split, own))
        found.setdefault(identity, Configuration(own)).jobs.append(job)
    result = list(found.values())
    labels = _differing([c.overrides for c in result])
    for config, label in zip(result, labels):
        config.label = label or ("all jobs" if len(result) == 1 else "defaults")
    return result


def find_baseline(configs: list[Configuration], options: Options) -> Configuration | None:
    """The configuration `options.baseline` names (None when it names none); a baseline that
    matches no configuration, or several, is refused in one sentence (ReportOptionError)."""
    if not options.baseline:
        return None
    matched = [c for c in configs if c.matches(options.baseline)]
    if len(matched) == 1:
        return matched[0]
    given = ",".join(f"{k}={v}" for k, v in options.baseline)
    available = "; ".join(c.label for c in configs)
    if not matched:
        raise ReportOptionError(
            f"{options.name('baseline')} {given} matches no configuration of the sweep; its "
            f"configurations are: {available}."
        )
    raise ReportOptionError(
        f"{options.name('baseline')} {given} matches {len(matched)} configurations "
        f"({'; '.join(c.label for c in matched)}); add KEY=VALUE pairs to name one of: "
        f"{available}."
    )


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """A metric over a configuration's seeds."""

    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None with fewer than two seeds
    n: int


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    return Summary(
        mean=statistics.fmean(values) if values else None,
        std=statistics.stdev(values) if len(values) >= 2 else None,
        n=len(values),
    )


@dataclass(frozen=True)
class Difference:
    """A configuration's mean minus the baseline's, with a bootstrap 95% interval (None when a
    side has fewer than two seeds)."""

    diff: float | None
    low: float | None
    high: float | None
    paired: bool
    n: tuple[int, int]  # seeds of the baseline, of the configuration

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def bootstrap_difference(
    baseline: Sequence[tuple[Hashable, float]],
    other: Sequence[tuple[Hashable, float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference:
    """mean(other) - mean(baseline) over (repetition, value) pairs, with a percentile bootstrap 95%
    interval (`resamples` draws from numpy's default_rng(seed)). Paired when both sides have the
    same repetitions, each once: the pairs are resampled and the interval is that of the mean
    paired difference; otherwise each side's values are resampled on their own."""
    n = (len(baseline), len(other))
    if not baseline or not other:
        return Difference(None, None, None, False, n)
    base = dict(baseline)
    mine = dict(other)
    paired = len(base) == n[0] and len(mine) == n[1] and set(base) == set(mine)
    a = np.array([v for _, v in baseline], dtype=float)
    b = np.array([v for _, v in other], dtype=float)
    diff = statistics.fmean(b.tolist()) - statistics.fmean(a.tolist())
    if min(n) < 2:
        return Difference(diff, None, None, paired, n)
    rng = np.random.default_rng(seed)
    if paired:
        d = np.array([mine[k] - base[k] for k in base], dtype=float)
        means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    else:
        resampled_a = a[rng.integers(0, n[0], size=(resamples, n[0]))].mean(axis=1)
        resampled_b = b[rng.integers(0, n[1], size=(resamples, n[1]))].mean(axis=1)
        means = resampled_b - resampled_a
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(diff, float(low), float(high), paired, n)


def compare(
    configs: list[Configuration], baseline: Configuration, metrics: Sequence[str]
) -> dict[tuple[int, str], Difference]:
    """(index of a configuration in `configs`, metric) -> its Difference from the baseline, for
    every configuration but the baseline."""
    return {
        (i, m): bootstrap_difference(baseline.values(m), config.values(m))
        for i, config in enumerate(configs)
        if config is not baseline
        for m in metrics
    }


def configuration_table(
    configs: list[Configuration],
    metrics: Sequence[str],
    baseline: Configuration | None = None,
    differences: dict[tuple[int, str], Difference] | None = None,
) -> tuple[list[str], list[dict]]:
    """configs.csv's columns and one row per configuration: its label and overrides, n (usable
    jobs), the jobs used and left out, each metric's mean, std and n, mean images/s and peak memory,
    and with a baseline each metric's difference, interval, pairing and mark."""
    columns = ["configuration", "overrides", "n", "jobs", "excluded_jobs"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    columns += ["images_per_s", "peak_mem_gib"]
    if baseline is not None:
        columns.append("baseline")
        for m in metrics:
            columns += [
                f"{m}_diff",
                f"{m}_ci_low",
                f"{m}_ci_high",
                f"{m}_paired",
                f"{m}_beyond_noise",
            ]
    rows = []
    for i, config in enumerate(configs):
        used = config.usable
        row: dict[str, Any] = {
            "configuration": config.label,
            "overrides": " ".join(config.overrides),
            "n": len(used),
            "jobs": " ".join(j.name for j in used),
            "excluded_jobs": " ".join(j.name for j in config.excluded),
        }
        for m in metrics:
            s = summarize([v for _, v in config.values(m)])
            row.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_n": s.n})
        speeds = [j.images_per_s for j in used if j.images_per_s is not None]
        peaks = [j.peak_mem_gib for j in used if j.peak_mem_gib is not None]
        row["images_per_s"] = statistics.fmean(speeds) if speeds else None
        row["peak_mem_gib"] = statistics.fmean(peaks) if peaks else None
        if baseline is not None:
            row["baseline"] = config is baseline
            for m in metrics:
                d = (differences or {}).get((i, m))
                row.update(
                    {
                        f"{m}_diff": d.diff if d else None,
                        f"{m}_ci_low": d.low if d else None,
                        f"{m}_ci_high": d.high if d else None,
                        f"{m}_paired": d.paired if d and d.low is not None else None,
                        f"{m}_beyond_noise": d.beyond_noise if d and d.low is not None else None,
                    }
                )
        rows.append(row)
    return columns, rows


# -- figures ------------------------------------------------------------------------------------

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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


def _finish(fig, ax, drawn: int, empty_note: str, path: Path) -> None:
    if drawn:
        ncol = 1 if drawn <= 20 else 2
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=8,
            ncol=ncol,
            frameon=False,
            title="configuration",
            title_fontsize=8,
        )
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(left=0)  # steps and epochs from 0: a one-epoch sweep still has integer ticks
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    fig.savefig(path, bbox_inches="tight")


@dataclass
class Drawing:
    """A figure written: its path, the configurations drawn, and the usable jobs left out of
    their configuration's mean and band because their curve is shorter than the others'."""

    path: Path
    drawn: int
    shorter: list[tuple[Job, Configuration]] = field(default_factory=list)


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
    _finish(
        fig,
        ax,
        drawing.drawn,
        "no train/loss logged by a completed job\n"
        "(trainer.log_every_n_steps more than the steps run?)",
        path,
    )
    drawing.path = path
    return drawing


def _is_percent(metric: str) -> bool:
    return bool(re.fullmatch(r"(val/)?(mask_)?A[PR]\w*", metric))


def plot_metric(
    configs: list[Configuration], metric: str, path: Path, title: str, band: str = "minmax"
) -> Drawing:
    """`metric` at each validation (x: epochs trained): per configuration the mean over its
    completed jobs and the band over them; AP / AR in %."""
    percent = _is_percent(metric)
    fig, ax = _figure(len(configs))

    def curve(job: Job) -> dict[float, float]:
        return {e + 1: 100 * v if percent else v for e, v in job.series(metric, x="epoch")}

    drawing = _draw_bands(ax, configs, curve, band, markers=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    ax.set_title(f"Validation {metric}: {title}")
    if percent:
        ax.set_ylim(bottom=0)
    _finish(
        fig,
        ax,
        drawing.drawn,
        f"no {metric} logged by a completed job\n(no validation ran: "
        "trainer.check_val_every_n_epoch <= schedule.epochs?)",
        path,
    )
    drawing.path = path
    return drawing


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


# -- Optuna sweeps ------------------------------------------------------------------------------


@dataclass
class OptunaSearch:
    """What a sweep run with hparams_search=optuna searched and found."""

    direction: str  # maximize or minimize
    metric: str  # optimized_metric
    params: dict[str, str]  # searched key -> its Hydra sweep expression, e.g. choice(1.0, 2.0)
    # the completed jobs with a value: (job, value, {key: value parsed}), best first
    trials: list[tuple[Job, float, dict[str, Any]]] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)  # the jobs that gave Optuna no value
    best: dict | None = None  # optimization_results.yaml
    importances: dict[str, float] | None = None
    note: str = ""  # how the importances were computed, or why there are none


def _parse_override(key: str, value: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={value}")


def optuna_distribution(key: str, expression: str):
    """The Optuna 2 distribution the Optuna sweeper samples `key` from for its `params`
    `expression` (interval: uniform, log-uniform with tag(log, ...), integer ones for integer
    bounds; range: integer or discrete uniform; choice or a shuffled range: categorical); None
    for a fixed value."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna import distributions as od

    override = _parse_override(key, expression)
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep) or (isinstance(sweep, RangeSweep) and sweep.shuffle):
        return od.CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if start is None or stop is None:
            return None
        if any(isinstance(v, float) for v in (start, stop, step)):
            return od.DiscreteUniformDistribution(float(start), float(stop), float(step))
        return od.IntUniformDistribution(int(start), int(stop), step=int(step))
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None:
            return None
        integer = isinstance(low, int) and isinstance(high, int)
        if "log" in sweep.tags:
            return (
                od.IntLogUniformDistribution(int(low), int(high))
                if integer
                else od.LogUniformDistribution(float(low), float(high))
            )
        return (
            od.IntUniformDistribution(int(low), int(high))
            if integer
            else od.UniformDistribution(float(low), float(high))
        )
    return None


def _searched(params: Mapping[str, Any]) -> dict[str, str]:
    """The keys of the sweeper's `params` that are searched (a sweep expression), not fixed."""
    searched = {}
    for key, expression in params.items():
        try:
            if _parse_override(str(key), str(expression)).is_sweep_override():
                searched[str(key)] = str(expression)
        except Exception:  # not Hydra's override syntax: the sweeper would have refused it
            continue
    return searched


def read_optuna(sweep_dir: Path, jobs: list[Job]) -> OptunaSearch | None:
    """The Optuna search of the sweep (its multirun.yaml's sweeper is Optuna's, or it holds
    optimization_results.yaml), or None for another sweep."""
    from omegaconf import DictConfig, OmegaConf

    config = _read_yaml(sweep_dir / "multirun.yaml")
    results_file = sweep_dir / "optimization_results.yaml"

    def select(key: str, default=None):
        if not isinstance(config, DictConfig):
            return default
        try:
            found = OmegaConf.select(
                config, key, default=default, throw_on_resolution_failure=False
            )
        except Exception:
            return default
        return default if found is None else found

    target = str(select("hydra.sweeper._target_", ""))
    if "optuna" not in target.lower() and not results_file.is_file():
        return None
    node = select("hydra.sweeper.params", {})
    params: Any = (
        OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
    )
    direction = select("hydra.sweeper.direction", "maximize")
    if not isinstance(direction, str):  # a list: one direction per objective
        directions = list(direction)
        direction = str(directions[0]) if len(directions) == 1 else "multi-objective"
    results = _read_yaml(results_file) if results_file.is_file() else None
    best: Any = OmegaConf.to_container(results) if isinstance(results, DictConfig) else None
    search = OptunaSearch(
        direction=direction.lower(),
        metric=str(select("optimized_metric", "val/AP")),
        params=_searched(params),
        best=best,
    )
    for job in jobs:
        value = job.final_value(search.metric) if job.usable else None
        if value is None or not math.isfinite(value):
            search.failed.append(job)
            continue
        mine = dict(map(_split, job.overrides))
        chosen = {}
        for key in search.params:
            text = mine.get(key, mine.get(f"+{key}", mine.get(f"++{key}")))
            if text is not None:
                try:
                    chosen[key] = _parse_override(key, text).value()
                except Exception:
                    chosen[key] = text
        search.trials.append((job, value, chosen))
    search.trials.sort(key=lambda t: t[1], reverse=search.direction != "minimize")
    return search


def param_importances(search: OptunaSearch) -> None:
    """Optuna's parameter importances over a study rebuilt from the completed trials (fANOVA, its
    default; mean decrease in impurity when fANOVA fails with the installed scikit-learn), into
    `search.importances`, or the reason there are none into `search.note`."""
    if search.direction not in ("maximize", "minimize"):
        search.note = "Parameter importance is left out: the sweep has several objectives."
        return
    try:
        import optuna
    except ImportError:
        search.note = "Parameter importance needs optuna (pip install 'msdetr[sweep]')."
        return
    try:
        import sklearn  # noqa: F401 -- both of Optuna 2's importance evaluators fit its forests
    except ImportError:
        search.note = (
            "Parameter importance needs scikit-learn, which is not installed here "
            "(pip install 'msdetr[sweep]')."
        )
        return
    if not search.params:
        search.note = "Parameter importance is left out: multirun.yaml lists no searched params."
        return
    distributions = {}
    for key, expression in search.params.items():
        distribution = optuna_distribution(key, expression)
        if distribution is not None:
            distributions[key] = distribution
    trials, left_out = [], []
    for job, value, chosen in search.trials:
        try:
            params = {k: _in_distribution(chosen[k], d) for k, d in distributions.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trials.append(
                    optuna.trial.create_trial(
                        params=params, distributions=distributions, value=value
                    )
                )
        except (KeyError, ValueError):  # a job without a searched key, or a value outside it
            left_out.append(job.name)
    skipped = (
        f" Left out: job {', '.join(left_out)}, whose overrides do not fit the searched params."
        if left_out
        else ""
    )
    if len(trials) < 2:
        search.note = (
            f"Parameter importance needs at least 2 completed trials with a value; the sweep has "
            f"{len(trials)}.{skipped}"
        )
        return
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(direction=search.direction)
            for trial in trials:
                study.add_trial(trial)
            how = f"Optuna's fANOVA over the {len(trials)} completed trials"
            try:
                found = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
            except Exception as err:
                how = (
                    f"Optuna's mean decrease in impurity over the {len(trials)} completed trials "
                    f"(its fANOVA failed with this scikit-learn: {type(err).__name__})"
                )
                found = optuna.importance.get_param_importances(
                    study,
                    evaluator=optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
                )
    except Exception as err:
        search.note = (
            f"Optuna could not compute the parameter importances ({type(err).__name__}: "
            f"{err}).{skipped}"
        )
        return
    finally:
        optuna.logging.set_verbosity(verbosity)
    search.importances = {k: float(v) for k, v in found.items()}
    search.note = f"Parameter importance: {how}; they sum to 1.{skipped}"


def _in_distribution(value: Any, distribution) -> Any:
    """A trial's override value as the distribution holds it (a choice by equality or by its
    text); ValueError when it does not fit."""
    from optuna import distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        for choice in distribution.choices:
            if choice == value or str(choice) == str(value):
                return choice
        raise ValueError(value)
    if isinstance(distribution, (od.IntUniformDistribution, od.IntLogUniformDistribution)):
        number: float = int(value)
    else:
        number = float(value)
    if not distribution.low <= number <= distribution.high:
        raise ValueError(value)
    return number


# -- Markdown -----------------------------------------------------------------------------------


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
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
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
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
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
        cells += [
            "" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}",
            "" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    excluded = [(job, config) for config in configs for job in config.excluded]
    if excluded:
        excluded.sort(key=lambda jc: _job_order(jc[0]))
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


def _job_order(job: Job) -> tuple:
    return (0, int(job.name), "") if job.name.isdigit() else (1, 0, job.name)


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
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
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
        lines.append("| " + " | ".join(cells) + " |")
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
    percent = _is_percent(search.metric)
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
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---:", "---", "---:"] + ["---:"] * len(keys)) + "|",
    ]
    for rank, (job, value, chosen) in enumerate(search.trials[: options.top], start=1):
        shown = f"{100 * value:.2f}" if percent else f"{value:.4g}"
        params = [_cell(_param_text(chosen.get(k))) for k in keys]
        lines.append("| " + " | ".join([str(rank), job.name, shown, *params]) + " |")
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


# -- W&B ----------------------------------------------------------------------------------------


def log_to_wandb(
    jobs: list[Job],
    rows: list[dict],
    figures: list[Path],
    out: Path,
    sweep_dir: Path,
    metric: str,
    group: str | None = None,
    columns: Sequence[str] = COLUMNS,
    configurations: tuple[Sequence[str], list[dict]] | None = None,
) -> str | None:
    """The jobs' table (`columns`), the configurations' table (configs.csv's columns and rows) and
    the figures in a new W&B run of the sweep's group, when the jobs logged to W&B; the run's
    directory, or None (no job used W&B, or wandb is not installed)."""
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
        data = [[row[c] for c in columns] for row in rows]
        payload: dict[str, Any] = {
            "sweep_report": wandb.Table(columns=list(columns), data=data, allow_mixed_types=True)
        }
        if configurations is not None:
            config_columns, config_rows = configurations
            payload["sweep_configurations"] = wandb.Table(
                columns=list(config_columns),
                data=[[row.get(c) for c in config_columns] for row in config_rows],
                allow_mixed_types=True,
            )
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
    options: Options | None = None,
) -> dict[str, Path | str | None]:
    """Write the sweep's report (see the module's docstring) into `out` (default `<sweep
    dir>/report`); the paths written, by kind. Raises NotASweepError (one sentence) for a directory
    without jobs, ReportOptionError (one sentence) for a baseline or --group-by the sweep does not
    have."""
    options = options or Options()
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(p) for p in find_jobs(sweep_dir)]
    label_jobs(jobs)
    configs = configurations(jobs, options)
    baseline = find_baseline(configs, options)
    metrics = logged_metrics(jobs)
    differences = compare(configs, baseline, metrics) if baseline is not None else {}
    search = read_optuna(sweep_dir, jobs)
    if search is not None:
        param_importances(search)

    out = Path(out) if out is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    job_rows = table(jobs, metrics)
    config_columns, config_rows = configuration_table(configs, metrics, baseline, differences)
    title = "/".join(sweep_dir.resolve().parts[-2:])
    drawings = [
        plot_loss(configs, out / "train_loss.png", title, options.band),
        plot_metric(configs, metric, out / f"{metric.replace('/', '_')}.png", title, options.band),
    ]
    importance_figure = (
        plot_importance(search.importances, out / "param_importance.png", title)
        if search is not None and search.importances
        else None
    )
    write_csv(job_rows, out / "report.csv", job_columns(metrics))
    write_csv(config_rows, out / "configs.csv", config_columns)
    (out / "report.md").write_text(
        markdown(
            sweep_dir,
            jobs,
            job_rows,
            configs,
            config_rows,
            metrics,
            options,
            baseline,
            differences,
            drawings,
            search,
            importance_figure,
        )
    )
    figures = [d.path for d in drawings] + ([importance_figure] if importance_figure else [])
    written: dict[str, Path | str | None] = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "configs_csv": out / "configs.csv",
        "loss_figure": drawings[0].path,
        "metric_figure": drawings[1].path,
        "importance_figure": importance_figure,
        "wandb": None,
    }
    if use_wandb:
        try:
            written["wandb"] = log_to_wandb(
                jobs,
                job_rows,
                figures,
                out,
                sweep_dir,
                metric,
                wandb_group,
                columns=job_columns(metrics),
                configurations=(config_columns, config_rows),
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
    `report=true`, its options as report_seed_keys, report_group_by, report_baseline, report_band
    and report_top). With `enabled` false (the default `report: false`) it does nothing."""

    def __init__(
        self,
        enabled: bool = True,
        out: str | None = None,
        metric: str | None = None,
        seed_keys: Any = "seed",
        group_by: Any = None,
        baseline: Any = None,
        band: str = "minmax",
        top: int = TOP_TRIALS,
    ):
        self.enabled = bool(enabled)
        self.out = out
        self.metric = metric
        self.given = {
            "seed_keys": seed_keys,
            "group_by": group_by,
            "baseline": baseline,
            "band": band,
            "top": top,
        }

    @property
    def options(self) -> Options:
        return Options.parse(**self.given, cli=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        if self.enabled:  # a malformed report_* key stops the sweep before its first job
            Options.parse(**self.given, cli=False)

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
        try:
            written = write_report(
                sweep, self.out, metric=metric, wandb_group=group, options=self.options
            )
        except ReportOptionError as err:
            print(
                f"sweep report: not written: {err} (python -m msdetr.report {sweep} writes it "
                "with other options.)",
                file=sys.stderr,
                flush=True,
            )
            return
        print(
            f"sweep report: {written['markdown']} (tables, "
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
            "Tables (Markdown, CSV), figures and W&B tables of a Hydra multirun sweep (python "
            "train.py -m ...): per configuration over its seeds, and per job."
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
    parser.add_argument(
        "--seed-keys",
        default="seed",
        metavar="KEY[,KEY]",
        help="the override keys that only repeat a configuration (default: seed)",
    )
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="KEY[,KEY]",
        help="a configuration is exactly these keys' values; any other override is a repetition",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="the configuration the others are compared with (repeatable), e.g. matcher=hungarian",
    )
    parser.add_argument(
        "--band",
        default="minmax",
        choices=sorted(BANDS),
        help="the figures' band over the seeds: minmax (default) or std (mean ± 1 std)",
    )
    parser.add_argument(
        "--top", type=int, default=TOP_TRIALS, help="the Optuna trials listed (default 5)"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log the tables to W&B")
    args = parser.parse_args(argv)
    try:
        options = Options.parse(
            seed_keys=args.seed_keys,
            group_by=args.group_by,
            baseline=args.baseline,
            band=args.band,
            top=args.top,
        )
        written = write_report(
            args.sweep_dir,
            args.out,
            metric=args.metric,
            use_wandb=not args.no_wandb,
            options=options,
        )
    except (NotASweepError, ReportOptionError) as err:
        print(f"msdetr.report: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        if path is not None:
            print(f"{kind}: {path}")
    return 0
