"""Logger factories for the Hydra `logger` group (W&B with a run id that survives resumes, grouped
by sweep), and the check that a chosen logger's package is installed."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

ID_FILE = "wandb_id.txt"
WANDB_GROUP_MAX = 128


def run_id_for(save_dir: str | Path, resume_from: str | None = None) -> str:
    """The W&B run id of this run: the resumed run's (read from `<its run dir>/wandb_id.txt`, the
    run dir being the parent of its `checkpoints/`), else this run dir's, else a new one. It is
    written to this run dir so that a later resume (or a SLURM requeue) finds it."""
    save_dir = Path(save_dir)
    candidates = [save_dir / ID_FILE]
    if resume_from:
        candidates.insert(0, Path(resume_from).resolve().parent.parent / ID_FILE)
    run_id = next(
        (p.read_text().strip() for p in candidates if p.is_file()), None
    ) or secrets.token_hex(4)
    # Only rank 0 talks to W&B; other ranks must not overwrite its id. Lightning sets
    # `rank_zero_only.rank` when it is imported (0 outside a distributed run).
    if getattr(rank_zero_only, "rank", 0) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / ID_FILE).write_text(run_id + "\n")
    return run_id


# The package each logger needs (any one of them), and the extra that installs it.
_NEEDS = {
    "lightning.pytorch.loggers.TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
    "msdetr.lit.loggers.wandb_logger": (("wandb",), "wandb"),
}


def check_installed(name: str, target: str) -> None:
    """Raise ImportError, in one sentence naming the extra to install, when the logger `name` (its
    config's `_target_` is `target`) needs a package that is not installed."""
    packages, extra = _NEEDS.get(target, ((), None))
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ImportError(
            f"logger={name} needs the {packages[0]} package; install it with "
            f"pip install 'msdetr[{extra}]' (or leave {name} out of logger=...)."
        )


def hydra_job() -> tuple[str | None, str | None]:
    """(the sweep directory when this is a job of a Hydra multirun, else None; Hydra's job name),
    both None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None, None
    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    sweep = str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return sweep, hydra_cfg.job.name


def wandb_logger(
    save_dir: str,
    project: str = "msdetr",
    name: str | None = None,
    resume_from: str | None = None,
    group: str | None = None,
    **kwargs,
):
    """Lightning's WandbLogger (online, or offline with WANDB_MODE=offline) continuing the same run
    on resume. An empty `name` is Hydra's job name (or, outside Hydra, W&B's pick); `group` None is
    the sweep directory for the jobs of a Hydra multirun (so a sweep's runs share a group; its last
    128 characters, W&B's limit) and no group for a single run. Extra keyword arguments go to
    WandbLogger / wandb.init (entity, tags, ...)."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as exc:
        raise ImportError(
            "logger=wandb needs the wandb package; install it with pip install 'msdetr[wandb]' "
            "(or pick logger=csv / logger=tensorboard)."
        ) from exc
    run_id = run_id_for(save_dir, resume_from)
    job_name = hydra_job()[1]
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name or job_name or None,
        id=run_id,
        resume="allow",
        group=wandb_group(group),
        **kwargs,
    )


def wandb_group(group: str | None = None) -> str | None:
    """The W&B group of this run: `group` when set, else the sweep directory (its last 128
    characters, W&B's limit) for a job of a Hydra multirun, else None. The sweep report logs into
    the same group."""
    sweep = hydra_job()[0]
    if group is None and sweep:
        group = sweep[-WANDB_GROUP_MAX:]
    return group or None


def finish_wandb_run(exit_code: int = 0) -> None:
    """End the W&B run this process has open, if any. Lightning's WandbLogger leaves it open after
    fit, and a new WandbLogger in the same process reuses an open run: without this, every job of a
    sweep run by Hydra's basic launcher (one process) would log into the first job's run."""
    wandb = sys.modules.get("wandb")  # not imported: no run to end
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
