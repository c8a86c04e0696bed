"""Pictures of detections: boxes with 'label score' captions and, for a mask model, the instance
masks filled and translucent, one colour per class. Used by predict.py's pictures and the
PredictionImages validation grid (lit/callbacks.py)."""

from __future__ import annotations

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

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
