"""Parameter names: this project's detector names <-> the names the official code gives, and which
names are class heads (what fine-tuning may leave out).

Kept apart from `msdetr.official` (checkpoint conversion) so that the training module can group
parameters by official name, as the official optimiser does, without importing the converters.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import NamedTuple

import torch

from .models import DeformableDETR
from .models.swin import swin_official_to_timm, swin_timm_to_official

_FFN = re.compile(r"(transformer\.(?:encoder|decoder)\.layers\.\d+\.)(?:ffn|aux_ffn)\.")
_FFN_BACK = re.compile(
    r"(transformer\.encoder\.layers\.\d+\.)(linear1|linear2|norm2)\.|"
    r"(transformer\.decoder\.layers\.\d+\.)(linear1|linear2|norm3)\.|"
    r"(transformer\.decoder\.layers\.\d+\.)(linear3|linear4|norm4)\."
)


# Where the detector's parts keep what the official model keeps under `transformer` (and its
# `query_embed`): (official prefix, this project's prefix). Names outside these are the same in both
# but for the FFN sub-modules (`_FFN`) and the backbone body (timm's Swin names).
_MOVED = (  # first match wins: the level embedding before the rest of the encoder
    ("transformer.level_embed", "encoder.level_embed"),
    ("transformer.encoder.", "encoder."),
    ("transformer.decoder.layers.", "decoder.layers."),
    ("transformer.enc_output", "queries.enc_output"),
    ("transformer.pos_trans", "queries.pos_trans"),
    ("transformer.pix_trans", "queries.pix_trans"),
    ("transformer.reference_points.", "queries.reference_points."),
    ("query_embed.", "queries.query_embed."),
    # DINO: its selection's learned content and encoder heads, the decoder's position head and
    # output norm, and the contrastive denoising block's label embedding.
    ("transformer.tgt_embed.", "queries.tgt_embed."),
    ("transformer.enc_out_", "queries.enc_out_"),
    ("transformer.decoder.ref_point_head.", "decoder.ref_point_head."),
    ("transformer.decoder.norm.", "decoder.norm."),
    ("label_enc.", "training_queries.dn.label_embed."),
    # DN-Deformable-DETR: the anchor selection's content and boxes (on the detector there; back to
    # the official names through `QuerySelection.official_prefixes`) and the decoder's DAB scale.
    ("tgt_embed.", "queries.tgt_embed."),
    ("refpoint_embed.", "queries.refpoint_embed."),
    ("transformer.decoder.query_scale.", "decoder.query_scale."),
)


def _move(name: str, to_official: bool) -> str:
    for official, ours in _MOVED:
        src, dst = (ours, official) if to_official else (official, ours)
        if name.startswith(src):
            return dst + name[len(src) :]
    return name


def to_official_name(name: str, selection=None) -> str:
    """The official name of one of this project's parameter names; `selection`: the model's query
    selection, whose `official_prefixes` go before the common table."""
    name = name.removeprefix("model.")
    for ours, official in getattr(selection, "official_prefixes", {}).items():
        if name.startswith("queries." + ours):
            return official + name[len("queries." + ours) :]
    name = _move(name, to_official=True)
    if name.startswith("backbone.body."):
        name = swin_timm_to_official("backbone.0.body." + name[len("backbone.body.") :])
    return _FFN.sub(r"\1", name)


def from_official_name(name: str) -> str:
    """This project's name of an official parameter name."""
    if name.startswith("backbone.0.body."):
        name = swin_official_to_timm("backbone.body." + name[len("backbone.0.body.") :])

    def repl(m: re.Match) -> str:
        if m.group(5):
            return f"{m.group(5)}aux_ffn.{m.group(6)}."
        return f"{m.group(1) or m.group(3)}ffn.{m.group(2) or m.group(4)}."

    return _move(_FFN_BACK.sub(repl, name), to_official=False)


