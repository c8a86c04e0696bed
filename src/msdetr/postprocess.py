"""Turning raw outputs into detections: top-k over (query, class) pairs."""
from __future__ import annotations

import torch
from torch import nn

from torchvision.ops import batched_nms

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


class NMSPostProcess(nn.Module):
    """DETA's class-aware NMS: every (query, class) pair, at most `pre_topk` by score, batched NMS by
    label at `iou_threshold`, the best `num_select` kept; no score threshold."""

    def __init__(self, num_select: int = 100, iou_threshold: float = 0.7, pre_topk: int = 10000):
        super().__init__()
        self.num_select, self.iou_threshold, self.pre_topk = num_select, iou_threshold, pre_topk

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, c = logits.shape
        scores = logits.float().sigmoid().view(b, -1)
        h, w = orig_sizes.to(torch.float32).unbind(1)
        boxes = cxcywh_to_xyxy(boxes.float()) * torch.stack([w, h, w, h], 1)[:, None, :]
        results = []
        for i in range(b):
            score = scores[i]
            idx = torch.arange(q * c, device=score.device)
            if q * c > self.pre_topk:
                idx = score.topk(self.pre_topk).indices
            query, label = torch.div(idx, c, rounding_mode="floor"), idx % c
            box, score = boxes[i, query], score[idx]
            keep = batched_nms(box, score, label, self.iou_threshold)[: self.num_select]
            results.append({"scores": score[keep], "labels": label[keep], "boxes": box[keep]})
        return results
