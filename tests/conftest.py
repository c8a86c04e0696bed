"""Shared test set-up (Triton under its CPU interpreter, one thread per xdist worker, a seeded
torch) and the pytest fixtures; the functions and constants tests import are in tests/helpers/."""

import os
import tempfile

# Must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# verify_images=full remembers what decoded: the tests' verdicts stay out of the user's cache.
os.environ.setdefault("MSDETR_CACHE_DIR", tempfile.mkdtemp(prefix="msdetr-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test`: one worker per core) each worker computes on one thread, so the
# workers do not fight over the cores; the runs the tests start as subprocesses keep torch's
# default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def whole(tmp_path_factory):
    """The uninterrupted tiny MS-DETR run (2 epochs of 4 steps, validation after each) that the
    stopped, killed and broken runs are compared with: (losses, val/AP, final weights), by step."""
    from helpers.runs import MS_DETR, losses, train, weights

    tmp = tmp_path_factory.mktemp("whole")
    run = train(tmp, tmp / "run", base=MS_DETR)
    assert run.returncode == 0, run.stderr[-3000:]
    return (
        losses(tmp / "run"),
        losses(tmp / "run", "val/AP"),
        weights(tmp / "run" / "checkpoints" / "last.ckpt"),
    )