def head_aliases(model: DeformableDETR) -> list[tuple[str, str, bool]]:
    """Heads the official model registers under a second name: (head prefix, alias prefix, alias
    registered after the head). Loading a state dict, the official model keeps the value of the
    name it visits last, so that one wins here too."""
    out = []
    if model.with_box_refine:
        out.append(("bbox_embed.", "transformer.decoder.bbox_embed.", False))
    if model.two_stage:
        out.append(("class_embed.", "transformer.decoder.class_embed.", False))
    if hasattr(model, "class_embed_o2m"):
        # MS-DETR impl_a: bbox_embed_o2m = bbox_embed[:-1], set after the heads.
        out.append(("bbox_embed.", "bbox_embed_o2m.", True))
    return out


def _alias_indices(model: DeformableDETR, alias: str) -> int:
    return len(model.class_embed_o2m) if alias == "bbox_embed_o2m." else len(model.bbox_embed)


def _unwrap(module) -> DeformableDETR:
    return module if isinstance(module, DeformableDETR) else module.model


def official_names(module) -> dict[str, str]:
    """{name in module.named_parameters(): the name official code's named_parameters() gives it}."""
    model = _unwrap(module)
    aliases = head_aliases(model)
    prefix = "" if isinstance(module, DeformableDETR) else "model."
    out = {}
    for name, _ in model.named_parameters():
        official = to_official_name(name, model.queries)
        # named_parameters() names a shared tensor by its first registration: the transformer's
        # alias.
        for head, alias, after in aliases:
            if official.startswith(head) and not after:
                official = alias + official[len(head) :]
        out[prefix + name] = official
    return out


def to_official(module) -> dict[str, torch.Tensor]:
    """The module's state dict under the official names, aliases included (as in official
    checkpoints)."""
    model = _unwrap(module)
    sd = {}
    for name, tensor in model.state_dict().items():
        sd[to_official_name(name, model.queries)] = tensor
    for head, alias, _ in head_aliases(model):
        count = _alias_indices(model, alias)
        for name in [k for k in sd if k.startswith(head)]:
            rest = name[len(head) :]
            if int(rest.split(".")[0]) < count:
                sd[alias + rest] = sd[name]
    return sd


# -- class heads: what fine-tuning may leave out ------------------------------------------------
# The modules that predict class logits: the decoder heads (in two-stage the last one is the
# encoder's), MS-DETR impl_a's one-to-many heads, and official code's
# `transformer.decoder.class_embed` aliases of the decoder heads.
_CLASS_HEADS = frozenset({"class_embed", "class_embed_o2m"})


def is_class_head(name: str) -> bool:
    """Whether a state-dict key is a class-head tensor, in any naming: this project's (with or
    without the Lightning `model.` prefix) or official code's."""
    return not _CLASS_HEADS.isdisjoint(name.split("."))


def _heads(keys: AbstractSet[str]) -> str:
    """'class_embed.0-6, class_embed_o2m.0-5' for the class-head keys given."""
    groups: dict[str, set[int]] = {}
    for key in keys:
        parts = key.removeprefix("model.").split(".")
        i = next(i for i, part in enumerate(parts) if part in _CLASS_HEADS)
        index = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].isdigit() else None
        groups.setdefault(".".join(parts[: i + 1]), set()).update([int(index)] if index else [])
    out = []
    for head, indices in sorted(groups.items()):
        if not indices:
            out.append(head)
        elif len(indices) == 1 or len(indices) != max(indices) - min(indices) + 1:
            out.append(f"{head}." + ",".join(map(str, sorted(indices))))
        else:
            out.append(f"{head}.{min(indices)}-{max(indices)}")
    return ", ".join(out)


class SkippedKeys(NamedTuple):
    """The keys a fine-tune leaves out (empty: load them all), which keep the model's fresh
    initialisation, and the warnings saying why."""

    keys: frozenset[str]
    messages: tuple[str, ...] = ()

    def warn(self) -> None:
        """Warn, after the rest of the checkpoint was found to fit (a refusal says only why)."""
        for message in self.messages:
            warnings.warn(message, stacklevel=2)

    def __or__(self, other: SkippedKeys) -> SkippedKeys:
        return SkippedKeys(self.keys | other.keys, self.messages + other.messages)


