"""What train.py and evaluate.py do, from a composed Hydra config (the only place DictConfig is read)."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from .checkpoints import load_weights
from .files import atomic_write
from .config_schema import ConfigValidationError
from .official import read_checkpoint_file
from .lit import DetectionModule, loopstate
from .lit.module import CompileOptions, DivergedError, LRSchedule, ParamGroups
from .lit.callbacks import AtomicCheckpointIO, Preempted
from .lit.loggers import check_installed, finish_wandb_run, hydra_job, wandb_group

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


# The one private attribute of a dependency msdetr touches (see `_rank_launch_patch`): Lightning's
# DDP launcher (its `_SubprocessScriptLauncher`) starts ranks > 0 of a Hydra app with the command
# this module-level function returns.
_LIGHTNING_RANK_COMMAND = ("lightning.pytorch.strategies.launchers.subprocess_script", "_hydra_subprocess_cmd")
_LIGHTNING_TESTED = "2.6"


def _launches_rank_processes(trainer: L.Trainer | None) -> bool:
    """Whether fitting with `trainer` makes Lightning start this node's other rank processes itself
    (DDP on several devices, no torchrun / SLURM having started them)."""
    if trainer is None:
        return True
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return (trainer.num_devices > 1 and trainer.strategy.launcher is not None and environment is not None
            and not environment.creates_processes_externally)


@contextlib.contextmanager
def _rank_launch_patch(cfg: DictConfig):
    """Within it, Lightning starts DDP ranks > 0 with `_rank_command(cfg)` instead of its own Hydra
    command. Lightning has no public hook for this command, so this replaces a private function;
    it checks first that the function is still there with the signature relied on, and says what
    to do, in one sentence, when a Lightning version changed it."""
    import importlib
    import inspect

    module_name, attribute = _LIGHTNING_RANK_COMMAND
    module = importlib.import_module(module_name)
    original = getattr(module, attribute, None)
    try:
        expected = callable(original) and list(inspect.signature(original).parameters) == ["local_rank"]
    except (TypeError, ValueError):
        expected = False
    if not expected:
        raise RuntimeError(
            f"this Lightning version ({L.__version__}) changed how it starts DDP ranks under Hydra "
            f"({module_name}.{attribute}(local_rank) is gone or different), which msdetr replaces so that each "
            f"rank reruns only its own job; msdetr is tested with lightning {_LIGHTNING_TESTED}.x: pin "
            f"lightning=={_LIGHTNING_TESTED}.* or start the ranks with torchrun (python -m torch.distributed.run).")
    setattr(module, attribute, _rank_command(cfg))
    try:
        yield
    finally:
        setattr(module, attribute, original)


@contextlib.contextmanager
def _launch_context(cfg: DictConfig, trainer: L.Trainer | None = None):
    """Around a fit / validate: when Lightning starts the DDP ranks itself under Hydra, rank > 0
    processes rerun this job only (see `_rank_command`, `_rank_launch_patch`); after it, the W&B run
    is ended, the process group is closed and the launcher variables Lightning leaves in os.environ
    are restored, so the next job of a sweep starts clean."""
    from hydra.core.hydra_config import HydraConfig

    saved = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    with contextlib.ExitStack() as stack:
        if HydraConfig.initialized() and _launches_rank_processes(trainer):
            stack.enter_context(_rank_launch_patch(cfg))
        failed = True
        try:
            yield
            failed = False
        finally:
            finish_wandb_run(exit_code=1 if failed else 0)  # the next job of a sweep gets its own W&B run
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
    """The config as plain values (what a checkpoint stores and the loggers get as hyperparameters);
    a value that does not resolve (Hydra's `${hydra:...}` outside a Hydra app, a missing `???`)
    stays as written, every other one is resolved."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return _resolve_each(cfg)


def _resolve_each(node):
    """`_plain_config` key by key: what resolves is resolved, the rest stays as written."""
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
    groups = ParamGroups(lr=optim.lr, lr_backbone=optim.lr_backbone,
                         lr_linear_proj_mult=optim.lr_linear_proj_mult)
    # The optimizer and the LR scheduler: `_partial_` configs called with the parameter groups / the
    # optimizer (schedule.lr_scheduler=null: a constant learning rate).
    scheduler = cfg.schedule.lr_scheduler
    schedule = (LRSchedule(instantiate(scheduler), cfg.schedule.get("lr_interval", "epoch"))
                if scheduler is not None else None)
    # torch.compile of the detector, applied by the module's configure_model (configs without
    # these keys: eager)
    model_cfg = cfg.model
    compile_options = CompileOptions(mode=model_cfg.get("compile_mode"),
                                     dynamic=model_cfg.get("compile_dynamic", True),
                                     backend=model_cfg.get("compile_backend", "inductor"))
    return DetectionModule(
        model, criterion, postprocess, optimizer=instantiate(cfg.schedule.optimizer),
        lr_scheduler=schedule, param_groups=groups,
        compile_options=compile_options if model_cfg.get("compile", False) else None,
        seed=cfg.get("seed"), eval_backend=cfg.get("eval_backend", "pycocotools"),
        max_consecutive_skipped_steps=cfg.get("max_consecutive_skipped_steps", 5))


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
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # The Preemption callback saves at a step boundary and requeues; Lightning's own SLURM
        # requeue would save a second, mid-step checkpoint elsewhere.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, **overrides)


_RESUME_MUST_MATCH = ("matcher", "model")  # the matcher first: it also sets model options
# How the model runs, not what it is: a resume may change these (and checkpoints from before they existed lack them).
_RESUME_MAY_CHANGE = {"model.compile", "model.compile_mode", "model.compile_dynamic", "model.compile_backend",
                      "model.attn_backend"}
# ...and the layers' copies of model.attn_backend (the config is compared with interpolations resolved)
_RESUME_MAY_CHANGE_LEAVES = {"attn_backend"}


def _first_difference(saved, current, path: str = ""):
    """The first key path where two plain configs differ, with both values (None if equal)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        # Values before sections: a shared size (model.num_queries) is named rather than its
        # interpolated copy inside a part (model.detector.queries.num_queries).
        def order(key):
            return isinstance(saved.get(key), dict) or isinstance(current.get(key), dict), str(key)

        for key in sorted(set(saved) | set(current), key=order):
            if (f"{path}.{key}" if path else str(key)) in _RESUME_MAY_CHANGE or key in _RESUME_MAY_CHANGE_LEAVES:
                continue
            found = _first_difference(saved.get(key, "<absent>"), current.get(key, "<absent>"),
                                      f"{path}.{key}" if path else str(key))
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
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra")}


def check_resume_config(cfg: DictConfig, ckpt_path: str | Path) -> int:
    """Refuse, in one sentence and before the model is built, to resume a checkpoint made with
    another model or matcher config; return the checkpoint's global step."""
    ckpt = read_checkpoint_file(ckpt_path, "a checkpoint to resume", mmap=True)
    saved = ckpt.get("msdetr_config") if isinstance(ckpt, dict) else None
    step = int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    if any(k.startswith("model.transformer.") for k in state):
        # Its optimizer state lists the parameters in the old order; the weights alone still load.
        raise ValueError(
            f"cannot resume from '{ckpt_path}': it was saved before msdetr composed the detector of parts, so its "
            "optimizer state does not fit; start a new run from its weights with init_from=<checkpoint>.")
    if not saved:
        return step
    current = _plain_config(cfg)
    saved_choices, choices = ckpt.get("msdetr_choices") or {}, config_choices()
    for group in _RESUME_MUST_MATCH:
        found = _first_difference(saved.get(group), current.get(group), group)
        if found:
            key, was, now = found
            before, after = saved_choices.get(group), choices.get(group)
            chosen = (f"{group}: {before} -> {after}, first at " if before and after and before != after else "")
            raise ValueError(
                f"cannot resume from '{ckpt_path}': it was made with another {group} config ({chosen}{key}: "
                f"{was!r} -> {now!r}); resume with the config the run started with (or start a new run with "
                "init_from=<checkpoint>)."
            )
    return step


def continue_csv_history(trainer: L.Trainer, resumed_step: int, revalidates: bool = False) -> None:
    """Lightning's CSVLogger starts its metrics file afresh; a resumed run logs the rows of the steps
    before `resumed_step` again first, so the file stays one history (rows the interrupted run wrote
    after its checkpoint are dropped: the resumed run logs those steps anew). `revalidates`: the
    checkpoint was taken before its epoch's validation ended, which the resumed run runs again, so
    the validation values logged at the epoch's last step are dropped too."""
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
            logger.log_metrics({k: float(v) for k, v in row.items() if v not in ("", None)}, step=step)
        logger.save()


def _settled_loop_state(ckpt_path: str | Path) -> str | None:
    """What `loopstate.settle_epoch_end` made of the checkpoint's loop state (None: left as written)."""
    ckpt = read_checkpoint_file(ckpt_path, "a checkpoint to resume", mmap=True)
    return ckpt.get(loopstate.KEY) if isinstance(ckpt, dict) else None


class IncompleteRunError(RuntimeError):
    """A fit that returned normally short of its schedule."""


def check_nothing_skipped(trainer: L.Trainer, module: DetectionModule, ckpt_path: str | Path | None,
                          resumed_step: int | None) -> None:
    """After a fit that returned normally: refuse, in one sentence, a run that stopped short of its
    schedule although nothing asked it to stop (a resume whose loop state said the schedule was done
    when it was not), so that it never ends with status 0. The steps are counted as the module saw
    them (the checkpoint's step + the optimizer steps of this process): Lightning's own global step
    counts the skipped epoch as done."""
    if trainer.interrupted or trainer.should_stop or trainer.num_training_batches in (0, float("inf")):
        return
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    expected = trainer.max_epochs * per_epoch if trainer.max_epochs not in (None, -1) else None
    if trainer.max_steps not in (None, -1):
        expected = trainer.max_steps if expected is None else min(expected, trainer.max_steps)
    done = (resumed_step or 0) + module.optimizer_steps
    if expected is None or done >= expected:
        return
    where = (f"resumed from '{ckpt_path}' at step {resumed_step}" if ckpt_path else "started afresh")
    raise IncompleteRunError(
        f"the run {where} and stopped at step {done} of the {expected} its schedule has "
        f"(trainer.max_epochs={trainer.max_epochs} of {per_epoch} steps) with nothing left to train by its loop "
        f"state; its checkpoints hold the weights of step {done}: resume from an earlier checkpoint or "
        "report this one as a bug.")


def _resumed_run_dir(ckpt_path: str | Path) -> Path | None:
    """The run directory of `<run dir>/checkpoints/<file>.ckpt`, where a resume keeps writing."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


# Written into the run directory when training ends; `python -m msdetr.report` reads it.
RUN_SUMMARY = "run_summary.json"


def write_run_summary(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float], wall_time_s: float,
                      status: str | None = None) -> None:
    """`<run dir>/run_summary.json`: how the run ended (`status`: completed, interrupted (Ctrl-C),
    stopped (a signal; it resumes), diverged, failed), its wall time (this process, from the start
    of `train`), epochs, steps, final validation metrics (NaN: null) and its W&B group, if it logged to W&B."""
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


def train(cfg: DictConfig) -> dict[str, float]:
    started = time.monotonic()
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path '{ckpt_path}' does not exist; point it at a run's checkpoints/last.ckpt.")
    own_last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not ckpt_path and cfg.get("auto_resume") and own_last.is_file():
        # The run directory already has a checkpoint: a SLURM requeue (or a rerun) of this job.
        ckpt_path = str(own_last)
        log.info("resuming this run from %s", own_last)
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)  # num_classes may come from the data: compare after it is known
    resumed_step = None
    if ckpt_path:
        resumed_step = check_resume_config(cfg, ckpt_path)
        run_dir = _resumed_run_dir(ckpt_path)
        if run_dir is not None and run_dir != Path(cfg.paths.output_dir).resolve():
            # One run, one directory: checkpoints, metrics and pictures continue where they were.
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir)
            log.info("resuming into the run directory %s", run_dir)
    module = build_module(cfg)
    module.run_config = _plain_config(cfg)
    module.config_choices = config_choices()
    module.category_names = dm.category_names
    trainer = build_trainer(cfg, resumed_step=resumed_step)
    if resumed_step is not None:
        continue_csv_history(trainer, resumed_step, _settled_loop_state(ckpt_path) == loopstate.VALIDATION_PENDING)
    if cfg.get("init_from") and not ckpt_path:
        # Fine-tuning: class heads of another class count (or all of them, init_reset_class_heads)
        # keep their fresh initialisation, with a warning; anything else must match.
        load_weights(module, cfg.init_from, fine_tune=True,
                     reset_class_heads=bool(cfg.init_reset_class_heads))
        log.info("initialised from %s", cfg.init_from)
    status = "failed"  # until the fit says otherwise; the summary is written however the run ends
    try:
        with _launch_context(cfg, trainer):
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
        message = (f"optimized_metric={name} has no value: the run ended without a validation (set "
                   "trainer.check_val_every_n_epoch to divide schedule.epochs).")
        if hydra_job()[0] is not None:  # a job of a multirun: a sweeper may be waiting for the value
            raise ConfigValidationError(message)
        log.warning(message)
        return None
    raise ConfigValidationError(f"optimized_metric={name} is not a metric of this run; its final validation "
                                f"gave {', '.join(sorted(produced))}.")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    module.run_config = _plain_config(cfg)  # what the loggers get as hyperparameters
    load_weights(module, cfg.ckpt_path)
    trainer = build_trainer(cfg)
    with _launch_context(cfg, trainer):
        trainer.validate(module, datamodule=dm)
    return dict(module.last_metrics)
