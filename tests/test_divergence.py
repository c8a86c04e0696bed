"""Issue 20, item 1: a step whose loss or gradients are not finite is skipped with the weights and
    the
optimizer state untouched; too many in a row stop the run non-zero; no checkpoint ever holds
non-finite weights; the sweep report never bolds a diverged job."""

import json
import math

import pytest
import torch

from helpers.config import compose
from helpers.runs import SMALL, losses, train
from msdetr.lit.callbacks import AtomicCheckpointIO, NonFiniteCheckpointError
from msdetr.lit.module import DivergedError
from msdetr.run.build import build_module

TINY_MODEL = [o for o in SMALL if o.startswith("model.")]


@pytest.fixture(scope="module")
def module():
    cfg = compose(
        *TINY_MODEL, "data.num_classes=5", "matcher=ms_detr", "max_consecutive_skipped_steps=3"
    )
    return build_module(cfg)


def _step(module, optimizer, loss: float, grad: float) -> None:
    """What the Trainer does around on_before_optimizer_step: backward has filled the gradients."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, grad)
    module._step_loss = torch.tensor(loss)
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad()


def test_non_finite_steps_leave_weights_and_optimizer_state_untouched(module):
    optimizer = module.configure_optimizers()["optimizer"]
    _step(module, optimizer, 1.0, 0.01)  # a good step: the optimizer has state now
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    # NaN gradients; a finite gradient of an inf loss
    for loss, grad in [(1.0, math.nan), (math.inf, 0.01)]:
        _step(module, optimizer, loss, grad)
    assert module.skipped_steps == 2 and module.consecutive_skips == 2
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())
    _step(module, optimizer, 1.0, 0.01)  # a good step resets the run of skips
    assert module.consecutive_skips == 0 and module.skipped_steps == 2
    for _ in range(2):
        _step(module, optimizer, math.nan, math.nan)
    with pytest.raises(DivergedError, match="training diverged: 3 steps in a row"):
        _step(module, optimizer, math.nan, math.nan)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    path = tmp_path / "latest.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(
        NonFiniteCheckpointError,
        match=r"refusing to write .*1 of 2 weight tensors are not finite "
        r"\(first: b\)",
    ):
        io.save_checkpoint(
            {"state_dict": {"w": torch.ones(3), "b": torch.tensor([1.0, math.nan])}}, path
        )
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.ckpt"
    ]


@pytest.mark.slow
def test_a_diverging_run_stops_non_zero_with_finite_checkpoints(tmp_path):
    """schedule.optim.lr=1e4 (the issue's probe): the gradient norm is inf from step 1 on."""
    run_dir = tmp_path / "run"
    run = train(
        tmp_path,
        run_dir,
        "matcher=ms_detr",
        "schedule.optim.lr=1e4",
        "max_consecutive_skipped_steps=2",
        "callbacks.checkpoint.every_n_train_steps=1",
        base=SMALL,
    )
    assert run.returncode != 0
    assert (
        "training diverged: 2 steps in a row up to step" in run.stderr
        and "Traceback" not in run.stderr
    )
    assert "step 1 skipped: the loss is" in run.stdout + run.stderr  # each skip named in the log
    assert json.loads((run_dir / "run_summary.json").read_text())["status"] == "diverged"
    skipped = losses(run_dir, "train/skipped_steps")
    assert skipped[0] == 0 and max(skipped.values()) >= 1
    checkpoints = list((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints  # the steps before the divergence were saved
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
