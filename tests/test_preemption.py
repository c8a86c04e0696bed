"""Preemption and exact resume, through train.py in a subprocess with real signals: a run stopped
mid-epoch saves its state and exits non-zero; resumed, it logs exactly the losses of the run that
was never stopped."""

import signal

import pytest
import torch

from helpers.runs import SMALL
from helpers.runs import losses as _losses
from helpers.runs import train as _train


@pytest.mark.slow
# ms_detr is stopped and killed at eight moments in test_resume_exact.py.
@pytest.mark.parametrize("matcher", ["deta"])
def test_sigterm_mid_epoch_then_resume_continues_bit_for_bit(tmp_path, matcher):
    whole = _train(tmp_path, tmp_path / "whole", f"matcher={matcher}", base=SMALL)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = _losses(tmp_path / "whole")
    assert sorted(expected) == list(range(8))

    stopped_dir = tmp_path / "stopped"
    kill = ["+callbacks.kill._target_=helpers.signals.SignalAtStep", "+callbacks.kill.step=1"]
    stopped = _train(tmp_path, stopped_dir, f"matcher={matcher}", *kill, base=SMALL)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    saved = torch.load(
        stopped_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["epoch"] == 0 and 1 <= saved["global_step"] < 4  # mid-epoch
    assert not list((stopped_dir / "checkpoints").glob(".*.tmp"))

    # the requeued job: same directory
    resumed = _train(tmp_path, stopped_dir, f"matcher={matcher}", base=SMALL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming this run" in resumed.stdout + resumed.stderr
    assert _losses(stopped_dir) == expected  # one continuous history, every step equal


@pytest.mark.slow
def test_resume_with_another_matcher_is_refused_in_one_sentence(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(tmp_path, run_dir, "matcher=hungarian", "schedule.epochs=1", base=SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(
        tmp_path,
        tmp_path / "other",
        "matcher=ms_detr",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        base=SMALL,
    )
    assert again.returncode != 0
    assert "cannot resume from" in again.stderr and "Traceback" not in again.stderr
    # the group choice first, then the first key that differs
    assert (
        "it was made with another matcher config (matcher: hungarian -> ms_detr, first at matcher."
        in again.stderr
    )


class _Strategy:
    def __init__(self):
        self.calls = 0

    def reduce_boolean_decision(self, decision, all=True):
        self.calls += 1
        return decision


class _Trainer:
    def __init__(self, world_size: int, batches: int):
        self.world_size, self.num_training_batches = world_size, batches
        self.strategy, self.received_sigterm, self.fast_dev_run = _Strategy(), False, True


@pytest.mark.parametrize("world_size, expected", [(1, 23), (2, 2 + 1)])
def test_ranks_agree_on_stopping_every_n_steps_not_every_step(tmp_path, world_size, expected):
    """Under DDP the agreement is an all-reduce that waits for the GPU: every 10 steps and at an
    epoch's last step (steps 10, 20 and 23 of 23), every step for one process."""
    from msdetr.lit.callbacks import Preemption

    callback, trainer = (
        Preemption(str(tmp_path), check_every_n_steps=10),
        _Trainer(world_size, batches=23),
    )
    for batch_idx in range(23):
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert trainer.strategy.calls == expected
    callback.received = signal.SIGTERM  # noted mid-interval: acted on at the next agreement
    for batch_idx in range(9):
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert callback._saved == (signal.SIGTERM if world_size == 1 else None)
    callback.on_train_batch_end(trainer, None, None, None, 9)
    assert callback._saved == signal.SIGTERM
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        Preemption(str(tmp_path), check_every_n_steps=0)


def test_a_signal_is_acted_on_where_an_optimizer_step_ends(tmp_path):
    """With gradient accumulation a save mid-step would lose the gradients accumulated so far: the
    signal noted in the first of 2 accumulated batches is acted on at the second's end."""
    from msdetr.lit.callbacks import Preemption

    callback, trainer = Preemption(str(tmp_path)), _Trainer(1, batches=8)
    trainer.accumulate_grad_batches = 2
    callback.received = signal.SIGTERM
    callback.on_train_batch_end(trainer, None, None, None, 2)
    assert callback._saved is None and trainer.strategy.calls == 0
    callback.on_train_batch_end(trainer, None, None, None, 3)
    assert callback._saved == signal.SIGTERM
