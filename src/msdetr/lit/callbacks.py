"""Callbacks and plugins: prediction pictures, training throughput, atomic checkpoint writes,
preemption."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchvision.io import write_png

from ..data import collate
from ..files import atomic_write
from ..visualize import tile_grid, validation_tile


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint whose weights are not all finite: it is not written."""


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def check_finite_weights(state_dict: dict, path) -> None:
    """Refuse, in one sentence, weights with a NaN or inf in them (one host read for all
    tensors)."""
    names = [
        k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    if not names:
        return
    finite = torch.stack([torch.isfinite(state_dict[k]).all().cpu() for k in names]).tolist()
    bad = [k for k, ok in zip(names, finite) if not ok]
    if bad:
        raise NonFiniteCheckpointError(
            f"refusing to write '{path}': {len(bad)} of {len(names)} weight tensors are not "
            f"finite (first: {bad[0]}); the checkpoint there before stays as it was."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it: a killed job never leaves a torn
    file, a full disk leaves the previous one intact (`atomic_write`), and weights that are not all
    finite are never written (`check_finite_weights`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        check_finite_weights(checkpoint.get("state_dict", {}), path)
        size = sum(t.numel() * t.element_size() for t in _tensors(checkpoint))
        atomic_write(
            path,
            lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(
                checkpoint, tmp, storage_options
            ),
            size_hint=size,
        )


class LatestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint of the run's latest state (no monitor) that also writes it at the end of
    every
    epoch when `every_n_train_steps` is set: Lightning's triggers exclude each other, so with the
    step trigger alone an epoch's end was saved only when N divided the epoch, and a hard kill lost
    up to N - 1 steps plus the epoch-end validation. `save_last="link"` links last.ckpt to it."""

    def __init__(self, *, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)
        self.steps_between_saves = every_n_train_steps or 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        n = self.steps_between_saves
        if not n or trainer.global_step % n == 0 or trainer.fast_dev_run or trainer.sanity_checking:
            return  # no step trigger, or the step trigger has just saved this state
        if self.dirpath is None:  # set by Lightning when fitting starts
            return
        path = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if self.save_last == "link" and trainer.is_global_zero and not last.exists():
            os.symlink(path.name, last)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint of the best `monitor` value that steps aside, with one warning, when the
    validation did not produce the value (a validation set without boxes leaves every COCO metric
    undefined, and undefined metrics are not logged): Lightning's own raises
    MisconfigurationException and ends the run. The latest checkpoint carries on either way."""

    def _has_monitor(self, trainer) -> bool:
        return self.monitor is None or self.monitor in trainer.callback_metrics

    def _monitor_missing(self, trainer) -> bool:
        """After a validation: True (and one warning per run) if it did not log the monitor."""
        if self._has_monitor(trainer):
            return False
        if not getattr(self, "_warned_missing", False) and not trainer.sanity_checking:
            self._warned_missing = True
            warnings.warn(
                f"no '{self.monitor}' this validation (its annotations have no boxes, so every "
                f"COCO metric is undefined): the best checkpoint ({self.dirpath}) is not written "
                "until there is one; checkpoints/latest.ckpt is written as usual.",
                UserWarning,
                stacklevel=2,
            )
        return True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # The monitor comes from validation: an epoch end before the first one (e.g. with
        # check_val_every_n_epoch > 1) has nothing to save and nothing to warn about.
        if self._has_monitor(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._monitor_missing(trainer):
            super().on_validation_end(trainer, pl_module)


class Throughput(L.Callback):
    """Logs training speed every `log_every_n_steps` optimizer steps: `perf/images_per_sec` (all
    ranks), `perf/peak_mem_gib` (CUDA: peak allocated; CPU: peak resident set) and
    `perf/criterion_share`, the fraction of the step spent in the criterion (matching + losses),
    timed by hooks on the module's criterion while fitting. On CUDA it synchronizes around the step
    and the criterion (so the criterion's time excludes queued forward work), which costs a little
    speed; leave it out of production runs if that matters (callbacks.throughput=null)."""

    def __init__(self, log_every_n_steps: int = 50):
        self.log_every_n_steps = log_every_n_steps
        self._start = 0.0
        self._criterion_start = 0.0
        self._logged_step = -1
        self._window = self._empty_window()
        self._hooks: list = []
        self._device = torch.device("cpu")

    @staticmethod
    def _empty_window() -> dict[str, float]:
        return {"images": 0, "seconds": 0.0, "criterion": 0.0}

    def _clock(self) -> float:
        """Seconds, after the device's queued work is done."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _criterion_started(self, criterion, args) -> None:
        self._criterion_start = self._clock()

    def _criterion_ended(self, criterion, args, output) -> None:
        self._window["criterion"] += self._clock() - self._criterion_start

    def on_fit_start(self, trainer, pl_module) -> None:
        criterion = pl_module.criterion
        # always_call: a step whose matching costs are not finite raises in the criterion; it is
        # skipped, and its time is counted as well.
        self._hooks = [
            criterion.register_forward_pre_hook(self._criterion_started),
            criterion.register_forward_hook(self._criterion_ended, always_call=True),
        ]

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._device = pl_module.device
        self._start = self._clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        w = self._window
        w["seconds"] += self._clock() - self._start
        w["images"] += batch[0].shape[0] * trainer.world_size
        # optimizer steps: with gradient accumulation, several batches each
        step = trainer.global_step
        if step == self._logged_step or (
            step % self.log_every_n_steps and not trainer.fast_dev_run
        ):
            return
        self._logged_step = step
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        pl_module.log_dict(
            {
                "perf/images_per_sec": w["images"] / max(w["seconds"], 1e-9),
                "perf/peak_mem_gib": float(peak),
                "perf/criterion_share": w["criterion"] / max(w["seconds"], 1e-9),
            },
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )
        self._window = self._empty_window()


class PredictionImages(L.Callback):
    """Saves a PNG grid of predictions on the first validation images (GT in white)."""

    def __init__(
        self,
        dirpath: str,
        num_images: int = 4,
        score_threshold: float = 0.3,
        every_n_epochs: int = 0,
        min_side: int = 320,
    ):
        self.dirpath = Path(dirpath)
        self.min_side = min_side
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n > 0 and not trainer.sanity_checking and (trainer.current_epoch + 1) % n == 0:
            self.render(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.render(trainer, pl_module, "final")

    @torch.no_grad()
    def render(self, trainer, pl_module, tag: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        names = getattr(dm, "category_names", None)
        batch = collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
        images, mask, targets = batch
        was_training = pl_module.training
        pl_module.eval()
        outputs = pl_module.model(images.to(pl_module.device), mask.to(pl_module.device))
        pl_module.train(was_training)
        # Boxes at the transformed (unpadded) size, so they land on the tensor drawn.
        sizes = torch.stack([t["size"] for t in targets]).to(pl_module.device)
        dets = pl_module.postprocess(outputs, sizes)
        tiles = [
            validation_tile(img, det, tgt, names, self.score_threshold, self.min_side)
            for img, det, tgt in zip(images, dets, targets)
        ]
        grid = tile_grid(tiles)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"predictions_{tag}.png"
        write_png(grid, str(path))
        self._log_to_loggers(trainer, grid, tag)
        return path

    @staticmethod
    def _log_to_loggers(trainer, grid: torch.Tensor, tag: str) -> None:
        """The picture also goes to loggers that take images (W&B, TensorBoard)."""
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(
                    key="val/predictions",
                    images=[grid.permute(1, 2, 0).numpy()],
                    caption=[tag],
                    step=trainer.global_step,
                )
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/predictions", grid, trainer.global_step)


class Preempted(SystemExit):
    """The run stopped on a signal after saving its state; the exit status is 128 + the signal."""


class Preemption(L.Callback):
    """Stops a run cleanly on SIGTERM, SIGUSR1, SIGUSR2 (what SLURM and submitit send before a
    preemption or time limit) and Ctrl-C, with its state saved.

    The signal is noted; at the end of the running training step (or validation) every rank agrees
    to stop, `checkpoints/last.ckpt` is written atomically with the mid-epoch state (weights,
    optimizer, loop and dataloader position, random states), and then:
    - under SLURM, the job is requeued: a handler that was there before (hydra-submitit-launcher's)
      is called and requeues it through submitit; otherwise `scontrol requeue <job id>`;
    - the process exits with status 128 + signal: a stopped run never reports success.
    A requeued job reruns in its own directory and `auto_resume` continues from last.ckpt.
    Stale temporaries of a save that a hard kill interrupted are removed when a run starts.

    With several ranks the agreement is an all-reduce, which waits for the step's GPU work: it is
    taken every `check_every_n_steps` steps (and at the last step of an epoch and after validation)
    instead of every step. One process decides alone, every step, at no cost.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self, dirpath: str, requeue: bool = True, check_every_n_steps: int = 10):
        if check_every_n_steps < 1:
            raise ValueError(
                f"Preemption: check_every_n_steps={check_every_n_steps}; use 1 or more."
            )
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None
        self._saved: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self._loader_states: list[dict] | None = None
        self._after_data_error = False

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning has installed its own handlers (its SIGTERM one would end the run right
        # after the step with status 0 and nothing saved); the ranks agree to stop instead.
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._note:
                # None: a handler Python did not install; the default is the nearest equivalent.
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
        self.received = self.received or signum

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()
        from ..data.coco import UnreadableImageError

        # An image that fails to decode mid-epoch (a truncated file passes the header check) stops
        # the run, but not before the steps done so far are saved: on COCO that can be hours. The
        # failed fetch comes before the step that would have used it, so the state is a step end.
        # Under DDP only the rank that read the file knows; a save there would wait for the others.
        # (With gradient accumulation the failure may come mid-step, whose gradients no checkpoint
        # holds: the last checkpoint stands.)
        if (
            isinstance(exception, UnreadableImageError)
            and trainer.training
            and not trainer.fast_dev_run
            and trainer.world_size == 1
            and trainer.accumulate_grad_batches == 1
            and self._loader_states is not None
        ):
            # The loader has already drawn the failed batch's indices: its position is put back to
            # the last step's end (on_save_checkpoint), so a resume reads that batch again.
            self._after_data_error = True
            trainer.save_checkpoint(self.ckpt_path)
            rank_zero_info(
                f"saved the run's state after step {trainer.global_step} to {self.ckpt_path}; fix "
                "or remove the image named below, then rerun the command to resume"
            )

    # The decision and the save happen where Lightning's own step checkpoints are taken (the end of
    # a step, the end of validation); the exit comes at the next hook, once the step's metrics are
    # logged, so the history the resumed run continues has no gap.
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._after_data_error:
            loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
            if "combined_loader" in loops:
                loops["combined_loader"] = self._loader_states

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        # Only where an optimizer step ends: the gradients accumulated so far are not in a
        # checkpoint.
        accumulated = (batch_idx + 1) % getattr(trainer, "accumulate_grad_batches", 1) == 0
        if not (accumulated or last_of_epoch):
            return
        # the training loader's position at this step's end (on_exception)
        if trainer.world_size == 1:
            loaders = getattr(trainer, "train_dataloader", None)
            loaders = (
                loaders
                if isinstance(loaders, (list, tuple))
                else [loaders]
                if loaders is not None
                else []
            )
            self._loader_states = [dl.state_dict() for dl in loaders if hasattr(dl, "state_dict")]
        if (
            trainer.world_size == 1
            or last_of_epoch
            or (batch_idx + 1) % self.check_every_n_steps == 0
        ):
            self._save_if_signalled(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._save_if_signalled(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._exit_if_saved(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._exit_if_saved(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._exit_if_saved(trainer)

    def _save_if_signalled(self, trainer) -> None:
        if self._saved is not None:
            return
        local = self.received is not None or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        self._saved = self.received or signal.SIGTERM
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(self.ckpt_path)
            rank_zero_info(
                f"{signal.Signals(self._saved).name}: saved the run's state to {self.ckpt_path}"
            )

    def _exit_if_saved(self, trainer) -> None:
        if self._saved is None:
            return
        if self.requeue and trainer.is_global_zero and SLURMEnvironment.detect():
            self._requeue(self._saved)
        raise Preempted(128 + self._saved)

    def _requeue(self, signum: int) -> None:
        previous = self._previous.get(signum)
        if callable(previous) and signum in (signal.SIGUSR1, signal.SIGUSR2):
            previous(signum, None)  # submitit's handler: it requeues the job (and may exit itself)
            return
        job = SLURMEnvironment.job_id()
        array_job, array_task = (
            os.environ.get("SLURM_ARRAY_JOB_ID"),
            os.environ.get("SLURM_ARRAY_TASK_ID"),
        )
        job_id = f"{array_job}_{array_task}" if array_job and array_task else str(job)
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode:
            rank_zero_info(
                f"scontrol requeue {job_id} failed ({result.stderr.strip()}); resume by hand from "
                f"{self.ckpt_path}."
            )
        else:
            rank_zero_info(f"requeued SLURM job {job_id}")
