"""What train.py and evaluate.py do, from a composed Hydra config (the only code that reads a
`DictConfig`, apart from the sweep report): `train` and `evaluate` here, the rest by concern:

- `build`: the datamodule, `DetectionModule`, loggers and Trainer from the config (`plain_config`:
  the config as checkpoints and loggers keep it);
- `launch`: around a fit / validation, DDP ranks > 0 under Hydra and the clean-up for the next job
  of a sweep (`launch_context`);
- `resume`: the checkpoint to continue from, the config check, the run directory, the CSV history;
- `summary`: run_summary.json and the value returned to a Hydra sweeper (`optimized_value`).
"""

from __future__ import annotations

import logging
import signal
import time

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ..checkpoints import load_weights
from ..lit.callbacks import Preempted
from ..lit.module import DivergedError
from .build import build_datamodule, build_module, build_trainer, plain_config
from .launch import launch_context
from .resume import (
    check_nothing_skipped,
    checkpoint_to_resume,
    config_choices,
    continue_csv_history,
    resume_into,
    revalidates,
)
from .summary import optimized_value, write_run_summary

__all__ = ["evaluate", "optimized_value", "train"]

log = logging.getLogger("msdetr")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model (resuming `ckpt_path`, or the run directory's own last checkpoint),
    write run_summary.json however the fit ends, and return the final validation metrics."""
    started = time.monotonic()
    ckpt_path = checkpoint_to_resume(cfg)
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)  # num_classes may come from the data: compare after it is known
    resumed_step = resume_into(cfg, ckpt_path) if ckpt_path else None
    module = build_module(cfg)
    module.run_config = plain_config(cfg)
    module.config_choices = config_choices()
    module.category_names = dm.category_names
    trainer = build_trainer(cfg, resumed_step=resumed_step)
    if resumed_step is not None and ckpt_path is not None:
        continue_csv_history(trainer, resumed_step, revalidates(ckpt_path))
    if cfg.get("init_from") and not ckpt_path:
        # Fine-tuning: class heads of another class count (or all of them, init_reset_class_heads)
        # keep their fresh initialisation, with a warning; anything else must match.
        load_weights(
            module,
            cfg.init_from,
            fine_tune=True,
            reset_class_heads=bool(cfg.init_reset_class_heads),
        )
        log.info("initialised from %s", cfg.init_from)
    # "failed" until the fit says otherwise; the summary is written however the run ends
    status: str | None = "failed"
    try:
        with launch_context(cfg, trainer):
            try:
                trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
            except SIGTERMException as exc:
                # Lightning ends a SIGTERM'd run with status 0; the Preemption callback has saved
                # what it could (or the last epoch's checkpoint stands): never report success.
                raise Preempted(128 + signal.SIGTERM) from exc
        check_nothing_skipped(trainer, module, ckpt_path, resumed_step)
        status = None
    except Preempted:
        status = "stopped"
        raise
    except DivergedError:
        status = "diverged"
        raise
    finally:
        metrics = dict(module.last_metrics)
        if trainer.is_global_zero and metrics and status is None:
            log.info("final validation: %s", {k: round(v, 4) for k, v in metrics.items()})
        if trainer.is_global_zero:
            write_run_summary(cfg, trainer, metrics, time.monotonic() - started, status)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """COCO-evaluate `cfg.ckpt_path` (this project's .ckpt or an official .pth) with the configured
    model and data; return the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    module.run_config = plain_config(cfg)  # what the loggers get as hyperparameters
    load_weights(module, cfg.ckpt_path)
    trainer = build_trainer(cfg)
    with launch_context(cfg, trainer):
        trainer.validate(module, datamodule=dm)
    return dict(module.last_metrics)
