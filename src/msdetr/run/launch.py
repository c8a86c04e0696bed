"""What surrounds a fit or validation: under Hydra, DDP ranks > 0 rerun only this job (the one
private Lightning function msdetr replaces, checked first), and afterwards the W&B run, the process
group and the launcher variables Lightning leaves in os.environ are put back, so the next job of a
sweep starts clean (`launch_context`)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..lit.loggers import finish_wandb_run

# Lightning writes these into os.environ when a Trainer starts; left behind, they make the next run
# of the same process (the next job of a Hydra multirun) believe an outside launcher started it.
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")

# The one private attribute of a dependency msdetr touches (see `_rank_launch_patch`): Lightning's
# DDP launcher (its `_SubprocessScriptLauncher`) starts ranks > 0 of a Hydra app with the command
# this module-level function returns.
_LIGHTNING_RANK_COMMAND = (
    "lightning.pytorch.strategies.launchers.subprocess_script",
    "_hydra_subprocess_cmd",
)
_LIGHTNING_TESTED = "2.6"


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
        # Unresolved: ${hydra:...} resolves in the child.
        OmegaConf.save(cfg, config_dir / "config.yaml")
        if __main__.__spec__ is None:
            program = [sys.executable, str(Path(sys.argv[0]).resolve())]
        else:
            program = [sys.executable, "-m", __main__.__spec__.name]
        return [
            *program,
            "--config-path",
            str(config_dir),
            "--config-name",
            "config",
            f"hydra.run.dir={run_dir}",
            "hydra.output_subdir=null",
            f"hydra.job.name={hydra_cfg.job.name}_ddp_rank{local_rank}",
        ], get_original_cwd()

    return command


def _launches_rank_processes(trainer: L.Trainer | None) -> bool:
    """Whether fitting with `trainer` makes Lightning start this node's other rank processes itself
    (DDP on several devices, no torchrun / SLURM having started them)."""
    if trainer is None:
        return True
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return (
        trainer.num_devices > 1
        and trainer.strategy.launcher is not None
        and environment is not None
        and not environment.creates_processes_externally
    )


@contextlib.contextmanager
def _rank_launch_patch(cfg: DictConfig):
    """Within it, Lightning starts DDP ranks > 0 with `_rank_command(cfg)` instead of its own Hydra
    command. Lightning has no public hook for this command, so this replaces a private function;
    it checks first that the function is still there with the signature relied on, and says what
    to do, in one sentence, when a Lightning version changed it."""
    module_name, attribute = _LIGHTNING_RANK_COMMAND
    module = importlib.import_module(module_name)
    original = getattr(module, attribute, None)
    try:
        parameters = list(inspect.signature(original).parameters) if callable(original) else None
        expected = parameters == ["local_rank"]
    except (TypeError, ValueError):
        expected = False
    if not expected:
        raise RuntimeError(
            f"this Lightning version ({L.__version__}) changed how it starts DDP ranks under Hydra "
            f"({module_name}.{attribute}(local_rank) is gone or different), which msdetr "
            f"replaces so that each rank reruns only its own job; msdetr is tested with lightning "
            f"{_LIGHTNING_TESTED}.x: pin lightning=={_LIGHTNING_TESTED}.* or start the ranks with "
            "torchrun (python -m torch.distributed.run)."
        )
    setattr(module, attribute, _rank_command(cfg))
    try:
        yield
    finally:
        setattr(module, attribute, original)


@contextlib.contextmanager
def launch_context(cfg: DictConfig, trainer: L.Trainer | None = None):
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
            # The next job of a sweep gets its own W&B run.
            finish_wandb_run(exit_code=1 if failed else 0)
            # Lightning keeps its process group after fit; the next job of a sweep would reuse it,
            # with peers that have exited.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
