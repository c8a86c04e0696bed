"""Logger factories for the Hydra `logger` group (W&B with a run id that survives resumes)."""
from __future__ import annotations

import secrets
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

ID_FILE = "wandb_id.txt"


def run_id_for(save_dir: str | Path, resume_from: str | None = None) -> str:
    """The W&B run id of this run: the resumed run's (read from `<its run dir>/wandb_id.txt`, the
    run dir being the parent of its `checkpoints/`), else this run dir's, else a new one. It is
    written to this run dir so that a later resume (or a SLURM requeue) finds it."""
    save_dir = Path(save_dir)
    candidates = [save_dir / ID_FILE]
    if resume_from:
        candidates.insert(0, Path(resume_from).resolve().parent.parent / ID_FILE)
    run_id = next((p.read_text().strip() for p in candidates if p.is_file()), None) or secrets.token_hex(4)
    if rank_zero_only.rank == 0:  # only rank 0 talks to W&B; other ranks must not overwrite its id
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / ID_FILE).write_text(run_id + "\n")
    return run_id


def wandb_logger(save_dir: str, project: str = "msdetr", name: str | None = None, resume_from: str | None = None,
                 **kwargs):
    """Lightning's WandbLogger (online, or offline with WANDB_MODE=offline) continuing the same run
    on resume; an empty `name` lets W&B pick one. Extra keyword arguments go to WandbLogger / wandb.init (entity, tags, group, ...)."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as exc:
        raise ImportError("logger=wandb needs the wandb package; install it with pip install 'msdetr[wandb]' "
                          "(or pick logger=csv / logger=tensorboard).") from exc
    run_id = run_id_for(save_dir, resume_from)
    return WandbLogger(save_dir=save_dir, project=project, name=name or None, id=run_id, resume="allow", **kwargs)
