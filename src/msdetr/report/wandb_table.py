"""The report's tables (and figures) in a new W&B run of the sweep's group, when its jobs logged
to W&B."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msdetr.report.jobs import COLUMNS, Job

# msdetr.lit.loggers.WANDB_GROUP_MAX, W&B's longest group (not imported: it loads Lightning); a
# sweep's directory as a group keeps its last this many characters.
WANDB_GROUP_MAX = 128


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
