"""The known assignment of denoising queries (DN-DETR, DINO): no matching, each noised query is
supervised by the ground truth it was made from."""
from __future__ import annotations

import torch

from .hungarian import Indices


class DenoisingAssigner:
    """Assigns the denoising stream's queries to the GTs they were noised from, in the layout of
    `msdetr.models.DenoisingQueries`: groups of `parts` x (largest GT count) queries, GT j at
    position j of a group's first part; a contrastive group's second part (the negatives) stays
    unassigned, so it is supervised as background. Everything is read from shapes: no host sync.

    `normalizer_scale` is the number of groups: the loss is averaged over them, as DN-DETR and DINO
    normalise by num_boxes x groups.

    Args:
        contrastive: the stream holds DINO's positive and negative copies (two parts per group).
    """

    def __init__(self, contrastive: bool = False):
        self.parts = 2 if contrastive else 1

    def _layout(self, outputs: dict, targets: list[dict]) -> tuple[int, int]:
        largest = max((len(t["labels"]) for t in targets), default=0)
        queries = outputs["pred_logits"].shape[1]
        group = largest * self.parts
        if group == 0:
            return 0, 0
        if queries % group:
            raise ValueError(f"the denoising stream has {queries} queries, not groups of {self.parts} x {largest} "
                             "(the largest GT count); the assigner's contrastive setting must match the queries'.")
        return queries // group, group

    def __call__(self, outputs: dict, targets: list[dict]) -> Indices:
        groups, size = self._layout(outputs, targets)
        device = outputs["pred_logits"].device
        out = []
        for t in targets:
            n = len(t["labels"])
            rows = (torch.arange(groups, device=device)[:, None] * size + torch.arange(n, device=device)).reshape(-1)
            cols = torch.arange(n, device=device).repeat(groups)
            out.append((rows, cols))
        return out

    def normalizer_scale(self, outputs: dict, targets: list[dict]) -> float:
        return float(max(self._layout(outputs, targets)[0], 1))
