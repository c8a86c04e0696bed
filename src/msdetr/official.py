"""Conversion between official checkpoints (Deformable-DETR, MS-DETR, DETA, DINO,
DN-Deformable-DETR) and DetectionModule.

`from_official` builds the module the official flags describe (DINO: its `key=value` config
overrides of config/DINO/DINO_4scale.py; DN-DETR: its main.py flags with `-m
dn_dab_deformable_detr`) and loads the official state dict;
`to_official` writes it back under the official names (every alias the official model registers);
`official_names` maps this project's parameter names to the names official code gives them (both
live in `msdetr.naming`; this module re-exports them).
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from .lit import DetectionModule, LRSchedule, ParamGroups
from .losses import Branch, SetCriterion
from .matching import (
    Assigner,
    DenoisingAssigner,
    HungarianMatcher,
    IoUTopKAssigner,
    MixedScoreTopKAssigner,
)
from .models import (
    AnchorQueries,
    Backbone,
    ContrastiveDenoisingQueries,
    DecoderLayer,
    DeformableDecoder,
    DeformableDETR,
    DeformableEncoder,
    DenoisingQueries,
    DINOQueries,
    EncoderLayer,
    LearnedQueries,
    NMSTwoStageQueries,
    PositionEmbeddingSine,
    QuerySelection,
    SwinBackbone,
    TwoStageQueries,
)
from .models.backbone import FeatureBackbone
from .models.swin import is_swin_buffer
from .naming import (
    compare_state_dicts,
    fine_tune_skips,
    from_official_name,
    head_aliases,
    to_official_name,
)

# Part of this module's public API (the README's conversion example): the name tables.
from .naming import official_names as official_names
from .naming import to_official as to_official
from .postprocess import NMSPostProcess, TopKPostProcess

# Defaults of the official main.py flags this project reads (the Deformable-DETR values; MS-DETR and
# DETA add flags of their own with the defaults below).
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet50",
    "dilation": False,
    "position_embedding": "sine",
    "hidden_dim": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 1024,
    "dropout": 0.1,
    "num_queries": 300,
    "num_feature_levels": 4,
    "enc_n_points": 4,
    "dec_n_points": 4,
    "two_stage": False,
    "with_box_refine": False,
    "aux_loss": True,
    "masks": False,
    "lr": 2e-4,
    "lr_backbone": 2e-5,
    "lr_linear_proj_mult": 0.1,
    "weight_decay": 1e-4,
    "lr_drop": 40,
    "lr_backbone_names": ["backbone.0"],
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
    "epochs": 50,
    "clip_max_norm": 0.1,
    "batch_size": 2,
    "set_cost_class": 2.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "cls_loss_coef": 2.0,
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "focal_alpha": 0.25,
    # H-DETR / MS-DETR "++" tricks
    "mixed_selection": False,
    "look_forward_twice": False,
    # MS-DETR (root code; impl_a is recognised by its separate o2m class heads)
    "use_ms_detr": False,
    "use_aux_ffn": False,
    "topk_eval": 100,
    "enc_cls_loss_coef": 2.0,
    "enc_bbox_loss_coef": 5.0,
    "enc_giou_loss_coef": 2.0,
    "o2m_cls_loss_coef": 2.0,
    "o2m_bbox_loss_coef": 5.0,
    "o2m_giou_loss_coef": 2.0,
    # DETA
    "assign_first_stage": False,
    "assign_second_stage": False,
}

# Flags whose training or inference this release cannot reproduce: such a module is refused clearly.
_UNSUPPORTED = {"masks": "segmentation heads"}


# DINO (IDEA-Research/DINO): the values of config/DINO/DINO_4scale.py this project reads. A DINO
# checkpoint's args or a fixture's `key=value` overrides are read over these.
DINO_DEFAULTS: dict[str, Any] = {
    "modelname": "dino",
    "num_classes": 91,
    "lr": 1e-4,
    "param_dict_type": "default",
    "lr_backbone": 1e-5,
    "lr_backbone_names": ["backbone.0"],
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
    "lr_linear_proj_mult": 0.1,
    "ddetr_lr_param": False,
    "batch_size": 2,
    "weight_decay": 1e-4,
    "epochs": 12,
    "lr_drop": 11,
    "clip_max_norm": 0.1,
    "onecyclelr": False,
    "multi_step_lr": False,
    "backbone": "resnet50",
    "dilation": False,
    "position_embedding": "sine",
    "pe_temperatureH": 20,
    "pe_temperatureW": 20,
    "return_interm_indices": [1, 2, 3],
    "enc_layers": 6,
    "dec_layers": 6,
    "unic_layers": 0,
    "pre_norm": False,
    "dim_feedforward": 2048,
    "hidden_dim": 256,
    "dropout": 0.0,
    "nheads": 8,
    "num_queries": 900,
    "query_dim": 4,
    "num_patterns": 0,
    "num_feature_levels": 4,
    "enc_n_points": 4,
    "dec_n_points": 4,
    "dec_layer_number": None,
    "decoder_layer_noise": False,
    "add_channel_attention": False,
    "use_deformable_box_attn": False,
    "two_stage_type": "standard",
    "two_stage_pat_embed": 0,
    "two_stage_add_query_num": 0,
    "two_stage_bbox_embed_share": False,
    "two_stage_class_embed_share": False,
    "two_stage_learn_wh": False,
    "two_stage_keep_all_tokens": False,
    "num_select": 300,
    "transformer_activation": "relu",
    "batch_norm_type": "FrozenBatchNorm2d",
    "masks": False,
    "aux_loss": True,
    "set_cost_class": 2.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "cls_loss_coef": 1.0,
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "enc_loss_coef": 1.0,
    "interm_loss_coef": 1.0,
    "no_interm_box_loss": False,
    "focal_alpha": 0.25,
    "decoder_sa_type": "sa",
    "matcher_type": "HungarianMatcher",
    "decoder_module_seq": ["sa", "ca", "ffn"],
    "nms_iou_threshold": -1,
    "dec_pred_bbox_embed_share": True,
    "dec_pred_class_embed_share": True,
    "use_dn": True,
    "dn_number": 100,
    "dn_box_noise_scale": 0.4,
    "dn_label_noise_ratio": 0.5,
    "embed_init_tgt": True,
    "dn_labelbook_size": 91,
    "use_ema": False,
    "use_detached_boxes_dec_out": False,
    "random_refpoints_xy": False,
    "fix_refpoints_hw": -1,
}
# DINO config values this project reproduces only as released: anything else is refused by name.
_DINO_FIXED = (
    "param_dict_type",
    "ddetr_lr_param",
    "onecyclelr",
    "multi_step_lr",
    "position_embedding",
    "return_interm_indices",
    "unic_layers",
    "pre_norm",
    "query_dim",
    "num_patterns",
    "num_feature_levels",
    "dec_layer_number",
    "decoder_layer_noise",
    "add_channel_attention",
    "use_deformable_box_attn",
    "two_stage_type",
    "two_stage_pat_embed",
    "two_stage_add_query_num",
    "two_stage_bbox_embed_share",
    "two_stage_class_embed_share",
    "two_stage_learn_wh",
    "two_stage_keep_all_tokens",
    "transformer_activation",
    "batch_norm_type",
    "masks",
    "decoder_sa_type",
    "matcher_type",
    "decoder_module_seq",
    "nms_iou_threshold",
    "embed_init_tgt",
    "use_ema",
    "use_detached_boxes_dec_out",
    "random_refpoints_xy",
    "fix_refpoints_hw",
)


# DN-DETR (IDEA-Research/DN-DETR): the main.py defaults this project reads, for its
# `-m dn_dab_deformable_detr` model (DN-Deformable-DETR, models/dn_dab_deformable_detr).
DN_DETR_MODEL = "dn_dab_deformable_detr"
DN_DETR_DEFAULTS: dict[str, Any] = {
    "modelname": DN_DETR_MODEL,
    "use_dn": False,
    "scalar": 5,
    "label_noise_scale": 0.2,
    "box_noise_scale": 0.4,
    "contrastive": False,
    "use_mqs": False,
    "use_lft": False,
    "lr": 1e-4,
    "lr_backbone": 1e-5,
    "batch_size": 2,
    "weight_decay": 1e-4,
    "epochs": 50,
    "lr_drop": 40,
    "clip_max_norm": 0.1,
    "backbone": "resnet50",
    "dilation": False,
    "position_embedding": "sine",
    "pe_temperatureH": 20,
    "pe_temperatureW": 20,
    "batch_norm_type": "FrozenBatchNorm2d",
    "return_interm_layers": False,
    "enc_layers": 6,
    "dec_layers": 6,
    "dim_feedforward": 2048,
    "hidden_dim": 256,
    "dropout": 0.0,
    "nheads": 8,
    "num_queries": 300,
    "num_results": 300,
    "pre_norm": False,
    "num_select": 300,
    "transformer_activation": "prelu",
    "num_patterns": 0,
    "random_refpoints_xy": False,
    "two_stage": False,
    "num_feature_levels": 4,
    "dec_n_points": 4,
    "enc_n_points": 4,
    "masks": False,
    "aux_loss": True,
    "set_cost_class": 2.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "cls_loss_coef": 1.0,
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "focal_alpha": 0.25,
    "lr_backbone_names": ["backbone.0"],
    "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
}
# DN-DETR flags whose other values build another model than the released one, or none (two_stage and
# num_patterns are not implemented there); they are refused by name.
_DN_DETR_FIXED = (
    "position_embedding",
    "batch_norm_type",
    "num_patterns",
    "random_refpoints_xy",
    "two_stage",
    "masks",
    "contrastive",
    "use_mqs",
    "use_lft",
    "pre_norm",
)


def is_dn_detr(flags) -> bool:
    """Whether official flags are DN-DETR's DN-Deformable-DETR: `-m` / `--modelname
    dn_dab_deformable_detr`, or an args dict / Namespace with that modelname."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    if isinstance(flags, Mapping):
        return flags.get("modelname") == DN_DETR_MODEL
    tokens = list(flags)
    return any(
        tok in ("-m", "--modelname") and nxt == DN_DETR_MODEL
        for tok, nxt in zip(tokens, tokens[1:])
    )


def is_dino(flags) -> bool:
    """Whether official flags are DINO's: `key=value` overrides, or an args dict / Namespace of
    DINO's config (its `modelname` or `two_stage_type`)."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    if isinstance(flags, Mapping):
        return flags.get("modelname") == "dino" or "two_stage_type" in flags
    return any("=" in tok and not tok.startswith("--") for tok in flags)


def _tokens(flags: Iterable[str] | Mapping[str, Any] | argparse.Namespace) -> Iterable[str]:
    """The command-line tokens, once the Namespace and Mapping forms are handled (mypy cannot
    narrow Namespace out of the union: its `__getattr__` makes it look like any protocol)."""
    return cast(Iterable[str], flags)


def parse_dino_flags(
    flags: Iterable[str] | Mapping[str, Any] | argparse.Namespace,
) -> dict[str, Any]:
    """DINO's `key=value` config overrides (list of str), or its args dict / Namespace -> dict over
    `DINO_DEFAULTS`. Values are Python literals (`use_dn=False`, `lr=1e-4`); others stay strings."""
    if isinstance(flags, argparse.Namespace):
        return {**DINO_DEFAULTS, **vars(flags)}
    if isinstance(flags, Mapping):
        return {**DINO_DEFAULTS, **flags}
    args = dict(DINO_DEFAULTS)
    for tok in _tokens(flags):
        key, sep, raw = tok.partition("=")
        if not sep or not key:
            raise ValueError(
                f"DINO flag {tok!r} is not key=value; pass DINO's config overrides as "
                "['key=value', ...]."
            )
        try:
            args[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            args[key] = raw
    return args


def parse_flags(flags: Iterable[str] | Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """Official command-line flags (list of str), an args dict or Namespace -> dict over the
    defaults. DINO's flags (see `is_dino`) are read over DINO's defaults."""
    if is_dino(flags):
        return parse_dino_flags(flags)
    defaults = DN_DETR_DEFAULTS if is_dn_detr(flags) else OFFICIAL_DEFAULTS
    if isinstance(flags, argparse.Namespace):
        return {**defaults, **vars(flags)}
    if isinstance(flags, Mapping):
        return {**defaults, **flags}
    # DN-DETR's main.py names its model with the short flag -m.
    args, tokens = dict(defaults), ["--modelname" if tok == "-m" else tok for tok in _tokens(flags)]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(
                f"official flag list has a stray value {tok!r}; pass flags as ['--name', 'value', "
                "...]."
            )
        name = tok[2:]
        if isinstance(args.get(name), list):  # nargs='+' flags: every value up to the next flag
            values = []
            while i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                values.append(tokens[i + 1])
                i += 1
            if not values:
                raise ValueError(f"official flag --{name} needs at least one value.")
            args[name] = values
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            raw = tokens[i + 1]
            default = args.get(name)
            if isinstance(default, bool):
                raise ValueError(f"official flag --{name} takes no value, got {raw!r}.")
            if isinstance(default, int):
                value: Any = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                try:
                    value = float(raw) if any(c in raw for c in ".e") else int(raw)
                except ValueError:
                    value = raw
            args[name] = value
            i += 2
        else:
            args[name] = True
            i += 1
    return args


def _num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    for key in ("class_embed.0.weight", "class_embed.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 91


def _infer_backbone(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The ResNet depth the backbone weights have (block type and layer3 length), "swin" for DETA's
    Swin-L, None if absent."""
    if "backbone.0.body.patch_embed.proj.weight" in state_dict:
        return "swin"
    prefix = "backbone.0.body.layer3."
    blocks = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    if not blocks:
        return None
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    depth = {
        (False, 2): "resnet18",
        (False, 6): "resnet34",
        (True, 6): "resnet50",
        (True, 23): "resnet101",
    }
    return depth.get((bottleneck, max(blocks) + 1))


def _resnet(args: Mapping[str, Any], pretrained_backbone: bool | str) -> Backbone:
    """The official frozen-BN ResNet of the flags (intermediate maps when there are several
    levels)."""
    return Backbone(
        name=args["backbone"],
        pretrained=pretrained_backbone,
        train_backbone=args["lr_backbone"] > 0,
        return_interm_layers=args["num_feature_levels"] > 1,
        dilation=args["dilation"],
    )


def _encoder(args: Mapping[str, Any]) -> tuple[dict[str, Any], DeformableEncoder]:
    """(the layer sizes the encoder and decoder layers share, the deformable encoder) of the
    flags."""
    width = dict(
        d_model=args["hidden_dim"],
        n_heads=args["nheads"],
        n_levels=args["num_feature_levels"],
        d_ffn=args["dim_feedforward"],
        dropout=args["dropout"],
    )
    return width, DeformableEncoder(
        layer=EncoderLayer(**width, n_points=args["enc_n_points"]), num_layers=args["enc_layers"]
    )


def build_model(
    args: Mapping[str, Any],
    num_classes: int = 91,
    keys: Iterable[str] = (),
    pretrained_backbone: bool | str = False,
) -> DeformableDETR:
    """The detector the official flags (and, for MS-DETR impl_a, the checkpoint keys) describe."""
    if args.get("modelname") == "dino":
        return build_dino_model(args, num_classes, pretrained_backbone)
    if args.get("modelname") == DN_DETR_MODEL:
        return build_dn_detr_model(args, num_classes, pretrained_backbone)
    if args.get("position_embedding", "sine") != "sine":
        raise NotImplementedError(
            "only the sine position embedding of the official code is supported."
        )
    if args.get("masks"):
        raise NotImplementedError("the official --masks (segmentation) heads are not supported.")
    ms_detr = bool(args.get("use_ms_detr"))
    impl_a = ms_detr and any(k.startswith("class_embed_o2m.") for k in keys)
    backbone: FeatureBackbone
    if args["backbone"] == "swin":  # DETA's Swin-L (models/swin.py there)
        backbone = SwinBackbone(
            name="swin_large_patch4_window12_384",
            pretrained=pretrained_backbone,
            train_backbone=args["lr_backbone"] > 0,
            drop_path_rate=0.3,
            checkpointing=True,
        )
    else:
        backbone = _resnet(args, pretrained_backbone)
    width, encoder = _encoder(args)
    # MS-DETR root code = Figure 4 (c): cross-attention first, o2m tapped after it; impl_a = (a).
    decoder_layer = DecoderLayer(
        **width,
        n_points=args["dec_n_points"],
        cross_attn_first=ms_detr and not impl_a,
        o2m_tap=("output" if impl_a else "cross_attn") if ms_detr else None,
        aux_ffn=ms_detr and not impl_a and bool(args.get("use_aux_ffn")),
    )
    decoder = DeformableDecoder(
        layer=decoder_layer,
        num_layers=args["dec_layers"],
        look_forward_twice=args["look_forward_twice"],
    )
    queries: QuerySelection
    if args["two_stage"]:
        # DETA's two-stage queries always add the selected tokens' features; its checkpoints say so.
        pix_trans = any(k.startswith("transformer.pix_trans.") for k in keys) or bool(
            args["assign_first_stage"] or args["assign_second_stage"]
        )
        selection = NMSTwoStageQueries if args["assign_first_stage"] else TwoStageQueries
        queries = selection(
            num_queries=args["num_queries"],
            d_model=args["hidden_dim"],
            mixed_selection=args["mixed_selection"],
            pix_trans=pix_trans,
        )
    else:
        if args["mixed_selection"]:
            raise ValueError(
                "the official flags set --mixed_selection without --two_stage; mixed selection "
                "mixes learned content with two-stage positions."
            )
        queries = LearnedQueries(num_queries=args["num_queries"], d_model=args["hidden_dim"])
    return DeformableDETR(
        backbone=backbone,
        encoder=encoder,
        decoder=decoder,
        queries=queries,
        num_classes=num_classes,
        box_refine=args["with_box_refine"],
        o2m_class_heads=impl_a,
    )


def _check_dino(args: Mapping[str, Any]) -> None:
    for key in _DINO_FIXED:
        if args.get(key) != DINO_DEFAULTS[key]:
            raise NotImplementedError(
                f"DINO's {key}={args.get(key)!r} is not supported: this project builds DINO "
                f"as config/DINO/DINO_4scale.py has it ({key}={DINO_DEFAULTS[key]!r})."
            )
    if args["pe_temperatureH"] != args["pe_temperatureW"]:
        raise NotImplementedError(
            "DINO's pe_temperatureH and pe_temperatureW differ; the position encoding has one "
            "temperature."
        )
    if args["dec_pred_bbox_embed_share"] != args["dec_pred_class_embed_share"]:
        raise NotImplementedError(
            "DINO's dec_pred_bbox_embed_share and dec_pred_class_embed_share differ; share "
            "both heads or neither."
        )


def build_dino_model(
    args: Mapping[str, Any], num_classes: int = 91, pretrained_backbone: bool | str = False
) -> DeformableDETR:
    """DINO's detector (config/DINO/DINO_4scale.py with `args` over it) from this project's
    parts."""
    _check_dino(args)
    backbone = Backbone(
        name=args["backbone"],
        pretrained=pretrained_backbone,
        train_backbone=args["lr_backbone"] > 0,
        return_interm_layers=True,
        dilation=args["dilation"],
    )
    width = dict(
        d_model=args["hidden_dim"],
        n_heads=args["nheads"],
        n_levels=args["num_feature_levels"],
        d_ffn=args["dim_feedforward"],
        dropout=args["dropout"],
    )
    encoder = DeformableEncoder(
        layer=EncoderLayer(**width, n_points=args["enc_n_points"]), num_layers=args["enc_layers"]
    )
    decoder = DeformableDecoder(
        layer=DecoderLayer(**width, n_points=args["dec_n_points"]),
        num_layers=args["dec_layers"],
        look_forward_twice=True,
        box_query_pos=True,
        norm=True,
        logit_eps=1e-3,
    )
    queries = DINOQueries(
        num_queries=args["num_queries"], d_model=args["hidden_dim"], num_classes=num_classes
    )
    # use_dn=False switches denoising off (dn_number=0 would still make one group, as in DINO).
    blocks = (
        {
            "dn": ContrastiveDenoisingQueries(
                max_positives=args["dn_number"],
                label_noise=args["dn_label_noise_ratio"],
                box_noise=args["dn_box_noise_scale"],
                label_book=args["dn_labelbook_size"],
                logit_eps=1e-3,
            )
        }
        if args["use_dn"]
        else {}
    )
    position = PositionEmbeddingSine(
        args["hidden_dim"] // 2, temperature=args["pe_temperatureH"], offset=0.0
    )
    return DeformableDETR(
        backbone=backbone,
        encoder=encoder,
        decoder=decoder,
        queries=queries,
        num_classes=num_classes,
        box_refine=True,
        share_heads=args["dec_pred_bbox_embed_share"],
        position_embedding=position,
        training_queries=blocks,
    )


def official_optimization(args: Mapping[str, Any], *, lr_linear_proj_mult: float) -> dict[str, Any]:
    """The official main.py's optimisation as DetectionModule arguments: AdamW(lr, weight_decay)
    over parameter groups selected by official name (--lr_backbone_names at lr_backbone,
    --lr_linear_proj_names at lr x `lr_linear_proj_mult`, the rest at lr), and StepLR(--lr_drop)
    stepped every epoch (x0.1 every lr_drop epochs)."""
    groups = ParamGroups(
        lr=args["lr"],
        lr_backbone=args["lr_backbone"],
        lr_backbone_names=args["lr_backbone_names"],
        lr_linear_proj_mult=lr_linear_proj_mult,
        lr_linear_proj_names=args["lr_linear_proj_names"],
    )
    optimizer = functools.partial(
        torch.optim.AdamW, lr=args["lr"], weight_decay=args["weight_decay"]
    )
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=args["lr_drop"])
    return {
        "optimizer": optimizer,
        "lr_scheduler": LRSchedule(step, interval="epoch"),
        "param_groups": groups,
    }


def build_dino_from_args(
    args: Mapping[str, Any], num_classes: int = 91, pretrained_backbone: bool | str = False
) -> DetectionModule:
    """DINO's DetectionModule: its detector, criterion (losses under DINO's names), top-k
    post-processing and optimiser (param_dict_type 'default': the backbone at lr_backbone, every
    other parameter at lr; StepLR(lr_drop))."""
    model = build_dino_model(args, num_classes, pretrained_backbone)
    # DINO's GIoU (its util/box_ops) adds 1e-6 to the union and the enclosing area.
    matcher = HungarianMatcher(
        args["set_cost_class"],
        args["set_cost_bbox"],
        args["set_cost_giou"],
        focal_alpha=args["focal_alpha"],
        giou_eps=1e-6,
    )
    weights = {
        "ce": args["cls_loss_coef"],
        "bbox": args["bbox_loss_coef"],
        "giou": args["giou_loss_coef"],
    }
    interm = args["interm_loss_coef"]
    box_interm = 0.0 if args["no_interm_box_loss"] else interm
    branches = [Branch("main", matcher, weights, aux=args["aux_loss"])]
    if args["use_dn"]:
        branches.append(
            Branch(
                "dn_outputs",
                DenoisingAssigner(contrastive=True),
                dict(weights),
                suffix="_dn",
                aux=args["aux_loss"],
                suffix_first=True,
            )
        )
    # The encoder's selected proposals, matched with their classes (not class-agnostic); DINO's
    # enc_loss_coef is never read.
    branches.append(
        Branch(
            "enc_outputs",
            matcher,
            {
                "ce": weights["ce"] * interm,
                "bbox": weights["bbox"] * box_interm,
                "giou": weights["giou"] * box_interm,
            },
            suffix="_interm",
            aux=False,
        )
    )
    criterion = SetCriterion(num_classes, branches, focal_alpha=args["focal_alpha"], giou_eps=1e-6)
    return DetectionModule(
        model,
        criterion,
        TopKPostProcess(args["num_select"]),
        **official_optimization(args, lr_linear_proj_mult=1.0),
    )


def build_dn_detr_model(
    args: Mapping[str, Any], num_classes: int = 91, pretrained_backbone: bool | str = False
) -> DeformableDETR:
    """DN-Deformable-DETR (DN-DETR's `-m dn_dab_deformable_detr`, DAB-Deformable-DETR) from this
    project's parts: learned anchor boxes and content with the indicator feature (AnchorQueries),
    every decoder layer's positions from its boxes scaled by DAB's query_scale, box refinement with
    a head per layer, DN-DETR's inverse_sigmoid clamp 1e-3, and, with --use_dn, the denoising
    block."""
    for key in _DN_DETR_FIXED:
        if args.get(key) != DN_DETR_DEFAULTS[key]:
            raise NotImplementedError(
                f"DN-DETR's --{key} {args.get(key)!r} is not supported: this project builds "
                f"DN-Deformable-DETR as released ({key}={DN_DETR_DEFAULTS[key]!r})."
            )
    backbone = _resnet(args, pretrained_backbone)
    width, encoder = _encoder(args)
    # Its transformer builds ReLU layers whatever --transformer_activation says.
    decoder = DeformableDecoder(
        layer=DecoderLayer(**width, n_points=args["dec_n_points"]),
        num_layers=args["dec_layers"],
        box_query_pos=True,
        query_scale=True,
        logit_eps=1e-3,
    )
    queries = AnchorQueries(
        num_queries=args["num_queries"], d_model=args["hidden_dim"], indicator=True
    )
    blocks = (
        {
            "dn": DenoisingQueries(
                groups=args["scalar"],
                label_noise=args["label_noise_scale"],
                box_noise=args["box_noise_scale"],
                label_book=num_classes,
                logit_eps=1e-3,
                indicator=True,
            )
        }
        if args["use_dn"]
        else {}
    )
    # Its backbone's position encoding is position_encoding.py's
    # PositionEmbeddingSine(normalize=True): temperature 10000 and pixel centres, as
    # Deformable-DETR's (--pe_temperatureH/W are never read).
    return DeformableDETR(
        backbone=backbone,
        encoder=encoder,
        decoder=decoder,
        queries=queries,
        num_classes=num_classes,
        box_refine=True,
        training_queries=blocks,
    )


def build_dn_detr_from_args(
    args: Mapping[str, Any], num_classes: int = 91, pretrained_backbone: bool | str = False
) -> DetectionModule:
    """DN-Deformable-DETR's DetectionModule: its detector; Hungarian matching and losses on every
    layer (its GIoU with 1e-6 in both denominators), and with --use_dn the denoising branch with the
    same weights (its tgt_loss_* take the *_loss_coef values), padding queries without loss; its
    PostProcess keeps the top 100 (query, class) pairs (--num_select is not read); AdamW with two
    groups: the backbone at lr_backbone, everything else at lr (no linear-projection group);
    StepLR(lr_drop)."""
    model = build_dn_detr_model(args, num_classes, pretrained_backbone)
    # DN-DETR's GIoU (its util/box_ops, in the matching costs and the losses) adds 1e-6 to the union
    # and to the enclosing area, as DINO's.
    matcher = HungarianMatcher(
        args["set_cost_class"],
        args["set_cost_bbox"],
        args["set_cost_giou"],
        focal_alpha=args["focal_alpha"],
        giou_eps=1e-6,
    )
    weights = {
        "ce": args["cls_loss_coef"],
        "bbox": args["bbox_loss_coef"],
        "giou": args["giou_loss_coef"],
    }
    branches = [Branch("main", matcher, weights, aux=args["aux_loss"])]
    if args["use_dn"]:
        branches.append(
            Branch(
                "dn_outputs",
                DenoisingAssigner(contrastive=False, padding="ignore"),
                dict(weights),
                suffix="_dn",
                aux=args["aux_loss"],
            )
        )
    criterion = SetCriterion(num_classes, branches, focal_alpha=args["focal_alpha"], giou_eps=1e-6)
    return DetectionModule(
        model,
        criterion,
        TopKPostProcess(100),
        **official_optimization(args, lr_linear_proj_mult=1.0),
    )


def build_from_args(
    args: Mapping[str, Any],
    num_classes: int = 91,
    keys: Iterable[str] = (),
    pretrained_backbone: bool | str = False,
) -> DetectionModule:
    """The DetectionModule (detector, criterion, post-processing, optimiser settings) of the
    flags."""
    if args.get("modelname") == "dino":
        return build_dino_from_args(args, num_classes, pretrained_backbone)
    if args.get("modelname") == DN_DETR_MODEL:
        return build_dn_detr_from_args(args, num_classes, pretrained_backbone)
    for flag, what in _UNSUPPORTED.items():
        if args.get(flag):
            raise NotImplementedError(
                f"the official flag --{flag} ({what}) is not supported by this release yet."
            )
    model = build_model(args, num_classes, keys, pretrained_backbone)
    matcher = HungarianMatcher(
        args["set_cost_class"],
        args["set_cost_bbox"],
        args["set_cost_giou"],
        focal_alpha=args["focal_alpha"],
    )
    weights = {
        "ce": args["cls_loss_coef"],
        "bbox": args["bbox_loss_coef"],
        "giou": args["giou_loss_coef"],
    }
    if args["assign_second_stage"]:
        # DETA stage 2: IoU to the decoder's input proposals, assigned once and shared by all
        # layers.
        branches = [
            Branch(
                "main",
                IoUTopKAssigner("init_reference", 0.6, 4, 0.25),
                weights,
                aux=args["aux_loss"],
                assign_once=True,
            )
        ]
    else:
        branches = [Branch("main", matcher, weights, aux=args["aux_loss"])]
    if args["use_ms_detr"]:
        # --o2m_matcher_threshold / --o2m_matcher_k / --use_indices_merge never reach the official
        # criterion: the released models trained with its defaults, which are this assigner's.
        o2m_weights = {
            "ce": args["o2m_cls_loss_coef"],
            "bbox": args["o2m_bbox_loss_coef"],
            "giou": args["o2m_giou_loss_coef"],
        }
        branches.append(
            Branch(
                "o2m_outputs",
                MixedScoreTopKAssigner(),
                o2m_weights,
                suffix="_o2m",
                aux=args["aux_loss"],
            )
        )
    if args["two_stage"]:
        enc_matcher: Assigner
        if args["use_ms_detr"]:
            # MS-DETR matches GTs to the fixed anchors (no class cost); the loss is on the
            # predictions.
            enc_matcher = HungarianMatcher(
                0.0,
                args["set_cost_bbox"],
                args["set_cost_giou"],
                focal_alpha=args["focal_alpha"],
                box_key="anchors",
            )
            enc_weights = {
                "ce": args["enc_cls_loss_coef"],
                "bbox": args["enc_bbox_loss_coef"],
                "giou": args["enc_giou_loss_coef"],
            }
        elif args["assign_first_stage"]:
            enc_matcher = IoUTopKAssigner("anchors", 0.7, 4, 0.5, sample_size=256, ignore_below=0.3)
            enc_weights = dict(weights)
        else:
            enc_matcher, enc_weights = matcher, dict(weights)
        branches.append(
            Branch("enc_outputs", enc_matcher, enc_weights, suffix="_enc", aux=False, binary=True)
        )
    criterion = SetCriterion(num_classes, branches, focal_alpha=args["focal_alpha"])
    postprocess = (
        NMSPostProcess() if args["assign_second_stage"] else TopKPostProcess(args["topk_eval"])
    )
    # The official optimiser: AdamW groups selected by official parameter name, StepLR(--lr_drop).
    proj_mult = args["lr_linear_proj_mult"]
    return DetectionModule(
        model, criterion, postprocess, **official_optimization(args, lr_linear_proj_mult=proj_mult)
    )


def official_trainer_args(
    flags: Iterable[str] | Mapping[str, Any] | argparse.Namespace,
) -> dict[str, Any]:
    """The `lightning.Trainer` arguments of the official flags' training loop: epochs and
    `clip_grad_norm_(--clip_max_norm)` before every step (0 turns clipping off, as officially)."""
    args = parse_flags(flags)
    clip = float(args["clip_max_norm"])
    return {
        "max_epochs": int(args["epochs"]),
        "gradient_clip_val": clip if clip > 0 else None,
        "gradient_clip_algorithm": "norm",
    }


def _convert_state_dict(
    model: DeformableDETR, official: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    official = {k: v for k, v in official.items() if not is_swin_buffer(k)}
    if "dn" not in model.training_queries:
        # DINO keeps its label embedding with use_dn=False; nothing reads it then (zero gradient).
        official.pop("label_enc.weight", None)
    for head, alias, after in head_aliases(model):
        for name in [k for k in official if k.startswith(alias)]:
            tensor = official.pop(name)
            canonical = head + name[len(alias) :]
            if after or canonical not in official:
                official[canonical] = tensor
    return {from_official_name(name): tensor for name, tensor in official.items()}


def load_official_state_dict(
    module: DetectionModule,
    official: Mapping[str, torch.Tensor],
    *,
    fine_tune: bool = False,
    reset_class_heads: bool = False,
    source: str = "the official checkpoint",
) -> None:
    """Load an official state dict into a module of the matching architecture, or say what differs.
    Fine-tuning, the class heads may differ or be left out (`naming.fine_tune_skips`)."""

    model = module.model
    if not isinstance(model, DeformableDETR):
        raise TypeError(
            f"{source} holds Deformable-DETR weights; the module's detector is a "
            f"{type(model).__name__}."
        )
    mine = _convert_state_dict(model, official)
    expected = model.state_dict()
    skip = fine_tune_skips(
        expected, mine, fine_tune=fine_tune, reset_class_heads=reset_class_heads, source=source
    )
    mine, missing, unexpected, wrong = compare_state_dicts(expected, mine, skip)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(
                f"{len(missing)} missing (e.g. {to_official_name(missing[0], model.queries)})"
            )
        if unexpected:
            detail.append(
                f"{len(unexpected)} unexpected (e.g. "
                f"{to_official_name(unexpected[0], model.queries)})"
            )
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} of another shape (e.g. {to_official_name(k, model.queries)}: "
                f"checkpoint {tuple(mine[k].shape)} vs model {tuple(expected[k].shape)})"
            )
        raise ValueError(
            "the official checkpoint does not fit the configured architecture: "
            + "; ".join(detail)
            + ". Use the experiment config that matches the checkpoint (or pass its official flags)"
            + (
                "; fine-tuning, only the class heads may differ."
                if fine_tune or reset_class_heads
                else "."
            )
        )
    skip.warn()
    # Left-out heads are the only keys `mine` lacks: they keep the model's initialisation.
    model.load_state_dict(mine, strict=not skip.keys)


def read_checkpoint_file(
    path: str | os.PathLike, kind: str = "a checkpoint", mmap: bool = False
) -> Any:
    """torch.load of a checkpoint (official .pth or Lightning .ckpt; `kind` names it in errors)
    without unpickling arbitrary objects: tensors, containers and `argparse.Namespace` only.
    `mmap`: map the tensors instead of reading them (to look at a checkpoint's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; check the path to {kind}.")
    if path.stat().st_size == 0:
        raise ValueError(
            f"'{path}' could not be read as {kind}: it is empty (0 bytes), the save that wrote it "
            "did not finish; use another checkpoint of the run (checkpoints/latest.ckpt, "
            "best-*.ckpt)."
        )
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            raise ValueError(
                f"'{path}' could not be read as {kind} safely ({_load_failure(exc)}); it should "
                "be a torch.save'd dict of tensors and plain values, with 'model' (and 'args') or "
                "a Lightning 'state_dict'."
            ) from None


def _load_failure(exc: Exception) -> str:
    """Why torch.load refused a file, in a few words, without torch's advice to load it unsafely."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe or "Weights only load failed" in text:
        what = unsafe.group(1) if unsafe else "a pickled object"
        return (
            f"it holds Python objects that are not plain data ({what}), "
            "which msdetr does not unpickle"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return f"{type(exc).__name__}: the file is truncated or not a torch checkpoint"
    return f"{type(exc).__name__}: {first}"


def official_contents(
    ckpt: Any, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, args dict or None) of a loaded official checkpoint."""
    if isinstance(ckpt, Mapping) and "model" in ckpt:
        args = ckpt.get("args")
        return dict(ckpt["model"]), (vars(args) if isinstance(args, argparse.Namespace) else args)
    if isinstance(ckpt, Mapping) and all(torch.is_tensor(v) for v in ckpt.values()):
        return dict(ckpt), None
    raise ValueError(
        f"'{path}' holds no 'model' state dict; is it an official Deformable-DETR/MS-DETR/DETA "
        "checkpoint?"
    )


def read_official_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, args dict or None) of an official .pth, loaded without unpickling arbitrary
    objects."""
    return official_contents(read_checkpoint_file(path, "an official checkpoint"), path)


def from_official(
    checkpoint, flags=None, pretrained_backbone: bool | str = False
) -> DetectionModule:
    """Official state dict + official flags (list of str, dict or Namespace), or a checkpoint
    path."""
    if isinstance(checkpoint, (str, os.PathLike)):
        state_dict, ckpt_args = read_official_checkpoint(checkpoint)
        if flags is None:
            if ckpt_args is None:
                raise ValueError(
                    f"'{checkpoint}' stores no 'args'; pass the official flags it was trained with."
                )
            flags = ckpt_args
    else:
        state_dict = dict(checkpoint)
        if flags is None:
            raise ValueError(
                "from_official(state_dict, flags): the official flags are needed to build the "
                "model."
            )
    args = parse_flags(flags)
    # The weights say which ResNet they are (the parity fixtures run ResNet-18 through the
    # --backbone resnet50 code path, so the flag alone is not enough).
    args["backbone"] = _infer_backbone(state_dict) or args["backbone"]
    module = build_from_args(
        args,
        num_classes=_num_classes(state_dict),
        keys=state_dict.keys(),
        pretrained_backbone=pretrained_backbone,
    )
    load_official_state_dict(module, state_dict)
    return module
