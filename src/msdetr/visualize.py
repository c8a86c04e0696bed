"""Pictures of detections: boxes with 'label score' captions on an image, ground truth in white,
and the grid of validation pictures the PredictionImages callback saves. predict.py draws its
annotated PNGs here too."""

from __future__ import annotations

import torch
from torchvision.transforms.v2.functional import InterpolationMode, resize
from torchvision.utils import draw_bounding_boxes, make_grid

from .box_ops import cxcywh_to_xyxy

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_PALETTE = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple"]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized float (3, H, W) -> uint8."""
    img = image.detach().float().cpu() * _STD + _MEAN
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_detections(
    image_u8: torch.Tensor,
    det: dict,
    names: dict[int, str] | None,
    score_threshold: float,
    gt_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boxes (xyxy, pixels of image_u8) with 'label score' captions, one colour per label; GT
    boxes, if given, in white."""
    if gt_boxes is not None and len(gt_boxes):
        image_u8 = draw_bounding_boxes(image_u8, gt_boxes, colors="white", width=1)
    keep = det["scores"] >= score_threshold
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    if len(boxes) == 0:
        return image_u8
    names = names or {}
    captions = [f"{names.get(int(c), int(c))} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [_PALETTE[int(c) % len(_PALETTE)] for c in labels]
    return draw_bounding_boxes(image_u8, boxes, labels=captions, colors=colors, width=2)


def validation_tile(
    image: torch.Tensor,
    det: dict,
    target: dict,
    names: dict[int, str] | None,
    score_threshold: float,
    min_side: int,
) -> torch.Tensor:
    """One normalized, padded input image (3, H', W') with its detections (xyxy, pixels of the
    transformed image) and its target's GT boxes (cxcywh in [0, 1] of `target["size"]`), cut to
    the unpadded size and enlarged by an integer factor until its short side reaches about
    `min_side`, so captions stay legible."""
    h, w = (int(v) for v in target["size"])
    zoom = max(1, round(min_side / min(h, w)))
    tile = denormalize(image[:, :h, :w])
    if zoom > 1:
        tile = resize(tile, [h * zoom, w * zoom], interpolation=InterpolationMode.NEAREST)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32) * zoom
    gt = cxcywh_to_xyxy(target["boxes"].float()) * scale if len(target["boxes"]) else None
    det = {k: v.cpu() for k, v in det.items()}
    det["boxes"] = det["boxes"] * zoom
    return draw_detections(tile, det, names, score_threshold, gt)


def tile_grid(tiles: list[torch.Tensor], per_row: int = 4) -> torch.Tensor:
    """uint8 pictures of different sizes, each padded to the largest, in a grid of `per_row`."""
    th, tw = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, tw - t.shape[2], 0, th - t.shape[1])) for t in tiles]
    return make_grid(tiles, nrow=min(len(tiles), per_row), padding=4)
