"""The jobs of a sweep as they are on disk: each job directory's overrides, status, final metrics,
costs and curves; the labels that tell the jobs apart; the per-job table (report.csv)."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# msdetr.run.summary.RUN_SUMMARY (not imported: it loads Lightning)
SUMMARY_FILE = "run_summary.json"
FINAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The instance-mask metrics (val/mask_AP, ...), in the tables when some job logged them.
MASK_METRICS = tuple(f"mask_{m}" for m in FINAL_METRICS)
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


class NotASweepError(ValueError):
    """The directory given is not a Hydra multirun directory."""


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


def is_percent(metric: str) -> bool:
    """Whether `metric` (val/AP, AP50, mask_AR100, ...) is an AP or AR, shown in %."""
    return bool(re.fullmatch(r"(val/)?(mask_)?A[PR]\w*", metric))


def job_order(name: str) -> tuple:
    """The sort key of a job directory's name: numbered ones first, in numeric order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


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
    return sorted(jobs, key=lambda p: job_order(p.name))


def read_yaml(path: Path):
    """The YAML file as an OmegaConf container, or None when it is missing or unreadable."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception:
        return None


def select(config, key: str, default=None):
    """OmegaConf.select of `key` in a DictConfig, `default` where `config` is none, the key is
    missing or null, or its value does not resolve."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(config, DictConfig):
        return default
    try:
        found = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
    except Exception:
        return default
    return default if found is None else found


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
    node = select(config, "logger.wandb")
    if node is None and not (job_dir / "wandb").is_dir():
        return None

    def value(key: str) -> str | None:
        found = select(node, key)
        return found if isinstance(found, str) and found else None

    return {
        "project": value("project") or "msdetr",
        "entity": value("entity"),
        "group": summary.get("wandb_group") or value("group"),
    }


def read_job(job_dir: str | Path) -> Job:
    """One job directory of a sweep: its overrides, status, final metrics, costs and curves."""
    job_dir = Path(job_dir)
    overrides = read_yaml(job_dir / ".hydra" / "overrides.yaml")
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
    job.wandb = _wandb_of(job_dir, read_yaml(job_dir / ".hydra" / "config.yaml"), summary)
    return job


def override_key(key: str) -> str:
    """An override's key without Hydra's prefixes (+seed=1, ++seed=1 and seed=1 set `seed`)."""
    return key.lstrip("+~")


def split_override(override: str) -> tuple[str, str]:
    """KEY=VALUE as (KEY, VALUE), the key with its prefixes."""
    key, _, value = override.partition("=")
    return key, value


def differing_overrides(override_lists: list[list[str]]) -> list[str]:
    """For each list of overrides, the ones whose key has different values across the lists (a key
    some lists lack counts as differing), joined in the order the keys first appear."""
    parsed = [dict(map(split_override, overrides)) for overrides in override_lists]
    keys = dict.fromkeys(key for mine in parsed for key in mine)
    differing = [k for k in keys if len({mine.get(k) for mine in parsed}) > 1]
    return [", ".join(f"{k}={mine[k]}" for k in differing if k in mine) for mine in parsed]


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
    for job, label in zip(jobs, differing_overrides([j.overrides for j in jobs])):
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
