"""Types and ranges of the composed Hydra config, checked before anything heavy is imported.

train.py, evaluate.py and predict.py call `validate(cfg)` first thing: a wrong value (a string for
a number, `model.num_queries=0`, a negative learning rate) then stops the run in one
sentence, within seconds, instead of after the Lightning import and the model build, or deep inside
Lightning, or not at all.

The schema covers what matters most (the trainer, the schedule, the data, the detector's numeric
options); everything else, `_target_` keys included, passes through unchecked. Types are
OmegaConf's: the config is merged into `OmegaConf.structured(RunConfig)` and OmegaConf reports a
value its field type cannot hold. Ranges are each field's `rule` (`at_least`, `above`, ...), checked
on the merged values with interpolations resolved. A key the config leaves out is not checked (the
code's default applies). The merged copy is thrown away: the run goes on with the config exactly as
composed.

Only omegaconf and hydra are imported here (and `msdetr/__init__.py`, which imports nothing): the
entry scripts import Lightning and torch only after `validate` has passed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigValidationError", "RunConfig", "validate"]


class ConfigValidationError(CompactHydraException, ValueError):
    """A config value of the wrong type or out of range. Hydra prints a CompactHydraException
    raised by the task function as its message alone, without a traceback (unless
    HYDRA_FULL_ERROR=1)."""


@dataclass(frozen=True)
class Rule:
    """What a value must be: `ok(value)` says whether it is, `allowed` says it in words ("> 0")."""

    allowed: str
    ok: Callable[[Any], bool]


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low)


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: v > low)


def in_range(low: float, high: float, *, high_open: bool = False) -> Rule:
    return Rule(
        f"in [{low}, {high}{')' if high_open else ']'}",
        lambda v: low <= v < high if high_open else low <= v <= high,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _devices_ok(v: Any) -> bool:
    """Lightning's `devices`: a count, -1 (all), a list of indices, or a string it parses ("auto",
    "0,1")."""
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, ListConfig):
        return len(v) > 0 and all(_is_int(i) and i >= 0 for i in v)
    return isinstance(v, str) and v.strip() != ""


DEVICES = Rule("a count >= 1, -1 (all devices), 'auto' or a list of device indices", _devices_ok)
# Lightning's `fast_dev_run`: a bool, or a number of batches.
BOOL_OR_BATCHES = Rule(
    "true, false or a number of batches >= 0",
    lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0),
)


def spec(rule: Rule | None = None) -> Any:
    """A schema field: no default (a key the config leaves out is not checked), its range `rule`
    (applied to each element of a list field; null passes where the type is Optional)."""
    return field(default=MISSING, metadata={"rule": rule})


# The schema. Field order is check order: the schedule comes before the trainer, whose max_epochs
# and gradient_clip_val interpolate it, so an error names the key that was set.


@dataclass
class OptimConfig:
    lr: float = spec(above(0))
    lr_backbone: float = spec(at_least(0))
    lr_linear_proj_mult: float = spec(at_least(0))
    weight_decay: float = spec(at_least(0))
    lr_drop_epochs: list[int] | None = spec(at_least(1))
    lr_gamma: float = spec(above(0))


@dataclass
class ScheduleConfig:
    epochs: int = spec(at_least(1))
    clip_max_norm: float | None = spec(at_least(0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    # `optimizer` and `lr_scheduler` (Hydra `_partial_` configs) pass through unchecked.
    lr_interval: str = spec(Rule("'epoch' or 'step'", lambda v: v in ("epoch", "step")))


@dataclass
class LayerConfig:
    n_points: int = spec(at_least(1))


@dataclass
class EncoderConfig:
    num_layers: int = spec(at_least(1))
    layer: LayerConfig = field(default_factory=LayerConfig)


@dataclass
class DecoderLayerConfig:
    n_points: int = spec(at_least(1))
    cross_attn_first: bool = spec()
    aux_ffn: bool = spec()


@dataclass
class DecoderConfig:
    num_layers: int = spec(at_least(1))
    look_forward_twice: bool = spec()
    box_query_pos: bool = spec()
    query_scale: bool = spec()
    norm: bool = spec()
    logit_eps: float = spec(Rule("in (0, 0.5)", lambda v: 0 < v < 0.5))
    layer: DecoderLayerConfig = field(default_factory=DecoderLayerConfig)


@dataclass
class QueriesConfig:
    num_queries: int = spec(at_least(1))
    mixed_selection: bool = spec()
    pix_trans: bool = spec()
    pre_nms_per_level: int = spec(at_least(1))
    iou_threshold: float = spec(in_range(0, 1))
    indicator: bool = spec()


@dataclass
class DetectorConfig:
    num_classes: int | None = spec(at_least(1))
    box_refine: bool = spec()
    o2m_class_heads: bool = spec()
    share_heads: bool = spec()
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)


@dataclass
class PostprocessConfig:
    num_select: int = spec(at_least(1))
    iou_threshold: float = spec(in_range(0, 1))
    pre_topk: int = spec(at_least(1))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes in which inductor records CUDA graphs (max-autotune turns them on too).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


# msdetr.kernels.BACKENDS (not imported here: torch)
ATTN_BACKENDS = ("auto", "triton", "reference", "gather")


@dataclass
class ModelConfig:
    # The sizes the detector's parts share (conf/model/deformable_detr.yaml)
    hidden_dim: int = spec(at_least(1))
    nheads: int = spec(at_least(1))
    num_feature_levels: int = spec(at_least(1))
    dim_feedforward: int = spec(at_least(1))
    dropout: float = spec(in_range(0, 1, high_open=True))
    num_queries: int = spec(at_least(1))
    attn_backend: str = spec(
        Rule(", ".join(repr(b) for b in ATTN_BACKENDS), lambda v: v in ATTN_BACKENDS)
    )
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # torch.compile of the detector (DetectionModule's compile_options)
    compile: bool = spec()
    compile_mode: str | None = spec(
        Rule(", ".join(repr(m) for m in COMPILE_MODES), lambda v: v in COMPILE_MODES)
    )
    compile_dynamic: bool | None = spec()
    compile_backend: str = spec(
        Rule(
            "a torch.compile backend name ('inductor', 'aot_eager', 'eager')",
            lambda v: v.strip() != "",
        )
    )

    @staticmethod
    def check(node: DictConfig, path: str) -> str | None:
        """Across fields: the attention splits hidden_dim into nheads equal heads; a compile mode is
        an inductor setting, and not one that records CUDA graphs (image sizes vary)."""
        if (
            not (OmegaConf.is_missing(node, "hidden_dim") or OmegaConf.is_missing(node, "nheads"))
            and node.hidden_dim % node.nheads
        ):
            return (
                f"{path}hidden_dim={node.hidden_dim} is not allowed: use a multiple of "
                f"{path}nheads={node.nheads}."
            )
        if OmegaConf.is_missing(node, "compile_mode") or OmegaConf.is_missing(
            node, "compile_backend"
        ):
            return None
        if node.compile_mode is not None and node.compile_backend != "inductor":
            return (
                f"{path}compile_mode={node.compile_mode} is not allowed with {path}compile_backend="
                f"{node.compile_backend}: a mode is an inductor setting, so set "
                f"{path}compile_mode=null."
            )
        # CUDA graphs are recorded per input shape. No configuration here has fixed image sizes:
        # the DETR augmentation (multi-scale resize, random crops) and the images' aspect ratios
        # give nearly every batch new feature-map sizes (bench/RESULTS.md: 735 value lengths in
        # 1500 simulated batches), so the graphs would be re-recorded almost every step.
        if (
            not OmegaConf.is_missing(node, "compile")
            and node.compile
            and node.compile_mode in CUDA_GRAPH_MODES
        ):
            return (
                f"{path}compile_mode={node.compile_mode} is not allowed: it records CUDA graphs "
                "per input shape and the image sizes change with nearly every batch, so use "
                "'default', 'max-autotune-no-cudagraphs' or null."
            )
        return None


@dataclass
class DataConfig:
    num_classes: int | None = spec(at_least(1))
    batch_size: int = spec(at_least(1))
    val_batch_size: int | None = spec(at_least(1))
    num_workers: int = spec(at_least(0))
    pin_memory: bool = spec()
    persistent_workers: bool = spec()
    train_scales: list[int] = spec(at_least(1))
    max_size: int = spec(at_least(1))
    crop_resize: list[int] = spec(at_least(1))
    crop_size: list[int] = spec(at_least(1))
    eval_size: int = spec(at_least(1))
    synthetic: bool = spec()
    synthetic_train: int = spec(at_least(1))
    synthetic_val: int = spec(at_least(1))
    verify_images: str = spec(
        Rule("'header', 'full' or 'none'", lambda v: v in ("header", "full", "none"))
    )
    skip_bad_images: bool = spec()
    masks: bool = spec()
    seed: int | None = spec()


@dataclass
class TrainerConfig:
    max_epochs: int | None = spec(Rule(">= 1 or -1 (no limit)", lambda v: v >= 1 or v == -1))
    devices: Any = spec(DEVICES)
    num_nodes: int = spec(at_least(1))
    gradient_clip_val: float | None = spec(at_least(0))
    check_val_every_n_epoch: int | None = spec(at_least(1))
    log_every_n_steps: int = spec(at_least(1))
    accumulate_grad_batches: int = spec(at_least(1))
    fast_dev_run: Any = spec(BOOL_OR_BATCHES)
    sync_batchnorm: bool = spec()


@dataclass
class RunConfig:
    """The checked part of train.yaml, evaluate.yaml and predict.yaml (each key where it has it)."""

    seed: int | None = spec()
    optimized_metric: str | None = spec(
        Rule("a logged metric name such as 'val/AP'", lambda v: v.strip() != "")
    )
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    auto_resume: bool = spec()
    max_consecutive_skipped_steps: int = spec(at_least(1))
    init_reset_class_heads: bool = spec()
    report: bool = spec()
    # predict.yaml
    score_threshold: float = spec(in_range(0, 1))
    eval_size: int | None = spec(at_least(1))
    max_size: int | None = spec(at_least(1))
    batch_size: int = spec(at_least(1))

    @staticmethod
    def check(node: DictConfig, path: str) -> str | None:
        """Across sections: instance masks need a mask head and mask targets together (a branch
        with masks=true, model.detector.mask_head and data.masks)."""
        return _mask_settings(node)


def _mask_settings(node: DictConfig) -> str | None:
    """The mask supervision's three keys agree: a branch supervising masks needs the detector's
    mask head and data.masks=true; a mask head needs a branch with masks and data.masks=true."""
    branches = OmegaConf.select(node, "matcher.criterion.branches", default=None)
    head = OmegaConf.select(node, "model.detector.mask_head", default=None)
    data_masks = OmegaConf.select(node, "data.masks", default=None)
    with_masks = [
        str(name)
        for name, branch in (branches.items() if isinstance(branches, DictConfig) else [])
        if isinstance(branch, DictConfig) and branch.get("masks") is True
    ]
    if with_masks and head is None:
        return (
            f"matcher.criterion.branches.{with_masks[0]}.masks=true supervises masks, but "
            "model.detector.mask_head is null: add +parts=mask_head, or set matcher.masks=false."
        )
    if head is not None and isinstance(branches, DictConfig) and not with_masks:
        return (
            "model.detector.mask_head is set but no branch of matcher.criterion.branches "
            "supervises masks, so it would not train: set matcher.masks=true, or "
            "model.detector.mask_head=null."
        )
    if (with_masks or head is not None) and data_masks is False:
        what = (
            f"matcher.criterion.branches.{with_masks[0]}.masks=true"
            if with_masks
            else "model.detector.mask_head"
        )
        return (
            f"{what} needs instance masks in the targets, but data.masks=false: set "
            "data.masks=true (a dataset with segmentations)."
        )
    return None


def validate(cfg: DictConfig, schema: type = RunConfig) -> None:
    """Raises ConfigValidationError, in one sentence naming the key, its value and what is
    allowed, for the first value of `cfg` of the wrong type or out of range. `cfg` is not
    changed."""
    typed = OmegaConf.structured(schema)
    _open(typed, schema)
    try:
        merged = OmegaConf.merge(typed, cfg)  # OmegaConf's type check of every literal value
        assert isinstance(merged, DictConfig), "a structured schema merges into a DictConfig"
        _check(merged, schema, "", cfg)  # ranges, and the types of interpolated values
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        # OmegaConf's message, without its location lines
        reason = str(err).splitlines()[0].rstrip(".")
        shown = _shown(cfg, key) if key else None
        where = (
            f"{key}={shown} is not allowed: " if shown is not None else f"{key}: " if key else ""
        )
        raise ConfigValidationError(f"{where}{reason}.") from None


def _fields(schema: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(schema)
    return [(f, hints[f.name]) for f in dataclasses.fields(schema)]


def _open(node: DictConfig, schema: type) -> None:
    """Lets every section take the keys the schema does not name (`_target_`, backbone, ...)."""
    OmegaConf.set_struct(node, False)
    for f, hint in _fields(schema):
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _open(node[f.name], hint)


def _check(node: DictConfig, schema: type, path: str, source: DictConfig) -> None:
    for f, hint in _fields(schema):
        key = f"{path}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _check(node[f.name], hint, f"{key}.", source)
            continue
        if OmegaConf.is_missing(node, f.name):
            continue  # not in this config: the code's default
        value = node[f.name]  # resolves an interpolation and checks the result against the type
        rule: Rule | None = f.metadata["rule"]
        if rule is None or value is None:
            continue
        items = (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)] if _base(hint)[1] else [(key, value)]
        )
        for item_key, item in items:
            if item is not None and not rule.ok(item):
                shown = _shown(source, item_key) or str(item)
                raise ConfigValidationError(
                    f"{item_key}={shown} is not allowed: use {_allowed(hint, rule)}."
                )
    check = getattr(schema, "check", None)
    if check is not None and (message := check(node, path)):
        raise ConfigValidationError(message)


def _base(hint: Any) -> tuple[Any, bool, bool]:
    """(element type, is a list, is Optional) of a field's type hint: Optional[List[int]] -> int,
    True, True."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    is_list = typing.get_origin(hint) is list
    return (typing.get_args(hint)[0] if is_list else hint), is_list, optional


def _allowed(hint: Any, rule: Rule) -> str:
    element, _, optional = _base(hint)
    kind = {int: "an integer ", float: "a number "}.get(element, "")
    return f"{kind}{rule.allowed}{' or null' if optional else ''}"


def _shown(source: DictConfig, key: str) -> str | None:
    """The value as the config has it (-1, not the merged -1.0), interpolations resolved; None
    where it does not resolve (the error says why)."""
    try:
        value = OmegaConf.select(source, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return "null" if value is None else str(value)
