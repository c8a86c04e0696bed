"""The known assignment of denoising queries (DN-DETR, DINO): no matching, each noised query is
supervised by the ground truth it was made from."""

from __future__ import annotations

import torch

from .base import Assigner, Indices

PADDING = ("ignore", "background")


class DenoisingAssigner(Assigner):
    """Assigns the denoising stream's queries to the GTs they were noised from, in the layout of
    `msdetr.models.DenoisingQueries`: groups of `parts` x (largest GT count) queries, GT j at
    position j of a group's first part; a contrastive group's second part (the negatives) stays
    unassigned, so it is supervised as background. Everything is read from shapes: no host sync.

    `normalizer_scale` is the number of groups: the loss is averaged over them, as DN-DETR and DINO
    normalise by num_boxes x groups. `class_loss_mask` says which queries enter the classification
    loss: the padding slots (an image's positions past its own GT count, up to the batch's largest)
    are left out in DN-DETR, whose loss reads only the real noised queries (`prepare_for_loss`), and
    kept as background in DINO, whose focal loss covers the whole denoising part.

    Args:
        contrastive: the stream holds DINO's positive and negative copies (two parts per group).
        padding: "ignore" (DN-DETR: padding slots get no loss) or "background" (DINO); None takes
            the paper's rule: "background" when contrastive, else "ignore".
    """

    def __init__(self, contrastive: bool = False, padding: str | None = None):
        self.parts = 2 if contrastive else 1
        padding = padding or ("background" if contrastive else "ignore")
        if padding not in PADDING:
            raise ValueError(
                f"unknown padding {padding!r} for the denoising assigner; use one of {PADDING}."
            )
        self.padding = padding

    def _layout(self, outputs: dict, targets: list[dict]) -> tuple[int, int]:
        largest = max((len(t["labels"]) for t in targets), default=0)
        queries = outputs["pred_logits"].shape[1]
        group = largest * self.parts
        if group == 0:
            return 0, 0
        if queries % group:
            raise ValueError(
                f"the denoising stream has {queries} queries, not groups of {self.parts} x "
                f"{largest} (the largest GT count); the assigner's contrastive setting must match "
                "the queries'."
            )
        return queries // group, group

    def assign(self, outputs: dict, targets: list[dict]) -> Indices:
        groups, size = self._layout(outputs, targets)
        device = outputs["pred_logits"].device
        out = []
        for t in targets:
            n = len(t["labels"])
            rows = (
                torch.arange(groups, device=device)[:, None] * size + torch.arange(n, device=device)
            ).reshape(-1)
            cols = torch.arange(n, device=device).repeat(groups)
            out.append((rows, cols))
        return out

    def normalizer_scale(self, outputs: dict, targets: list[dict]) -> float:
        return float(max(self._layout(outputs, targets)[0], 1))

    def class_loss_mask(self, outputs: dict, targets: list[dict]) -> torch.Tensor | None:
        """(B, Q) bool, True where a query enters the classification loss; None: every query."""
        if self.padding == "background":
            return None
        largest = self._layout(outputs, targets)[1] // self.parts
        position = torch.arange(
            outputs["pred_logits"].shape[1], device=outputs["pred_logits"].device
        ) % max(largest, 1)
        # Built from Python ints on the device: no host sync.
        return torch.stack([position < len(t["labels"]) for t in targets])
