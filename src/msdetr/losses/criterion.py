"""The set criterion: a list of supervision branches, each an output stream + an assigner + weights."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from ..box_ops import cxcywh_to_xyxy, generalized_box_iou
from ..matching import HungarianMatcher, solve_assignments

Targets = list[dict[str, torch.Tensor]]


@dataclass
class Branch:
    """One supervision branch.

    stream: key of the model outputs it reads (`main` = `pred_logits`/`pred_boxes` + `aux_outputs`;
    otherwise a sub-dict such as `enc_outputs`, with its own `aux_outputs` when `aux`).
    assigner: callable(layer_outputs, targets) -> list of (query_idx, gt_idx) per image.
    weights: loss weight per term (`ce`, `bbox`, `giou`). suffix: appended to every loss name.
    binary: class-agnostic targets (every label 0), as the two-stage encoder is trained.
    merge_with: stream of an earlier branch whose assignment of the same layer is merged into this
    one (MS-DETR's `use_indices_merge`: union, one GT per query, this branch winning conflicts).
    assign_once: assign on the stream's last layer and reuse it for every layer (DETA's stage 2,
    whose quality depends only on the decoder's input proposals).
    """

    stream: str
    assigner: Callable[[dict, Targets], Any]
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 2.0, "bbox": 5.0, "giou": 2.0})
    suffix: str = ""
    aux: bool = True
    binary: bool = False
    merge_with: str | None = None
    assign_once: bool = False

    def __post_init__(self):
        unknown = set(self.weights) - {"ce", "bbox", "giou"}
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)} in branch {self.stream!r}; use ce, bbox, giou.")
        self.weights = {k: float(v) for k, v in self.weights.items()}


def merge_indices(first, second, num_queries: int):
    """Per image the union of two assignments, one GT per query, `second` winning; sorted by query."""
    merged = []
    for (q1, g1), (q2, g2) in zip(first, second):
        table = torch.full((num_queries,), -1, dtype=torch.int64, device=q1.device)
        table[q1] = g1
        table[q2] = g2.to(q1.device)
        queries = (table >= 0).nonzero().squeeze(1)
        merged.append((queries, table[queries]))
    return merged


def world_num_boxes(targets: Targets, device) -> float:
    """GT count of the batch averaged over ranks, at least 1: the normalizer of every loss term."""
    num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


class SetCriterion(nn.Module):
    """Sums the focal / L1 / GIoU losses of every branch; losses keep the official names."""

    def __init__(self, num_classes: int, branches: list[Branch], focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.branches = list(branches)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self._weight_dict: dict[str, float] = {}

    @staticmethod
    def _layers(branch: Branch, outputs: dict) -> list[tuple[str, dict]]:
        if branch.stream == "main":
            stream = outputs
        elif branch.stream in outputs:
            stream = outputs[branch.stream]
        else:
            raise KeyError(
                f"the criterion has a branch on {branch.stream!r}, which this model does not output "
                f"(it has {sorted(k for k in outputs if not k.startswith('pred_'))}); pick a matcher config "
                "that fits the model (e.g. the encoder branch needs model.two_stage=true)."
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

    def forward(self, outputs: dict, targets: Targets) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        num_boxes = world_num_boxes(targets, device)
        binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        jobs = [(branch, layer_suffix, layer_out, binary_targets if branch.binary else targets)
                for branch in self.branches for layer_suffix, layer_out in self._layers(branch, outputs)]
        assigned = self._assign(jobs)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for branch, layer_suffix, layer_out, tgts in jobs:
            indices = assigned[(branch.stream, layer_suffix)]
            name = layer_suffix + branch.suffix
            terms = self.layer_losses(layer_out, tgts, indices, num_boxes)
            for key in ("ce", "bbox", "giou"):
                losses[f"loss_{key}{name}"] = terms[key]
                weights[f"loss_{key}{name}"] = branch.weights.get(key, 0.0)
            losses[f"cardinality_error{name}"] = terms["cardinality"]
            if not branch.binary and not layer_suffix:
                losses[f"class_error{branch.suffix}"] = self.class_error(layer_out, tgts, indices)
        self._weight_dict = weights
        return losses

    def _assign(self, jobs) -> dict[tuple[str, str], list]:
        """Every branch's assignment of every layer. The Hungarian cost matrices of all layers and
        images are solved together: one device-to-host copy per step instead of one per layer."""
        assigned: dict[tuple[str, str], list] = {}
        hungarian = [j for j in jobs if isinstance(j[0].assigner, HungarianMatcher)]
        with torch.no_grad():
            costs = [branch.assigner.cost_matrices(out, tgts) for branch, _, out, tgts in hungarian]
        solved = solve_assignments([c for per_image in costs for c in per_image])
        for (branch, layer_suffix, _, tgts), per_image in zip(hungarian, costs):
            assigned[(branch.stream, layer_suffix)], solved = solved[:len(per_image)], solved[len(per_image):]
        once: dict[str, list] = {}
        # As the official criteria do: per branch the last layer first, then the aux layers in order.
        ordered = sorted(range(len(jobs)), key=lambda i: (self.branches.index(jobs[i][0]), jobs[i][1] != "", i))
        for branch, layer_suffix, layer_out, tgts in (jobs[i] for i in ordered):
            key = (branch.stream, layer_suffix)
            if key in assigned:
                continue
            if branch.assign_once:
                if branch.stream not in once:
                    once[branch.stream] = branch.assigner(layer_out, tgts)
                assigned[key] = once[branch.stream]
            else:
                assigned[key] = branch.assigner(layer_out, tgts)
        for branch, layer_suffix, layer_out, tgts in jobs:
            key = (branch.stream, layer_suffix)
            if branch.merge_with is not None:
                if (branch.merge_with, layer_suffix) not in assigned:
                    raise KeyError(f"branch {branch.stream!r} merges with {branch.merge_with!r}, which must be "
                                   "an earlier branch over the same decoder layers.")
                other = assigned[(branch.merge_with, layer_suffix)]
                assigned[key] = merge_indices(other, assigned[key], layer_out["pred_logits"].shape[1])
        return assigned

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    def layer_losses(self, out: dict, targets: Targets, indices, num_boxes: float) -> dict[str, torch.Tensor]:
        logits = out["pred_logits"]
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        # One-hot targets over every (query, class); unmatched queries are all-negative.
        onehot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, src_idx, labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")

        src_boxes = out["pred_boxes"][batch_idx, src_idx].float()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum")
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum()

        with torch.no_grad():
            counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float32)
            card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
            cardinality = F.l1_loss(card_pred, counts)
        return {"ce": loss_ce / num_boxes, "bbox": loss_bbox / num_boxes, "giou": loss_giou / num_boxes,
                "cardinality": cardinality}

    @staticmethod
    @torch.no_grad()
    def class_error(out: dict, targets: Targets, indices) -> torch.Tensor:
        """100 - top-1 accuracy (%) of the matched queries; logged, never summed."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        logits = out["pred_logits"][batch_idx, src_idx]
        if labels.numel() == 0:
            return logits.new_tensor(100.0)
        correct = (logits.argmax(-1) == labels).float().mean() * 100
        return 100 - correct
