"""Test helpers for the assigners: a fixed assignment, and the one-to-many assigners' random cap and
per-GT top-k written image by image (the form `QualityTopKAssigner.assign_many` batches)."""

from __future__ import annotations

import torch

from msdetr.matching import Assigner
from msdetr.matching.quality import order_pairs


class FixedAssigner(Assigner):
    """Gives every call the same hand-written (query, GT) pairs per image."""

    def __init__(self, indices):
        self.indices = indices

    def assign(self, outputs, targets):
        return self.indices


def cap_positives(
    positive: torch.Tensor,
    max_positives: int,
    generator: torch.Generator | None,
    num_negatives: int = 0,
) -> torch.Tensor:
    """Keep at most `max_positives` of the positives, a uniformly random subset (no effect below).

    Draws as the official `subsample_labels` does, whether or not the cap binds: a permutation of
    the positives, then one of the `num_negatives` negatives (unused: the one-to-many assigners keep
    positives only)."""
    idx = positive.nonzero().squeeze(1)
    perm = torch.randperm(idx.numel(), device="cpu", generator=generator).to(idx.device)
    torch.randperm(num_negatives, device="cpu", generator=generator)
    capped = torch.zeros_like(positive)
    capped[idx[perm[:max_positives]]] = True
    return capped


def topk_per_gt(
    quality: torch.Tensor,
    best_gt: torch.Tensor,
    positive: torch.Tensor,
    k: int,
    pair_order: str = "quality",
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each GT with c positives its top-min(c, k) candidates over all candidates, listed in
    `pair_order` (see msdetr/matching/quality.py)."""
    num_gt, num_cand = quality.shape
    counts = torch.bincount(best_gt[positive], minlength=num_gt)
    k = min(k, num_cand)
    values, cand = quality.topk(k, dim=1)
    keep = torch.arange(k, device=quality.device)[None, :] < counts[:, None]
    gt = torch.arange(num_gt, device=quality.device)[:, None].expand(-1, k)
    return order_pairs(values[keep], cand[keep], gt[keep], pair_order)