def class_heads_to_skip(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    fine_tune: bool = False,
    reset_class_heads: bool = False,
    source: str = "the checkpoint",
) -> SkippedKeys:
    """The class-head keys of the model's `expected` state dict and of the checkpoint's `state`
    (both under this project's names) that a fine-tune leaves out: all of them with
    `reset_class_heads`, all of them with `fine_tune` when some checkpoint head has another shape
    than the model's (another class count), none otherwise."""
    if not (fine_tune or reset_class_heads):
        return SkippedKeys(frozenset())
    heads = frozenset(k for k in (*expected, *state) if is_class_head(k))
    if reset_class_heads:
        reason = "init_reset_class_heads asks for fresh class heads, as the official --finetune"
    else:
        wrong = sorted(
            k
            for k in heads
            if k in expected and k in state and tuple(state[k].shape) != tuple(expected[k].shape)
        )
        if not wrong:
            return SkippedKeys(frozenset())
        k = min(wrong, key=lambda name: not name.endswith(".weight"))  # a weight says the most
        ours, theirs = tuple(expected[k].shape), tuple(state[k].shape)
        if ours[1:] == theirs[1:]:
            reason = f"the checkpoint's heads predict {theirs[0]} classes, the model's {ours[0]}"
        else:
            reason = (
                f"the checkpoint's heads do not fit the model's ({k.removeprefix('model.')}: "
                f"checkpoint {theirs} vs model {ours})"
            )
    return SkippedKeys(
        heads,
        (
            f"{source}: the class heads {_heads(heads)} are not loaded and keep their "
            f"fresh initialisation: {reason}.",
        ),
    )


# Parts a model may have that a checkpoint trained without them lacks: fine-tuning from it (a
# box-only detector into a mask model), they start from the model's initialisation.
ADDABLE_PARTS = ("mask_head",)


def fine_tune_skips(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    fine_tune: bool = False,
    reset_class_heads: bool = False,
    source: str = "the checkpoint",
) -> SkippedKeys:
    """The keys of the model's `expected` state dict and of the checkpoint's `state` (both under
    this project's names, with or without the Lightning `model.` prefix) that a fine-tune leaves
    out: the class heads (`class_heads_to_skip`) and, with `fine_tune`, every ADDABLE_PARTS part of
    the model that the checkpoint has no key of. The one rule for .ckpt and official .pth alike."""
    skip = class_heads_to_skip(
        expected, state, fine_tune=fine_tune, reset_class_heads=reset_class_heads, source=source
    )
    if not fine_tune:
        return skip

    def part_of(key: str) -> str:
        return key.removeprefix("model.").split(".", 1)[0]

    present = {part_of(k) for k in state}
    for part in ADDABLE_PARTS:
        keys = frozenset(k for k in expected if part_of(k) == part)
        if keys and part not in present:
            skip = skip | SkippedKeys(
                keys,
                (
                    f"{source} has no {part} (it was trained without one): the model's {part} "
                    "is not loaded and keeps its fresh initialisation.",
                ),
            )
    return skip


class StateDiff(NamedTuple):
    """How a checkpoint's state dict (this project's names) differs from a model's, after leaving
    out the keys a fine-tune skips: `state` is what remains to load."""

    state: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    wrong: list[str]  # present in both with another shape


def compare_state_dicts(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], skip: SkippedKeys
) -> StateDiff:
    """The one comparison behind loading a .ckpt and an official .pth."""
    state = {k: v for k, v in state.items() if k not in skip.keys}
    expected = {k: v for k, v in expected.items() if k not in skip.keys}
    return StateDiff(
        state,
        sorted(set(expected) - set(state)),
        sorted(set(state) - set(expected)),
        sorted(
            k
            for k in set(state) & set(expected)
            if tuple(state[k].shape) != tuple(expected[k].shape)
        ),
    )
