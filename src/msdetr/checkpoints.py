"""Load weights into a configured DetectionModule from this project's .ckpt or an official .pth.

Evaluating and resuming need the exact architecture. Fine-tuning (`init_from`) also takes weights
whose class heads do not fit the model (another class count), or leaves the heads out on request
(`init_reset_class_heads`, as the official `--finetune`, which deletes every `class_embed` key):
those heads keep the model's fresh initialisation. Any other difference is refused in one sentence.
"""

from __future__ import annotations

from typing import Any

from .lit import DetectionModule
from .naming import compare_state_dicts, fine_tune_skips
from .official import load_official_state_dict, official_contents, read_checkpoint_file


def load_weights(
    module: DetectionModule,
    path: str,
    ckpt: Any = None,
    *,
    fine_tune: bool = False,
    reset_class_heads: bool = False,
) -> None:
    """Load this project's .ckpt or an official .pth into `module`; `ckpt`: the file already read
    with `read_checkpoint_file` (so callers that look inside it read it once). Exact architecture
    only, except when fine-tuning: the class heads, and the parts a checkpoint trained without them
    lacks (a mask head), see `naming.fine_tune_skips`."""
    if ckpt is None:
        ckpt = read_checkpoint_file(path)
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt:
        state, expected = dict(ckpt["state_dict"]), module.state_dict()
        skip = fine_tune_skips(
            expected,
            state,
            fine_tune=fine_tune,
            reset_class_heads=reset_class_heads,
            source=f"'{path}'",
        )
        state, missing, unexpected, wrong = compare_state_dicts(expected, state, skip)
        if missing or unexpected or wrong:
            example = (missing or unexpected or wrong)[0]
            advice = (
                "fine-tune from it with the experiment/model config it was trained with (only the "
                "class heads may differ)"
                if fine_tune or reset_class_heads
                else "evaluate it with the experiment/model config it was trained with"
            )
            raise ValueError(
                f"checkpoint '{path}' was trained with another architecture ({len(missing)} "
                f"missing, {len(unexpected)} unexpected, {len(wrong)} differently shaped tensors, "
                f"e.g. {example}); {advice}."
            )
        skip.warn()
        # Left-out heads are the only keys the state lacks: they keep the model's initialisation.
        module.load_state_dict(state, strict=not skip.keys)
        return
    state_dict, _ = official_contents(ckpt, path)
    load_official_state_dict(
        module,
        state_dict,
        fine_tune=fine_tune,
        reset_class_heads=reset_class_heads,
        source=f"'{path}'",
    )
