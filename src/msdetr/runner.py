"""What train.py and evaluate.py do, from a composed Hydra config (the only place DictConfig is read)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoints import load_weights
from .lit import DetectionModule
from .lit.callbacks import AtomicCheckpointIO

log = logging.getLogger("msdetr")

# Lightning writes these into os.environ when a Trainer starts; left behind, they make the next run
# of the same process (the next job of a Hydra multirun) believe an outside launcher started it.
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def _rank_command(cfg: DictConfig):
    """What Lightning runs for DDP ranks > 0 under Hydra. Lightning's own command reruns sys.argv:
    inside a multirun that re-enters the whole sweep, with a relative run dir that is not the job's.
    This reruns exactly this job instead: its saved config, in its own absolute directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    def command(local_rank: int) -> tuple[list[str], str]:
        import __main__

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
        config_dir = run_dir / ".ddp"
        config_dir.mkdir(exist_ok=True)
        OmegaConf.save(cfg, config_dir / "config.yaml")  # unresolved: ${hydra:...} resolves in the child
        if __main__.__spec__ is None:
            program = [sys.executable, str(Path(sys.argv[0]).resolve())]
        else:
            program = [sys.executable, "-m", __main__.__spec__.name]
        return [*program, "--config-path", str(config_dir), "--config-name", "config", f"hydra.run.dir={run_dir}",
                "hydra.output_subdir=null", f"hydra.job.name={hydra_cfg.job.name}_ddp_rank{local_rank}"], \
            get_original_cwd()

    return command


@contextlib.contextmanager
def _launch_context(cfg: DictConfig):
    """Around a fit / validate: rank > 0 processes rerun this job only (see `_rank_command`); after
    it, the process group is closed and the launcher variables Lightning leaves in os.environ are
    restored, so the next job of a sweep starts clean."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.strategies.launchers import subprocess_script

    saved = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    original = subprocess_script._hydra_subprocess_cmd
    if HydraConfig.initialized():
        subprocess_script._hydra_subprocess_cmd = _rank_command(cfg)
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original
        # Lightning keeps its process group after fit; the next job of a sweep would reuse it,
        # with peers that have exited.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plain_config(cfg: DictConfig) -> dict:
    """The config as plain values (what a checkpoint stores); unresolvable interpolations (Hydra's,
    outside a Hydra app) stay as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def build_datamodule(cfg: DictConfig):
    dm = instantiate(cfg.data)
    if cfg.data.get("num_classes") is None:
        # Custom datasets: num_classes = max category id + 1, read from the annotation file.
        with open_dict(cfg):
            cfg.data.num_classes = dm.infer_num_classes()
        dm.num_classes = cfg.data.num_classes
        log.info("num_classes=%d from the annotation file", cfg.data.num_classes)
    return dm


def build_module(cfg: DictConfig) -> DetectionModule:
    model = instantiate(cfg.model.detector)
    criterion = instantiate(cfg.matcher.criterion)
    postprocess = instantiate(cfg.model.postprocess)
    optim = OmegaConf.to_container(cfg.schedule.optim, resolve=True)
    return DetectionModule(model, criterion, postprocess, eval_backend=cfg.get("eval_backend", "pycocotools"),
                           seed=cfg.get("seed"), **optim)


def build_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or [])]
    if not loggers:  # logger=none: the learning-rate monitor would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                       plugins=[AtomicCheckpointIO()], **overrides)


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    module.run_config = _plain_config(cfg)
    module.category_names = dm.category_names
    trainer = build_trainer(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path '{ckpt_path}' does not exist; point it at a run's checkpoints/last.ckpt.")
    own_last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not ckpt_path and cfg.get("auto_resume") and own_last.is_file():
        # The run directory already has a checkpoint: a SLURM requeue (or a rerun) of this job.
        ckpt_path = str(own_last)
        log.info("resuming this run from %s", own_last)
    if cfg.get("init_from") and not ckpt_path:
        # Fine-tuning: class heads of another class count (or all of them, init_reset_class_heads)
        # keep their fresh initialisation, with a warning; anything else must match.
        load_weights(module, cfg.init_from, fine_tune=True,
                     reset_class_heads=bool(cfg.init_reset_class_heads))
        log.info("initialised from %s", cfg.init_from)
    with _launch_context(cfg):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    metrics = dict(module.last_metrics)
    if trainer.is_global_zero and metrics:
        log.info("final validation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    load_weights(module, cfg.ckpt_path)
    trainer = build_trainer(cfg)
    with _launch_context(cfg):
        trainer.validate(module, datamodule=dm)
    return dict(module.last_metrics)
