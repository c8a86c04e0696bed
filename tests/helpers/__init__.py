"""What the tests share, imported as `helpers` (tests/ is on sys.path: pyproject's pytest
`pythonpath`, and the PYTHONPATH of the runs the tests start). Fixtures stay in tests/conftest.py;
these are plain functions and constants:

- here: the repository's paths and the stored fixtures (`load_fixture`),
- `config`: the Hydra configs composed as a run composes them (`compose`),
- `detectors`: tiny detectors built from those configs (`tiny_detector`) and a batch for them,
- `runs`: train.py in a subprocess on a tiny run, and what it left (losses, weights),
- `signals`: callbacks such runs are given to stop, kill or break themselves,
- `parity`: the parity fixtures' weights and batches, and tensor comparisons,
- `official_keys`, `dino_manifest`, `dn_detr_manifest`: the official checkpoints' key sets.
"""

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=True)
