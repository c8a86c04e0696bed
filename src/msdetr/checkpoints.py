"""Load weights into a configured DetectionModule from this project's .ckpt or an official .pth."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .lit import DetectionModule
from .official import load_official_state_dict, read_official_checkpoint


def load_weights(module: DetectionModule, path: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; check ckpt_path.")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
        state, expected = ckpt["state_dict"], module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            raise ValueError(
                f"checkpoint '{path}' was trained with another architecture ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(wrong)} differently shaped tensors, e.g. {example}); "
                "evaluate it with the experiment/model config it was trained with."
            )
        module.load_state_dict(state)
        return
    state_dict, _ = read_official_checkpoint(path)
    load_official_state_dict(module, state_dict)
