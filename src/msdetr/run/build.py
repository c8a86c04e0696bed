"""The run's objects built from a composed Hydra config: the datamodule, the `DetectionModule`
(detector, criterion, post-processing, optimizer settings), the loggers and the Trainer; and the
config as plain values, as checkpoints and loggers keep it."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ..lit import DetectionModule
from ..lit.callbacks import AtomicCheckpointIO
from ..lit.loggers import check_installed
from ..lit.module import CompileOptions, LRSchedule, ParamGroups

log = logging.getLogger("msdetr")


def plain_config(cfg: DictConfig) -> dict:
    """The config as plain values (what a checkpoint stores and the loggers get as hyperparameters);
    a value that does not resolve (Hydra's `${hydra:...}` outside a Hydra app, a missing `???`)
    stays as written, every other one is resolved."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(plain, dict), "a run's config is a mapping"
        return plain
    except Exception:
        return _resolve_each(cfg)


def _resolve_each(node):
    """`plain_config` key by key: what resolves is resolved, the rest stays as written."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    written = OmegaConf.to_container(node, resolve=False)
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    out = {} if isinstance(node, DictConfig) else []
    for key in keys:
        try:
            value = _resolve_each(node[key])
        except Exception:
            value = written[key]
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def build_datamodule(cfg: DictConfig):
    dm = instantiate(cfg.data, seed=cfg.get("seed"))
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
    optim = cfg.schedule.optim
    groups = ParamGroups(
        lr=optim.lr, lr_backbone=optim.lr_backbone, lr_linear_proj_mult=optim.lr_linear_proj_mult
    )
    # The optimizer and the LR scheduler: `_partial_` configs called with the parameter groups / the
    # optimizer (schedule.lr_scheduler=null: a constant learning rate).
    scheduler = cfg.schedule.lr_scheduler
    schedule = (
        LRSchedule(instantiate(scheduler), cfg.schedule.get("lr_interval", "epoch"))
        if scheduler is not None
        else None
    )
    # torch.compile of the detector, applied by the module's configure_model (configs without
    # these keys: eager)
    model_cfg = cfg.model
    compile_options = CompileOptions(
        mode=model_cfg.get("compile_mode"),
        dynamic=model_cfg.get("compile_dynamic", True),
        backend=model_cfg.get("compile_backend", "inductor"),
    )
    return DetectionModule(
        model,
        criterion,
        postprocess,
        optimizer=instantiate(cfg.schedule.optimizer),
        lr_scheduler=schedule,
        param_groups=groups,
        compile_options=compile_options if model_cfg.get("compile", False) else None,
        seed=cfg.get("seed"),
        eval_backend=cfg.get("eval_backend", "pycocotools"),
        max_consecutive_skipped_steps=cfg.get("max_consecutive_skipped_steps", 5),
    )


def build_loggers(cfg: DictConfig, resumed_step: int | None = None) -> list:
    """The `logger` group's loggers, keyed by name (logger=[csv,wandb] composes both; a key set to
    null is left out). A logger whose package is missing stops the run here, before any of them
    starts, in one sentence naming the extra to install. A resumed run's TensorBoard writer purges
    the events at or after `resumed_step` that the interrupted run wrote after its checkpoint
    (SummaryWriter's purge_step), so a hard kill does not show those steps twice."""
    chosen = {name: c for name, c in (cfg.get("logger") or {}).items() if c is not None}
    for name, c in chosen.items():
        check_installed(name, c.get("_target_", ""))
    loggers = []
    for c in chosen.values():
        tensorboard = c.get("_target_", "").endswith("TensorBoardLogger")
        extra = {"purge_step": resumed_step} if tensorboard and resumed_step is not None else {}
        loggers.append(instantiate(c, **extra))
    return loggers


def build_trainer(cfg: DictConfig, resumed_step: int | None = None, **overrides) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = build_loggers(cfg, resumed_step)
    if not loggers:  # logger=none: the learning-rate monitor would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if overrides.get("fast_dev_run", cfg.trainer.get("fast_dev_run")):
        # A smoke test writes no checkpoint (Lightning's ModelCheckpoint still writes last.ckpt at
        # the end of a fast_dev_run when save_last is set).
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # The Preemption callback saves at a step boundary and requeues; Lightning's own SLURM
        # requeue would save a second, mid-step checkpoint elsewhere.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, **overrides
    )
