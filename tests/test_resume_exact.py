"""Issue 20, items 0 and 2: a run stopped (SIGTERM) or killed (SIGKILL) at any moment, including
the last step of an epoch, its validation and its epoch-end checkpoint, resumes by rerunning the
command: every remaining step is logged exactly once, with the loss of the run that was never
stopped, and it ends with the same weights, bit for bit."""

import shutil
import signal

import pytest
import torch

from helpers.runs import MS_DETR, losses, train, weights

KILL = "+callbacks.kill._target_=helpers.signals.SignalAtStep"

# (signal, when, after step, extra overrides, what the resumed run starts from)
MOMENTS = [
    ("SIGTERM", "batch_start", 3, [], "the last step of epoch 0"),
    ("SIGTERM", "validation", 4, [], "the epoch-end validation"),
    ("SIGTERM", "save", 4, [], "the epoch-end checkpoint"),
    (
        "SIGKILL",
        "validation",
        4,
        ["callbacks.checkpoint.every_n_train_steps=2"],
        "a step checkpoint at the last step",
    ),
    # a step checkpoint every 3 steps does not replace the epoch-end one (4 steps an epoch)
    (
        "SIGKILL",
        "batch_start",
        5,
        ["callbacks.checkpoint.every_n_train_steps=3"],
        "the epoch-end checkpoint, killed in the next step",
    ),
    # No validation after epoch 0: the settled state is "epoch done" (validation draws nothing from
    # the training's random streams, so the losses and weights are the whole run's all the same).
    (
        "SIGTERM",
        "batch_start",
        3,
        ["trainer.check_val_every_n_epoch=2"],
        "the last step, no validation due",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "signal_name, when, step, extra, moment", MOMENTS, ids=[m[-1] for m in MOMENTS]
)
def test_stop_or_kill_then_resume_is_bit_exact(
    tmp_path, whole, signal_name, when, step, extra, moment
):
    expected_losses, expected_ap, expected_weights = whole
    run_dir = tmp_path / "run"
    stopped = train(
        tmp_path,
        run_dir,
        *extra,
        KILL,
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.when={when}",
        f"+callbacks.kill.signal_name={signal_name}",
        base=MS_DETR,
    )
    signum = getattr(signal, signal_name)
    assert stopped.returncode in (128 + signum, -signum), stopped.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # what a kill during a save leaves behind
    stale = run_dir / "checkpoints" / ".latest.ckpt.12345.tmp"
    stale.write_bytes(b"partial")
    if moment == "the last step of epoch 0":
        _refuses_a_resume_with_nothing_left(tmp_path, run_dir)

    resumed = train(tmp_path, run_dir, *extra, base=MS_DETR)  # the requeued job: the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming this run" in resumed.stdout + resumed.stderr and not stale.exists()
    assert losses(run_dir) == expected_losses  # every step once, each loss equal
    last_epoch_only = "trainer.check_val_every_n_epoch=2" in extra
    # each once
    assert losses(run_dir, "val/AP") == ({7: expected_ap[7]} if last_epoch_only else expected_ap)
    final = weights(run_dir / "checkpoints" / "last.ckpt")
    assert final.keys() == expected_weights.keys()
    assert all(torch.equal(final[k], expected_weights[k]) for k in final)


def _refuses_a_resume_with_nothing_left(tmp_path, run_dir):
    """The loop state this version no longer writes (saved at the end of an epoch's last step, as
    Lightning leaves it): Lightning resumes it as if the schedule were done and trains nothing. The
    run refuses, in one sentence, instead of ending with status 0."""
    from msdetr.lit import loopstate

    legacy = tmp_path / "legacy"
    shutil.copytree(run_dir, legacy, symlinks=True)
    path = legacy / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt.pop(loopstate.KEY) == loopstate.VALIDATION_PENDING
    fit = ckpt["loops"]["fit_loop"]
    for part in ("total", "current"):
        fit["epoch_loop.batch_progress"][part]["completed"] = 3
        fit["epoch_loop.val_loop.batch_progress"][part].update(
            ready=0, started=0, processed=0, completed=0
        )
    fit["epoch_loop.val_loop.batch_progress"]["is_last_batch"] = False
    torch.save(ckpt, path)
    again = train(tmp_path, legacy, base=MS_DETR)
    assert again.returncode != 0
    assert (
        "stopped at step 4 of the 8 its schedule has" in again.stderr
        and "Traceback" not in again.stderr
    )
