"""Box helpers shared by models, assigners, losses and post-processing."""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = ["cxcywh_to_xyxy", "xyxy_to_cxcywh", "box_iou", "generalized_box_iou", "inverse_sigmoid"]


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
