"""Random state of one training process: torch (CPU and CUDA), numpy, python and the assigners'
generators, as plain tensors and lists so that checkpoints load with `weights_only=True`."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_process(seed: int) -> None:
    """Seed torch (every device), numpy and python, as the official main.py does per process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture(generators: list[torch.Generator]) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict, generators: list[torch.Generator]) -> None:
    """Put back what `capture` returned; the generators must be the same ones, in the same order."""
    if len(state["generators"]) != len(generators):
        raise ValueError(
            f"the checkpoint holds {len(state['generators'])} assigner generator state(s) but this "
            f"criterion has {len(generators)}; resume with the matcher config the run started with."
        )
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
