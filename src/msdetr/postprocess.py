"""Turning raw outputs into detections: top-k over (query, class) pairs."""
from __future__ import annotations

import torch
from torch import nn

from .box_ops import cxcywh_to_xyxy


class TopKPostProcess(nn.Module):
    """sigmoid, flatten (query, class), keep the top-k; boxes in absolute xyxy of the original image."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, c = logits.shape
        prob = logits.float().sigmoid().view(b, -1)
        scores, idx = torch.topk(prob, min(self.num_select, q * c), dim=1)
        query = torch.div(idx, c, rounding_mode="floor")
        labels = idx % c
        boxes = torch.gather(cxcywh_to_xyxy(boxes.float()), 1, query.unsqueeze(-1).expand(-1, -1, 4))
        h, w = orig_sizes.to(boxes.dtype).unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": bx} for s, l, bx in zip(scores, labels, boxes)]
