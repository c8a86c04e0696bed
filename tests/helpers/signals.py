"""Callbacks the preemption and fault tests inject into train.py (tests/ is on its PYTHONPATH
there). SignalAtStep sends the training process a real signal at a chosen moment, once `step`
optimizer steps have finished:
- when=batch_end: at the end of a training step (after the callbacks listed before it ran),
- when=batch_start: at the start of a training step, so it lands during that step,
- when=validation: at the start of a validation batch,
- when=save: while a checkpoint is being written."""

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM", when: str = "batch_end"):
        self.step = step
        self.signum = getattr(signal, signal_name)
        self.when = when
        self.sent = False

    def _send(self, trainer, when: str) -> None:
        if (
            when == self.when
            and trainer.global_step >= self.step
            and not self.sent
            and not trainer.sanity_checking
        ):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._send(trainer, "batch_end")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._send(trainer, "batch_start")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send(trainer, "validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._send(trainer, "save")


class TruncateImagesAtStep(L.Callback):
    """Once `step` optimizer steps are done, cuts every image file in `folder` to half its size
    (their headers stay intact, as with a truncated JPEG): the next batch the loader reads fails."""

    def __init__(self, step: int, folder: str):
        self.step = step
        self.folder = folder
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.done:
            self.done = True
            for name in os.listdir(self.folder):
                path = os.path.join(self.folder, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
