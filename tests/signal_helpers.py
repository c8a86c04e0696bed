"""A callback the preemption tests inject into train.py (tests/ is on its PYTHONPATH there): it sends
the training process a real signal once a given optimizer step has finished."""
import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step = step
        self.signum = getattr(signal, signal_name)
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
