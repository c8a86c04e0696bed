"""The set criterion: a list of supervision branches, each an output stream + an assigner +
weights."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from ..box_ops import at_least_float32, cxcywh_to_xyxy, generalized_box_iou
from ..matching import Assigner
from ..models.masks import image_pair_logits
from .masks import (
    IMPORTANCE_SAMPLE_RATIO,
    NUM_POINTS,
    OVERSAMPLE_RATIO,
    matched_point_losses,
)

Targets = list[dict[str, torch.Tensor]]

_STREAM_HINTS = {
    "enc_outputs": "the encoder branch needs two-stage queries (a two-stage model, e.g. "
    "model=deformable_detr_two_stage_refine)",
    "o2m_outputs": "the one-to-many branch needs model.detector.decoder.layer.o2m_tap (set by the "
    "ms_detr* matcher configs)",
    "hybrid_outputs": "this branch needs H-DETR's hybrid queries in "
    "model.detector.training_queries (set by the h_detr matcher configs)",
    "group_outputs": "this branch needs Group DETR's query groups in "
    "model.detector.training_queries (set by matcher=group_detr)",
    "dn_outputs": "the denoising branch needs a denoising block in "
    "model.detector.training_queries (set by the dn_detr and dino matcher configs) "
    "and a selection with box references",
}


# The weights of a branch's mask terms where it supervises masks and its weights leave them out:
# Mask DINO's (MaskDINO configs: MASK_WEIGHT 5.0, DICE_WEIGHT 5.0).
MASK_WEIGHTS = {"mask": 5.0, "dice": 5.0}
LOSS_TERMS = ("ce", "bbox", "giou", "mask", "dice")

# The classification losses a branch may use; the defaults (alpha, gamma) of the IoU-aware ones.
CLS_LOSSES = ("focal", "varifocal", "ia_bce")
_CLS_DEFAULTS = {"varifocal": (0.75, 2.0), "ia_bce": (0.25, 2.0)}


@dataclass
class Branch:
    """One supervision branch.

    stream: key of the model outputs it reads (`main` = `pred_logits`/`pred_boxes` + `aux_outputs`;
    otherwise a sub-dict such as `enc_outputs`, with its own `aux_outputs` when `aux`).
    assigner: an `Assigner` (msdetr/matching/base.py): per image of a layer, its (query, GT) pairs.
    weights: loss weight per term (`ce`, `bbox`, `giou`, and with masks `mask`, `dice`; those two
    default to Mask DINO's 5.0 each, and are ignored while `masks` is off, so one weights dict may
    serve branches with and without masks). suffix: appended to every loss name.
    masks: the branch also supervises its queries' instance masks (`loss_mask`: sigmoid BCE,
    `loss_dice`: dice, over importance-sampled points of each assigned (query, GT) pair, the pairs
    of the branch's own assigner, normalized as the box terms). Needs a detector with a mask head
    (`model.detector.mask_head`, its decoder streams carry `mask_embed`) and targets with "masks"
    (`data.masks=true`); the encoder stream has no masks.
    binary: class-agnostic targets (every label 0), as the two-stage encoder is trained.
    merge_with: stream of an earlier branch whose assignment of the same layer is merged into this
    one (MS-DETR's `use_indices_merge`: union, one GT per query, this branch winning conflicts;
    see `merge_indices`).
    assign_once: assign on the stream's last layer and reuse it for every layer (DETA's stage 2,
    whose quality depends only on the decoder's input proposals).
    repeat_targets: every GT appears this many times (H-DETR's one-to-many branch, k = 6); the
    normalizer grows with it, as in H-DETR where the branch sees k times the boxes.
    num_boxes_scale: extra factor on the normalizer (Group DETR averages over its G groups). The
    assigner's `normalizer_scale(layer_outputs, targets)` multiplies it further, by a factor known
    only from the batch (the denoising groups); its `class_loss_mask(layer_outputs, targets)` leaves
    the queries it marks False out of the classification loss (DN-DETR's padding slots).
    required: a model without this stream is an error; otherwise the branch is skipped (the encoder
    branch of a one-stage model, as the official criteria do).
    loss_cls: the classification loss. `focal` (default): sigmoid focal loss against 1 at each
    assigned query's class, with the criterion's `focal_alpha` / `focal_gamma`. `varifocal` and
    `ia_bce`: IoU-aware, the assigned query's target is the (detached) IoU of its predicted box with
    its GT; see `varifocal_loss` and `ia_bce_loss`. Every one is summed over queries x classes and
    divided by the branch's normalizer, like the focal term, so the `ce` weights stay comparable.
    cls_alpha, cls_gamma: that loss's alpha and gamma; None takes its default (focal: the
        criterion's
    focal_alpha / focal_gamma; varifocal: 0.75 / 2.0 as VarifocalNet; ia_bce: 0.25 / 2.0 as
    Align-DETR).
    suffix_first: the suffix goes before the layer index (`loss_ce_dn_0`, as DN-DETR and DINO name
    their denoising losses) instead of after it (`loss_ce_0_o2m`, as MS-DETR names its branch).
    """

    stream: str
    assigner: Assigner
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 2.0, "bbox": 5.0, "giou": 2.0})
    suffix: str = ""
    aux: bool = True
    binary: bool = False
    merge_with: str | None = None
    assign_once: bool = False
    repeat_targets: int = 1
    num_boxes_scale: float = 1.0
    required: bool = True
    loss_cls: str = "focal"
    cls_alpha: float | None = None
    cls_gamma: float | None = None
    suffix_first: bool = False
    masks: bool = False

    def __post_init__(self):
        if not isinstance(self.assigner, Assigner):
            kind = type(self.assigner).__name__
            raise TypeError(
                f"branch {self.stream!r}: its assigner is a {kind}, not an "
                "msdetr.matching.Assigner; point the branch's assigner at an Assigner "
                "subclass."
            )
        if self.loss_cls not in CLS_LOSSES:
            raise ValueError(
                f"branch {self.stream!r}: unknown loss_cls {self.loss_cls!r}; use one of "
                f"{', '.join(CLS_LOSSES)}."
            )
        if (self.cls_alpha is not None and not 0 <= self.cls_alpha <= 1) or (
            self.cls_gamma is not None and self.cls_gamma < 0
        ):
            raise ValueError(
                f"branch {self.stream!r}: cls_alpha must be in [0, 1] and cls_gamma >= 0 "
                f"(got {self.cls_alpha} and {self.cls_gamma})."
            )
        if self.repeat_targets < 1 or self.num_boxes_scale <= 0:
            raise ValueError(
                f"branch {self.stream!r}: repeat_targets must be >= 1 and num_boxes_scale > 0."
            )
        unknown = set(self.weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(
                f"unknown loss weight(s) {sorted(unknown)} in branch {self.stream!r}; use "
                f"{', '.join(LOSS_TERMS)}."
            )
        self.weights = {k: float(v) for k, v in self.weights.items()}
        if self.masks:
            self.weights = {**MASK_WEIGHTS, **self.weights}


def last_pair_per_query(queries: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(num_queries,) position of each query's last pair in `queries`, -1 where it has none.

    This is what the official `x[queries] = values` leaves on a CPU (the last write wins), made
    deterministic on every device (an index_put with repeated indices is not, on CUDA). Which pair
    is last is the assigner's rule: each one-to-many assigner lists its pairs in its own official
    order (`QualityTopKAssigner.pair_order`: MS-DETR's ends with the best GT, DETA's with the GT of
    the larger index).
    """
    positions = torch.arange(len(queries), device=queries.device)
    last = torch.full((num_queries,), -1, dtype=torch.int64, device=queries.device)
    return last.scatter_reduce_(0, queries, positions, reduce="amax")


def merge_indices(first, second, num_queries: int):
    """Per image the union of two assignments with one GT per query (official `indices_merge`):
    `second` wins conflicts and, within one assignment, a query's last pair wins; sorted by
    query."""
    return SetCriterion.merge_many([(first, second, num_queries)])[0]


def query_class_targets(
    indices, targets: Targets, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class target of a layer's assignment: one class per query, as the official criteria set
        it.

    Returns (batch, query, label) with each assigned query once. A query in several pairs (a
    one-to-many assigner's top-k of two GTs) takes the label of its last pair in the assigner's
    order (see `last_pair_per_query`); the box terms still count every pair.
    """
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    flat = batch * num_queries + torch.cat([src for src, _ in indices])
    last = last_pair_per_query(flat, len(indices) * num_queries)
    kept = (last >= 0).nonzero().squeeze(1)
    return kept // num_queries, kept % num_queries, labels[last[kept]]


def set_class_targets_(
    onehot: torch.Tensor, indices, targets: Targets, values: torch.Tensor | None = None
) -> torch.Tensor:
    """Write 1 into the (B, Q, C) zeros `onehot` at each `query_class_targets` entry, in place and
    without compacting the assigned queries (no data-dependent shape, so no device sync).

    `values`: one number per (query, GT) pair, in the order of `indices`; the entry then gets the
    value of the query's last pair (the pair that gave it its class) instead of 1.
    """
    b, q, c = onehot.shape
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    flat = batch * q + torch.cat([src for src, _ in indices])
    if flat.numel() == 0:
        return onehot
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    last = last_pair_per_query(flat, b * q)
    # Every (image, query) row gets one write: 1 at its last pair's label, 0 (a no-op) if
    # unassigned.
    written = (last >= 0).to(onehot.dtype)
    if values is not None:
        written = written * values.to(onehot.dtype)[last.clamp(min=0)]
    onehot.view(b * q, c).scatter_(1, labels[last.clamp(min=0)][:, None], written[:, None])
    return onehot


def aligned_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each xyxy box of `boxes1` (N, 4) with the box in the same row of `boxes2`: (N,), 0
    where both boxes are empty (no N x N matrix, unlike `box_iou`)."""
    low = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    high = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (high - low).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).tiny)


def varifocal_loss(
    logits: torch.Tensor,
    quality: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Varifocal loss of VarifocalNet (Zhang et al., "VarifocalNet: An IoU-aware Dense Object
    Detector", CVPR 2021, its Varifocal Loss), summed over every (query, class) entry ("sum") or
    per entry ("none").

    `quality` (the shape of `logits`) is the target q: the IoU of the query's box with its GT at the
    assigned query's class, 0 elsewhere. With p = sigmoid(logit):
        q > 0:  -q (q log p + (1 - q) log(1 - p))  = q * BCE(p, q)
        q = 0:  -alpha p^gamma log(1 - p)          = alpha p^gamma * BCE(p, 0)
    As in the paper, an assigned query whose box misses its GT (IoU 0) counts as a negative.
    `quality` must carry no gradient; the modulating factor p^gamma keeps its gradient, as the focal
    loss does.
    """
    prob = logits.sigmoid()
    weight = torch.where(quality > 0, quality, alpha * prob.pow(gamma))
    return _reduce(
        F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * weight, reduction
    )


def ia_bce_loss(
    logits: torch.Tensor,
    positive: torch.Tensor,
    iou: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """IoU-aware BCE (IA-BCE) of Align-DETR (Cai et al., "Align-DETR: Improving DETR with Simple
    IoU-aware BCE loss", arXiv 2304.07527v1, its IA-BCE loss), summed over every (query, class)
    entry ("sum") or per entry ("none").

    `positive` (bool, the shape of `logits`) marks each assigned query's class, `iou` holds there
    the IoU u of the query's box with its GT. With p = sigmoid(logit):
        positive:  BCE(p, t),  t = p^alpha * u^(1 - alpha)  (the target, detached: no gradient)
        otherwise: p^gamma * BCE(p, 0)
    Align-DETR's prime-sample weighting belongs to its many-to-one matching and is not part of this
    loss; its released code also floors u and t, which the paper's formula does not.
    """
    prob = logits.sigmoid()
    target = torch.where(positive, prob.detach().pow(alpha) * iou.detach().pow(1 - alpha), 0.0)
    weight = torch.where(positive, 1.0, prob.pow(gamma))
    return _reduce(
        F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight, reduction
    )


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'none'.")
    return loss.sum() if reduction == "sum" else loss


def world_num_boxes(targets: Targets, device) -> float:
    """GT count of the batch averaged over ranks, at least 1: the normalizer of every loss term.
    On one process it never touches the device; under DDP the all-reduced count is read back
    once."""
    num = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized():
        total = torch.as_tensor([num], device=device)
        dist.all_reduce(total)
        num = (total / dist.get_world_size()).item()
    return max(num, 1.0)


class SetCriterion(nn.Module):
    """Sums the classification (focal by default) / L1 / GIoU losses of every branch; losses keep
    the official names."""

    def __init__(
        self,
        num_classes: int,
        branches: list[Branch] | dict[str, Branch | None],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_eps: float = 0.0,
        mask_num_points: int = NUM_POINTS,
        mask_oversample_ratio: float = OVERSAMPLE_RATIO,
        mask_importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    ):
        """`branches`: a list, or a dict by name (what configs compose: a later config adds a branch
        by name or removes one with null); evaluated in order. `giou_eps`: of the GIoU loss, see
        `box_ops.generalized_box_iou` (DINO: 1e-6). `mask_*`: the point sampling of the branches
        with masks (`losses.masks.uncertain_points`; Mask DINO's 12544 points, oversample 3,
        importance 0.75); the points are drawn from torch's generator on the outputs' device,
        which every process seeds and every checkpoint saves (see `mask_terms`)."""
        super().__init__()
        self.num_classes = num_classes
        if mask_num_points < 1 or mask_oversample_ratio < 1:
            raise ValueError(
                f"matcher.criterion.mask_num_points={mask_num_points} and mask_oversample_ratio="
                f"{mask_oversample_ratio}: use at least 1 point and a ratio >= 1."
            )
        if not 0 <= mask_importance_sample_ratio <= 1:
            raise ValueError(
                "matcher.criterion.mask_importance_sample_ratio="
                f"{mask_importance_sample_ratio}: use a fraction in [0, 1]."
            )
        self.mask_num_points = mask_num_points
        self.mask_oversample_ratio = mask_oversample_ratio
        self.mask_importance_sample_ratio = mask_importance_sample_ratio
        if isinstance(branches, dict):
            names = [name for name, b in branches.items() if b is not None]
            branches = [b for b in branches.values() if b is not None]
        else:
            names = [b.stream for b in branches]
        # How the config calls each branch (matcher.criterion.branches.<name>), for the messages.
        self.branch_names = names
        if not branches:
            raise ValueError(
                "the criterion has no branches; the matcher config must supervise at least one "
                "stream."
            )
        self.branches = list(branches)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_eps = giou_eps
        self._weight_dict: dict[str, float] = {}

    def assigners(self) -> list:
        """Each distinct assigner of the branches once, in branch order."""
        seen: dict[int, Any] = {}
        for branch in self.branches:
            seen.setdefault(id(branch.assigner), branch.assigner)
        return list(seen.values())

    def check_model(self, streams: dict[str, set[str]]) -> None:
        """Raise one sentence when a branch needs a stream or box key the model does not produce.

        `streams`: the model's `output_streams` (stream -> box keys its assigners may match
            against).
        """
        with_masks = [b for b in self.branches if b.masks]
        if not with_masks and "mask_embed" in streams.get("main", set()):
            raise ValueError(
                "the model has a mask head (model.detector.mask_head) but no branch supervises "
                "masks, so it would not train; set matcher.masks=true (parts/mask_head does) or "
                "model.detector.mask_head=null."
            )
        for name, branch in zip(self.branch_names, self.branches):
            if (
                branch.masks
                and branch.stream in streams
                and ("mask_embed" not in streams[branch.stream])
            ):
                why = (
                    "the encoder's proposals are matched on boxes only"
                    if branch.stream == "enc_outputs"
                    else "the model has no mask head: add one with +parts=mask_head"
                )
                raise ValueError(
                    f"matcher.criterion.branches.{name}.masks=true supervises masks on "
                    f"{branch.stream!r}, which carries none ({why}); or set that masks=false."
                )
        for branch in self.branches:
            if branch.stream not in streams:
                if branch.required:
                    raise ValueError(
                        f"this matcher supervises the {branch.stream!r} stream, which the model "
                        f"does not produce (it has {sorted(streams)}): "
                        f"{_STREAM_HINTS.get(branch.stream, 'pick a matching model')}."
                    )
                continue
            key = branch.assigner.box_key
            if key not in streams[branch.stream]:
                raise ValueError(
                    f"the {branch.stream!r} branch assigns against {key!r}, which this model does "
                    f"not have there (only {sorted(streams[branch.stream])}); the IoU assigners "
                    "need a two-stage model (e.g. model=deformable_detr_two_stage_refine)."
                )

    @staticmethod
    def _layers(branch: Branch, outputs: dict) -> list[tuple[str, dict]]:
        if branch.stream == "main":
            stream = outputs
        elif branch.stream in outputs:
            stream = outputs[branch.stream]
        elif not branch.required:
            return []
        else:
            raise KeyError(
                f"the criterion has a branch on {branch.stream!r}, which this model does not "
                f"output (it has {sorted(k for k in outputs if not k.startswith('pred_'))}); pick "
                "a matcher config that fits the model (e.g. the encoder branch needs a two-stage "
                "model)."
            )
        layers = []
        if branch.aux:
            layers += [(f"_{i}", aux) for i, aux in enumerate(stream.get("aux_outputs", []))]
        layers.append(("", stream))
        return layers

    @property
    def weight_dict(self) -> dict[str, float]:
        """Weights of the names this criterion produces, for the number of aux layers last seen."""
        return dict(self._weight_dict)

    @staticmethod
    def _branch_targets(branch: Branch, targets: Targets) -> Targets:
        targets = (
            [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            if branch.binary
            else targets
        )
        if branch.repeat_targets > 1:
            # "masks" stay as they are: GT j of the repeated targets is mask j % G (`_gt_masks`).
            k = branch.repeat_targets
            targets = [
                {**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)}
                for t in targets
            ]
        return targets

    def forward(self, outputs: dict, targets: Targets) -> dict[str, torch.Tensor]:
        """Every loss term (and logged metric) by its official name. Under mixed precision the
        matching costs and the loss reductions run in fp32 (autocast off, outputs upcast)."""
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            return self._losses(outputs, targets)

    def _losses(self, outputs: dict, targets: Targets) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        num_boxes = world_num_boxes(targets, device)
        per_branch = [(branch, self._branch_targets(branch, targets)) for branch in self.branches]
        jobs = [
            (branch, layer_suffix, layer_out, tgts)
            for branch, tgts in per_branch
            for layer_suffix, layer_out in self._layers(branch, outputs)
        ]
        assigned = self._assign(jobs)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for branch, layer_suffix, layer_out, tgts in jobs:
            indices = assigned[(branch.stream, layer_suffix)]
            name = (
                branch.suffix + layer_suffix
                if branch.suffix_first
                else layer_suffix + branch.suffix
            )
            normalizer = num_boxes * branch.repeat_targets * branch.num_boxes_scale
            # e.g. denoising: averaged over its groups; DN-DETR's padding queries left out
            normalizer = normalizer * branch.assigner.normalizer_scale(layer_out, tgts)
            mask = branch.assigner.class_loss_mask(layer_out, tgts)
            terms = self.layer_losses(layer_out, tgts, indices, normalizer, branch, mask)
            if branch.masks:
                terms.update(self.mask_terms(layer_out, tgts, indices, normalizer, branch))
            for key in ("ce", "bbox", "giou", "mask", "dice"):
                if key in terms:
                    losses[f"loss_{key}{name}"] = terms[key]
                    weights[f"loss_{key}{name}"] = branch.weights.get(key, 0.0)
            losses[f"cardinality_error{name}"] = terms["cardinality"]
            if not branch.binary and not layer_suffix:
                losses[f"class_error{branch.suffix}"] = self.class_error(layer_out, tgts, indices)
        self._weight_dict = weights
        return losses

    def mask_terms(
        self, out: dict, targets: Targets, indices, num_masks: float, branch: Branch
    ) -> dict[str, torch.Tensor]:
        """{"mask", "dice"}: the mask losses of one layer's assigned (query, GT) pairs, divided by
        the branch's normalizer (the box terms' `num_masks`).

        Only the pairs' low-resolution maps are made (`image_pair_logits`: each query's mask
        embedding against its image's pixel embedding), then sampled at `mask_num_points` points
        each, drawn toward the uncertain ones (`losses.masks.matched_point_losses`); the GT masks
        are read at the same points. No host read: the per-image pair counts are the index
        tensors' shapes. The points come from torch's generator on the outputs' device: it is
        seeded per process (seed + rank) and saved with every checkpoint, so runs repeat and
        resume; a generator of the criterion's own would have to live on that device, which is
        known only at the first step (a CPU one would draw every point on the host and copy it
        over)."""
        if "mask_embed" not in out:
            raise ValueError(
                f"branch {branch.stream!r} supervises masks but its outputs carry no mask "
                "embeddings; give the detector a mask head (+parts=mask_head) or set the branch's "
                "masks=false."
            )
        gt_masks = [self._gt_masks(t, branch) for t in targets]
        embed = at_least_float32(out["mask_embed"])
        logits = image_pair_logits(embed, out["mask_features"], [src for src, _ in indices])
        if logits.shape[0] == 0:  # no pair at all: zero, still depending on the head
            zero = (embed.sum() + out["mask_features"].sum()) * 0.0
            return {"mask": zero, "dice": zero}
        gt_index = [
            tgt % masks.shape[0] if masks.shape[0] else tgt
            for masks, (_, tgt) in zip(gt_masks, indices)
        ]
        return matched_point_losses(
            logits,
            [len(src) for src, _ in indices],
            gt_masks,
            gt_index,
            out["mask_valid_ratio"],
            num_masks,
            num_points=self.mask_num_points,
            oversample_ratio=self.mask_oversample_ratio,
            importance_sample_ratio=self.mask_importance_sample_ratio,
        )

    @staticmethod
    def _gt_masks(target: dict, branch: Branch) -> torch.Tensor:
        if "masks" not in target:
            raise ValueError(
                f"branch {branch.stream!r} supervises masks, but the targets have none; set "
                "data.masks=true (a dataset with segmentations) or the branch's masks=false."
            )
        return target["masks"]

    def _assign(self, jobs) -> dict[tuple[str, str], list]:
        """Every branch's assignment of every layer. The calls are grouped by their assigner's
        `batch_group` and each group is assigned at once (`Assigner.assign_many`): e.g. the
        Hungarian cost matrices of all layers and images in one device-to-host copy per step."""
        assigned: dict[tuple[str, str], list] = {}
        once: dict[str, tuple[str, str]] = {}
        groups: dict[type[Assigner], list] = {}
        aliases = {}
        # As the official criteria do: per branch the last layer first, then the aux layers in
        # order. This is the order of the assigners' random draws, which every group's batch keeps.
        ordered = sorted(
            range(len(jobs)), key=lambda i: (self.branches.index(jobs[i][0]), jobs[i][1] != "", i)
        )
        for branch, layer_suffix, layer_out, tgts in (jobs[i] for i in ordered):
            key = (branch.stream, layer_suffix)
            if branch.assign_once:
                if branch.stream in once:
                    aliases[key] = once[branch.stream]
                    continue
                once[branch.stream] = key
            group = type(branch.assigner).batch_group()
            groups.setdefault(group, []).append((key, (branch.assigner, layer_out, tgts)))
        with torch.no_grad():
            for group, calls in groups.items():
                for (key, _), result in zip(calls, group.assign_many([call for _, call in calls])):
                    assigned[key] = result
        for key, source in aliases.items():
            assigned[key] = assigned[source]
        merges = []
        for branch, layer_suffix, layer_out, _ in jobs:
            if branch.merge_with is not None:
                if (branch.merge_with, layer_suffix) not in assigned:
                    raise KeyError(
                        f"branch {branch.stream!r} merges with {branch.merge_with!r}, which must "
                        "be an earlier branch over the same decoder layers."
                    )
                merges.append(
                    (
                        (branch.stream, layer_suffix),
                        (branch.merge_with, layer_suffix),
                        layer_out["pred_logits"].shape[1],
                    )
                )
        merged_keys = {key for key, _, _ in merges}
        # chained merges: one after the other
        if any(source in merged_keys for _, source, _ in merges):
            for key, source, num_queries in merges:
                assigned[key] = merge_indices(assigned[source], assigned[key], num_queries)
            return assigned
        batch = self.merge_many([(assigned[source], assigned[key], q) for key, source, q in merges])
        for (key, _, _), merged in zip(merges, batch):
            assigned[key] = merged
        return assigned

    @classmethod
    def merge_many(cls, merges: list[tuple[list, list, int]]) -> list[list]:
        """`merge_indices` of several (first, second, num_queries) at once (every layer of a
        step), with a single device-to-host copy (how many queries each merge keeps) for all of
        them."""
        lasts = []  # per merge, per image: (last pair of each query, the pairs' GTs)
        for first, second, num_queries in merges:
            per_image = []
            for (q1, g1), (q2, g2) in zip(first, second):
                queries, gts = torch.cat([q1, q2.to(q1.device)]), torch.cat([g1, g2.to(g1.device)])
                per_image.append((last_pair_per_query(queries, num_queries), gts))
            lasts.append(per_image)
        flat = [last for per_image in lasts for last, _ in per_image]
        if not flat:
            return [[] for _ in merges]
        counts = iter(cls.counts_on_host(torch.stack([(last >= 0).sum() for last in flat]).cpu()))
        merged: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for per_image in lasts:
            merged.append([])
            for last, gts in per_image:
                # The kept queries in ascending order, without `nonzero`: queries without a pair
                # sort last.
                query = torch.arange(len(last), device=last.device)
                kept = torch.where(last >= 0, query, len(last)).sort().values[: next(counts)]
                merged[-1].append((kept, gts[last[kept]]))
        return merged

    @staticmethod
    def counts_on_host(counts: torch.Tensor) -> list[int]:
        """The one host read of `merge_many`: a CPU copy of how many queries each merge keeps."""
        return counts.tolist()

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # Added in weight order, as the official sum does (the first term starts the sum).
        return functools.reduce(
            operator.add, [losses[k] * w for k, w in self.weight_dict.items() if k in losses]
        )

    def cls_loss_params(self, branch: Branch | None) -> tuple[str, float, float]:
        """(loss_cls, alpha, gamma) of a branch, its None fields filled with that loss's
        defaults."""
        kind = "focal" if branch is None else branch.loss_cls
        alpha, gamma = (
            (self.focal_alpha, self.focal_gamma) if kind == "focal" else _CLS_DEFAULTS[kind]
        )
        if branch is not None:
            alpha = alpha if branch.cls_alpha is None else branch.cls_alpha
            gamma = gamma if branch.cls_gamma is None else branch.cls_gamma
        return kind, alpha, gamma

    def layer_losses(
        self,
        out: dict,
        targets: Targets,
        indices,
        num_boxes: float,
        branch: Branch | None = None,
        class_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss terms of one layer; `branch` picks the classification loss (focal without one).
        `class_mask` (B, Q) bool: only these queries enter the classification loss (None: all)."""
        logits = out["pred_logits"]
        # The box terms count every (query, GT) pair.
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        src_boxes = at_least_float32(out["pred_boxes"][batch_idx, src_idx])
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(
            src_boxes.dtype
        )

        # One class per assigned query; unassigned queries are all-negative.
        scores = at_least_float32(logits)
        onehot = torch.zeros_like(scores)
        set_class_targets_(onehot, indices, targets)
        src_xyxy, tgt_xyxy = cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)
        kind, alpha, gamma = self.cls_loss_params(branch)
        if kind == "focal":
            loss_ce = sigmoid_focal_loss(scores, onehot, alpha, gamma, reduction="none")
        else:
            with torch.no_grad():  # the IoU is a target: no gradient reaches the boxes through it
                iou = aligned_iou(src_xyxy, tgt_xyxy)
                quality = set_class_targets_(torch.zeros_like(scores), indices, targets, values=iou)
            if kind == "varifocal":
                loss_ce = varifocal_loss(scores, quality, alpha, gamma, reduction="none")
            else:
                loss_ce = ia_bce_loss(scores, onehot > 0, quality, alpha, gamma, reduction="none")
        if class_mask is not None:
            loss_ce = loss_ce * class_mask[..., None].to(loss_ce.dtype)
        loss_ce = loss_ce.sum()

        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum")
        giou = torch.diag(generalized_box_iou(src_xyxy, tgt_xyxy, self.giou_eps))
        loss_giou = (1 - giou).sum()

        with torch.no_grad():
            counts = torch.tensor([float(len(t["labels"])) for t in targets], dtype=torch.float32)
            # the host does not wait for the copy
            counts = counts.to(logits.device, non_blocking=True)
            card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            cardinality = F.l1_loss(card_pred, counts)
        return {
            "ce": loss_ce / num_boxes,
            "bbox": loss_bbox / num_boxes,
            "giou": loss_giou / num_boxes,
            "cardinality": cardinality,
        }

    @staticmethod
    @torch.no_grad()
    def class_error(out: dict, targets: Targets, indices) -> torch.Tensor:
        """100 - top-1 accuracy (%) over the assigned (query, GT) pairs, each pair with its own GT's
        label, as the official metric counts them; logged, never summed."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        logits = out["pred_logits"][batch_idx, src_idx]
        if labels.numel() == 0:
            return logits.new_tensor(100.0)
        correct = (logits.argmax(-1) == labels).float().mean() * 100
        return 100 - correct
