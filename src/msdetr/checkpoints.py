"""Load weights into a configured DetectionModule from this project's .ckpt or an official .pth."""
from __future__ import annotations

from typing import Any

from .lit import DetectionModule
from .official import load_official_state_dict, official_contents, read_checkpoint_file


def load_weights(module: DetectionModule, path: str, ckpt: Any = None) -> None:
    """Load this project's .ckpt or an official .pth into `module`; `ckpt`: the file already read
    with `read_checkpoint_file` (so callers that look inside it read it once)."""
    if ckpt is None:
        ckpt = read_checkpoint_file(path)
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
    state_dict, _ = official_contents(ckpt, path)
    load_official_state_dict(module, state_dict)
