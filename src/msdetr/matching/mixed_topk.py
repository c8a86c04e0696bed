"""MS-DETR's one-to-many assigner: mixed IoU / class score, threshold, per-GT top-k."""
from __future__ import annotations

import torch

from ..box_ops import box_iou, cxcywh_to_xyxy

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def quality_assign(quality: torch.Tensor, threshold: float, allow_low_quality: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N) match quality -> per candidate its best GT and whether it is positive.

    A candidate is positive when its best quality reaches `threshold`; with `allow_low_quality`
    every GT's best candidate is positive too, keeping its own best GT (the official code takes
    one candidate per GT, `topk(1)`, so ties are not all included).
    """
    best_val, best_gt = quality.max(dim=0)
    positive = best_val >= threshold
    if allow_low_quality and quality.shape[1]:
        positive[quality.argmax(dim=1)] = True
    return best_gt, positive


def cap_positives(positive: torch.Tensor, max_positives: int, generator: torch.Generator | None) -> torch.Tensor:
    """Keep at most `max_positives` of the positives, a uniformly random subset (no effect below)."""
    idx = positive.nonzero().squeeze(1)
    if idx.numel() <= max_positives:
        return positive
    perm = torch.randperm(idx.numel(), device="cpu", generator=generator).to(idx.device)
    capped = torch.zeros_like(positive)
    capped[idx[perm[:max_positives]]] = True
    return capped


def topk_per_gt(quality: torch.Tensor, best_gt: torch.Tensor, positive: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each GT with c positives, its top-min(c, k) candidates by quality over *all* candidates;
    pairs ordered by ascending quality (a query claimed twice keeps the better GT's class last)."""
    num_gt, num_cand = quality.shape
    counts = torch.bincount(best_gt[positive], minlength=num_gt)
    k = min(k, num_cand)
    values, cand = quality.topk(k, dim=1)
    keep = torch.arange(k, device=quality.device)[None, :] < counts[:, None]
    gt = torch.arange(num_gt, device=quality.device)[:, None].expand(-1, k)
    order = values[keep].argsort()
    return cand[keep][order], gt[keep][order]


class MixedScoreTopKAssigner:
    """One-to-many assignment of MS-DETR (per image, no gradient).

    score[g, q] = box_weight * IoU(box_q, gt_g) + class_weight * p_q[label_g]; each query takes its
    best GT, positive if score >= threshold (plus every GT's best queries with `allow_low_quality`);
    at most `positive_fraction * Q` positives; then every GT keeps its top-min(c_g, k) queries.
    The released models used threshold 0.4, k 6, weights 0.7 / 0.3, fraction 0.25.
    """

    def __init__(self, threshold: float = 0.4, k: int = 6, box_weight: float = 0.7, class_weight: float = 0.3,
                 positive_fraction: float = 0.25, allow_low_quality: bool = True, seed: int | None = None):
        if k < 1:
            raise ValueError(f"the o2m assigner's k must be >= 1, got {k}.")
        if not 0 < positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}.")
        self.threshold, self.k = threshold, k
        self.box_weight, self.class_weight = box_weight, class_weight
        self.positive_fraction = positive_fraction
        self.allow_low_quality = allow_low_quality
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def quality(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor):
        iou = box_iou(cxcywh_to_xyxy(gt_boxes.float()), cxcywh_to_xyxy(boxes.float()))
        prob = logits.float().sigmoid()[:, labels].T
        return self.box_weight * iou + self.class_weight * prob

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> Indices:
        logits, boxes = outputs["pred_logits"].detach(), outputs["pred_boxes"].detach()
        num_queries = logits.shape[1]
        out = []
        for b, tgt in enumerate(targets):
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            if len(tgt["labels"]) == 0:
                out.append((empty, empty))
                continue
            q = self.quality(logits[b], boxes[b], tgt["labels"], tgt["boxes"])
            best_gt, positive = quality_assign(q, self.threshold, self.allow_low_quality)
            positive = cap_positives(positive, int(self.positive_fraction * num_queries), self.generator)
            out.append(topk_per_gt(q, best_gt, positive, self.k))
        return out
