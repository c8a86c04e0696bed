"""Box helpers shared by models, assigners, losses and post-processing."""

from __future__ import annotations

import torch
from torchvision.ops import box_area, box_convert, box_iou
from torchvision.ops import generalized_box_iou as _torchvision_giou

__all__ = [
    "at_least_float32",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "inverse_sigmoid",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and eps on both x and 1 - x, as the official code does."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to fp32; fp32 and fp64 kept. Matching costs and loss reductions run in
    the model's own precision, as the official code computes them, but never in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """(N, M) GIoU of xyxy boxes. `eps` > 0 adds it to the union and to the enclosing area before
    dividing, as DINO's util/box_ops does (1e-6); 0: torchvision's, as Deformable-DETR computes
    it."""
    if not eps:
        return _torchvision_giou(boxes1, boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    low = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    high = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = area1[:, None] + area2 - inter
    iou = inter / (union + eps)
    enclosing = torch.max(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.min(
        boxes1[:, None, :2], boxes2[:, :2]
    )
    area = enclosing.clamp(min=0).prod(-1)
    return iou - (area - union) / (area + eps)
