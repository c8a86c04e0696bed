"""Preemption and exact resume, through train.py in a subprocess with real signals: a run stopped
mid-epoch saves its state and exits non-zero; resumed, it logs exactly the losses of the run that
was never stopped."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# 8 training images in batches of 2: 4 steps an epoch, 2 epochs, validation after each.
RUN = [
    "model.num_queries=12", "model.hidden_dim=32", "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=2", "model.dim_feedforward=32", "model.postprocess.num_select=12",
    "model.detector.backbone.pretrained=false", "data.synthetic_train=8", "data.synthetic_val=2",
    "data.batch_size=2", "data.num_workers=0", "data.train_scales=[64,80]", "data.max_size=96",
    "data.crop_resize=[64]", "data.crop_size=[48,64]", "data.eval_size=64", "schedule.epochs=2",
    "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
    "trainer.devices=1", "logger=csv", "callbacks.predictions=null", "callbacks.throughput=null",
]
_LAUNCHER_VARS = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS"}


def _train(tmp_path: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]), HYDRA_FULL_ERROR="0")
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, f"paths.data_root={tmp_path / 'data'}",
           f"hydra.run.dir={run_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)


def _losses(run_dir: Path) -> dict[int, float]:
    (path,) = (run_dir / "csv").rglob("metrics.csv")
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                step = int(row["step"])
                assert step not in out, f"step {step} logged twice"
                out[step] = float(row["train/loss"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("matcher", ["ms_detr", "deta"])
def test_sigterm_mid_epoch_then_resume_continues_bit_for_bit(tmp_path, matcher):
    whole = _train(tmp_path, tmp_path / "whole", f"matcher={matcher}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = _losses(tmp_path / "whole")
    assert sorted(expected) == list(range(8))

    stopped_dir = tmp_path / "stopped"
    kill = ["+callbacks.kill._target_=signal_helpers.SignalAtStep", "+callbacks.kill.step=1"]
    stopped = _train(tmp_path, stopped_dir, f"matcher={matcher}", *kill)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    saved = torch.load(stopped_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and 1 <= saved["global_step"] < 4  # mid-epoch
    assert not list((stopped_dir / "checkpoints").glob(".*.tmp"))

    resumed = _train(tmp_path, stopped_dir, f"matcher={matcher}")  # the requeued job: same directory
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming this run" in resumed.stdout + resumed.stderr
    assert _losses(stopped_dir) == expected  # one continuous history, every step equal


@pytest.mark.slow
def test_resume_with_another_matcher_is_refused_in_one_sentence(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(tmp_path, run_dir, "matcher=hungarian", "schedule.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(tmp_path, tmp_path / "other", "matcher=ms_detr",
                   f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert again.returncode != 0
    assert "cannot resume from" in again.stderr and "it was made with matcher." in again.stderr


@pytest.mark.slow
def test_hard_kill_resumes_from_the_step_checkpoint(tmp_path):
    """SIGKILL cannot be caught: the run continues from the last every-N-steps checkpoint, which
    last.ckpt links to; the rows the killed run logged after it are logged once, by the resume."""
    whole = _train(tmp_path, tmp_path / "whole", "matcher=ms_detr")
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = _losses(tmp_path / "whole")

    run_dir = tmp_path / "killed"
    steps = ["callbacks.checkpoint.every_n_train_steps=2"]
    killed = _train(tmp_path, run_dir, "matcher=ms_detr", *steps,
                    "+callbacks.kill._target_=signal_helpers.SignalAtStep", "+callbacks.kill.step=3",
                    "+callbacks.kill.signal_name=SIGKILL")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "last.ckpt").is_symlink()
    assert (checkpoints / "last.ckpt").resolve() == (checkpoints / "latest.ckpt").resolve()
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    stale = checkpoints / ".latest.ckpt.12345.tmp"  # what a kill during a save leaves behind
    stale.write_bytes(b"partial")

    resumed = _train(tmp_path, run_dir, "matcher=ms_detr", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not stale.exists()
    assert _losses(run_dir) == expected


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

    callback, trainer = Preemption(str(tmp_path), check_every_n_steps=10), _Trainer(world_size, batches=23)
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
