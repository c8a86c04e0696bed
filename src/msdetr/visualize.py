"""Pictures of detections: boxes with 'label score' captions and, for a mask model, the instance
masks filled and translucent, one colour per class. Used by predict.py's pictures and the
PredictionImages validation grid (lit/callbacks.py: `validation_tile`, `tile_grid`)."""

from __future__ import annotations

import torch
from torchvision.transforms.v2.functional import InterpolationMode, resize
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from .box_ops import cxcywh_to_xyxy

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# One colour per class (class index modulo its length): a class's boxes and masks share it.
PALETTE = ("red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple")
# How much of a mask's colour covers the pixels under it.
MASK_ALPHA = 0.5


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized float (3, H, W) -> uint8."""
    img = image.detach().float().cpu() * _STD + _MEAN
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def class_colour(label: int) -> str:
    """The colour of class index `label` in every picture."""
    return PALETTE[int(label) % len(PALETTE)]


def draw_detections(
    image_u8: torch.Tensor,
    det: dict,
    names: dict[int, str] | None,
    score_threshold: float,
    gt_boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """`image_u8` (3, H, W) uint8 with the detections of `det` whose score is at least
    `score_threshold`: with "masks" ((N, H, W), bool or probabilities, at the picture's size) each
    mask filled with its class's colour at MASK_ALPHA; then the GT boxes (xyxy pixels), if given,
    in white; then the boxes ("boxes": xyxy pixels of image_u8) in the class colour with
    'label score' captions (`names`: {class index: name}; numbers without it)."""
    keep = det["scores"] >= score_threshold
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    colors = [class_colour(int(c)) for c in labels]
    masks = det.get("masks")
    if masks is not None and len(boxes):
        masks = masks[keep.to(masks.device)].cpu()
        if masks.shape[-2:] != image_u8.shape[-2:]:
            raise ValueError(
                f"the detections' masks are {tuple(masks.shape[-2:])} but the picture is "
                f"{tuple(image_u8.shape[-2:])}; give draw_detections masks at the picture's size."
            )
        masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
        image_u8 = draw_segmentation_masks(image_u8, masks, alpha=MASK_ALPHA, colors=colors)
    if gt_boxes is not None and len(gt_boxes):
        image_u8 = draw_bounding_boxes(image_u8, gt_boxes, colors="white", width=1)
    if len(boxes) == 0:
        return image_u8
    captions = [
        f"{(names or {}).get(int(c), int(c))} {float(s):.2f}" for c, s in zip(labels, scores)
    ]
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
    if "masks" in det:
        # At the transformed size, as the boxes: only the drawn ones are enlarged.
        keep = det["scores"] >= score_threshold
        det = {k: v[keep] for k, v in det.items()}
        det["masks"] = det["masks"].repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    return draw_detections(tile, det, names, score_threshold, gt)


def tile_grid(tiles: list[torch.Tensor], per_row: int = 4) -> torch.Tensor:
    """uint8 pictures of different sizes, each padded to the largest, in a grid of `per_row`."""
    th, tw = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, tw - t.shape[2], 0, th - t.shape[1])) for t in tiles]
    return make_grid(tiles, nrow=min(len(tiles), per_row), padding=4)
