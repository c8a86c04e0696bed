"""Resuming a run: which checkpoint (ckpt_path, or the run directory's own last.ckpt), the refusal
of a checkpoint made with another model or matcher config (the first differing key named), the run
directory a resume keeps writing to, the CSV metrics history carried over, and the check that a
resumed fit did not stop short of its schedule."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, open_dict

from ..lit import DetectionModule, loopstate
from ..official import read_checkpoint_file
from .build import plain_config

log = logging.getLogger("msdetr")

_RESUME_MUST_MATCH = ("matcher", "model")  # the matcher first: it also sets model options
# How the model runs, not what it is: a resume may change these (and checkpoints from before they
# existed lack them).
_RESUME_MAY_CHANGE = {
    "model.compile",
    "model.compile_mode",
    "model.compile_dynamic",
    "model.compile_backend",
    "model.attn_backend",
}
# ...and the layers' copies of model.attn_backend (the config is compared with interpolations
# resolved)
_RESUME_MAY_CHANGE_LEAVES = {"attn_backend"}


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint this run continues from: `ckpt_path` (refused in one sentence when it is not
    a file), else, with `auto_resume`, the run directory's own checkpoints/last.ckpt (a SLURM
    requeue or a rerun of this job); None for a fresh run."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path '{ckpt_path}' does not exist; point it at a run's checkpoints/last.ckpt."
        )
    own_last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not ckpt_path and cfg.get("auto_resume") and own_last.is_file():
        log.info("resuming this run from %s", own_last)
        return str(own_last)
    return ckpt_path


def resume_into(cfg: DictConfig, ckpt_path: str | Path) -> int:
    """Check that `ckpt_path` was made with this model and matcher config (`check_resume_config`)
    and point `cfg.paths.output_dir` at the checkpoint's run directory, so checkpoints, metrics and
    pictures continue where they were; return the checkpoint's global step."""
    step = check_resume_config(cfg, ckpt_path)
    run_dir = _resumed_run_dir(ckpt_path)
    if run_dir is not None and run_dir != Path(cfg.paths.output_dir).resolve():
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        log.info("resuming into the run directory %s", run_dir)
    return step


def _resumed_run_dir(ckpt_path: str | Path) -> Path | None:
    """The run directory of `<run dir>/checkpoints/<file>.ckpt`, where a resume keeps writing."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _first_difference(saved, current, path: str = ""):
    """The first key path where two plain configs differ, with both values (None if equal)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        # Values before sections: a shared size (model.num_queries) is named rather than its
        # interpolated copy inside a part (model.detector.queries.num_queries).
        def order(key):
            return isinstance(saved.get(key), dict) or isinstance(current.get(key), dict), str(key)

        for key in sorted(set(saved) | set(current), key=order):
            where = f"{path}.{key}" if path else str(key)
            if where in _RESUME_MAY_CHANGE or key in _RESUME_MAY_CHANGE_LEAVES:
                continue
            found = _first_difference(
                saved.get(key, "<absent>"), current.get(key, "<absent>"), where
            )
            if found:
                return found
        return None
    return None if saved == current else (path, saved, current)


def config_choices() -> dict[str, str]:
    """The config group choices of this Hydra run ({"matcher": "ms_detr", "model": ...}; {} outside
    Hydra), saved in checkpoints so that a resume with another choice is named by it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {
        str(k): str(v)
        for k, v in choices.items()
        if v is not None and not str(k).startswith("hydra")
    }


def check_resume_config(cfg: DictConfig, ckpt_path: str | Path) -> int:
    """Refuse, in one sentence and before the model is built, to resume a checkpoint made with
    another model or matcher config; return the checkpoint's global step."""
    ckpt = read_checkpoint_file(ckpt_path, "a checkpoint to resume", mmap=True)
    saved = ckpt.get("msdetr_config") if isinstance(ckpt, dict) else None
    step = int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0
    if not saved:
        return step
    current = plain_config(cfg)
    saved_choices, choices = ckpt.get("msdetr_choices") or {}, config_choices()
    for group in _RESUME_MUST_MATCH:
        found = _first_difference(saved.get(group), current.get(group), group)
        if found:
            key, was, now = found
            before, after = saved_choices.get(group), choices.get(group)
            chosen = (
                f"{group}: {before} -> {after}, first at "
                if before and after and before != after
                else ""
            )
            raise ValueError(
                f"cannot resume from '{ckpt_path}': it was made with another {group} config "
                f"({chosen}{key}: {was!r} -> {now!r}); resume with the config the run started with "
                "(or start a new run with init_from=<checkpoint>)."
            )
    return step


def continue_csv_history(trainer: L.Trainer, resumed_step: int, revalidates: bool = False) -> None:
    """Lightning's CSVLogger starts its metrics file afresh; a resumed run logs the rows of the
    steps before `resumed_step` again first, so the file stays one history (rows the interrupted run
    wrote after its checkpoint are dropped: the resumed run logs those steps anew). `revalidates`:
    the checkpoint was taken before its epoch's validation ended, which the resumed run runs again,
    so the validation values logged at the epoch's last step are dropped too."""
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or not trainer.is_global_zero:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < resumed_step]
        for row in rows:
            step = int(row.pop("step"))
            if revalidates and step == resumed_step - 1:
                row = {k: v for k, v in row.items() if not k.startswith("val/")}
            values: dict[str, Any] = {k: float(v) for k, v in row.items() if v not in ("", None)}
            logger.log_metrics(values, step=step)
        logger.save()


def revalidates(ckpt_path: str | Path) -> bool:
    """Whether the checkpoint was taken before its epoch's validation ended, as
    `loopstate.settle_epoch_end` settled its loop state (the resumed run validates that epoch
    again)."""
    ckpt = read_checkpoint_file(ckpt_path, "a checkpoint to resume", mmap=True)
    settled = ckpt.get(loopstate.KEY) if isinstance(ckpt, dict) else None
    return settled == loopstate.VALIDATION_PENDING


class IncompleteRunError(RuntimeError):
    """A fit that returned normally short of its schedule."""


def check_nothing_skipped(
    trainer: L.Trainer,
    module: DetectionModule,
    ckpt_path: str | Path | None,
    resumed_step: int | None,
) -> None:
    """After a fit that returned normally: refuse, in one sentence, a run that stopped short of its
    schedule although nothing asked it to stop (a resume whose loop state said the schedule was done
    when it was not), so that it never ends with status 0. The steps are counted as the module saw
    them (the checkpoint's step + the optimizer steps of this process): Lightning's own global step
    counts the skipped epoch as done."""
    if trainer.interrupted or trainer.should_stop:
        return
    if trainer.num_training_batches in (0, float("inf")):
        return
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    expected = trainer.max_epochs * per_epoch if trainer.max_epochs not in (None, -1) else None
    if trainer.max_steps not in (None, -1):
        expected = trainer.max_steps if expected is None else min(expected, trainer.max_steps)
    done = (resumed_step or 0) + module.optimizer_steps
    if expected is None or done >= expected:
        return
    where = f"resumed from '{ckpt_path}' at step {resumed_step}" if ckpt_path else "started afresh"
    raise IncompleteRunError(
        f"the run {where} and stopped at step {done} of the {expected} its schedule has "
        f"(trainer.max_epochs={trainer.max_epochs} of {per_epoch} steps) with nothing left to "
        f"train by its loop state; its checkpoints hold the weights of step {done}: resume from an "
        "earlier checkpoint or report this one as a bug."
    )
