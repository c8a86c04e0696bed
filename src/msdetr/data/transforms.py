"""The DETR augmentation recipe with torchvision.transforms.v2 (boxes follow via tv_tensors)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_TRAIN_SCALES = tuple(range(480, 801, 32))


class RandomSizeCrop(v2.Transform):
    """Crop of random height and width, each uniform in [min_size, min(max_size, image side)].

    v2.RandomCrop takes one fixed size and v2.RandomResizedCrop resizes afterwards, so neither
    is DETR's crop; images smaller than min_size are cropped to their own size.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.min_size, h), min(self.max_size, h) + 1, ()))
        cw = int(torch.randint(min(self.min_size, w), min(self.max_size, w) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def _finish() -> list[v2.Transform]:
    return [
        v2.ClampBoundingBoxes(),
        # Boxes cropped to under a pixel are dropped with their labels (DETR drops zero-size ones).
        v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transforms(
    scales: Sequence[int] = COCO_TRAIN_SCALES,
    max_size: int = 1333,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
) -> v2.Compose:
    """Flip; then either multi-scale resize or resize -> random crop -> multi-scale resize (p 0.5 each)."""
    scales, crop_resize = list(scales), list(crop_resize)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            v2.RandomShortestSize(scales, max_size=max_size),
            v2.Compose([
                v2.RandomShortestSize(crop_resize),
                RandomSizeCrop(*crop_size),
                v2.RandomShortestSize(scales, max_size=max_size),
            ]),
        ]),
        *_finish(),
    ])


def eval_transforms(size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Short side to `size`, long side at most `max_size`."""
    return v2.Compose([v2.ToImage(), v2.RandomShortestSize([size], max_size=max_size), *_finish()])


def to_normalized_cxcywh(boxes: tv_tensors.BoundingBoxes) -> torch.Tensor:
    """Absolute xyxy boxes on their canvas -> cxcywh normalized by the canvas (the unpadded image)."""
    h, w = boxes.canvas_size
    xyxy = boxes.as_subclass(torch.Tensor).float()
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return box_convert(xyxy, "xyxy", "cxcywh") / scale
