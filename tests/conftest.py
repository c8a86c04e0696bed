"""Shared test set-up: Triton runs under its CPU interpreter, fixtures live beside the tests."""
import os

# Must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# Under pytest-xdist (`make test`: one worker per core) each worker computes on one thread, so the
# workers do not fight over the cores; the runs the tests start as subprocesses keep torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)
