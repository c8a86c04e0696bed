"""How a run ended, for the people and tools reading it afterwards: `<run dir>/run_summary.json`
(status, wall time, steps, final metrics, W&B group; `python -m msdetr.report` reads it) and the
value train.py returns to a Hydra sweeper (`optimized_value`)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ..config_schema import ConfigValidationError
from ..files import atomic_write
from ..lit.loggers import hydra_job, wandb_group

log = logging.getLogger("msdetr")

# Written into the run directory when training ends; `python -m msdetr.report` reads it.
RUN_SUMMARY = "run_summary.json"


def write_run_summary(
    cfg: DictConfig,
    trainer: L.Trainer,
    metrics: dict[str, float],
    wall_time_s: float,
    status: str | None = None,
) -> None:
    """`<run dir>/run_summary.json`: how the run ended (`status`: completed, interrupted (Ctrl-C),
    stopped (a signal; it resumes), diverged, failed), its wall time (this process, from the start
    of `train`), epochs, steps, final validation metrics (NaN: null) and its W&B group, if it
    logged to W&B."""
    use_wandb = (cfg.get("logger") or {}).get("wandb") is not None
    summary = {
        "status": status or ("interrupted" if trainer.interrupted else "completed"),
        "wall_time_s": round(wall_time_s, 3),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "metrics": {k: None if math.isnan(v) else float(v) for k, v in metrics.items()},
        "wandb_group": wandb_group(cfg.logger.wandb.get("group")) if use_wandb else None,
    }
    path = Path(cfg.paths.output_dir) / RUN_SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of `cfg.optimized_metric` (a logged name, `val/AP`) among a run's final validation
    `metrics` (`train`'s result, {"AP": ...}): what train.py returns to a Hydra sweeper. A name the
    validation did not produce is refused in one sentence; a run that never validated returns None
    with a warning, except in a multirun, where a sweeper may be waiting for the value."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    produced = {f"val/{k}": v for k, v in metrics.items()}
    if name in produced:
        return float(produced[name])
    if not produced:
        message = (
            f"optimized_metric={name} has no value: the run ended without a validation (set "
            "trainer.check_val_every_n_epoch to divide schedule.epochs)."
        )
        # A job of a multirun: a sweeper may be waiting for the value.
        if hydra_job()[0] is not None:
            raise ConfigValidationError(message)
        log.warning(message)
        return None
    raise ConfigValidationError(
        f"optimized_metric={name} is not a metric of this run; its final "
        f"validation gave {', '.join(sorted(produced))}."
    )
