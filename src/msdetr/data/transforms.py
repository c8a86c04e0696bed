"""The DETR augmentation recipe on torchvision.transforms.v2; boxes follow the image as tv_tensors."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.ops import box_convert
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_TRAIN_SCALES = tuple(range(480, 801, 32))


class RandomSizeCrop(v2.Transform):
    """Crop whose height and width are each uniform in [min_size, min(max_size, image side)].

    Hand-written because v2.RandomCrop takes one fixed size and v2.RandomResizedCrop resizes the
    crop back. A side shorter than min_size is kept whole instead of failing.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"crop_size must be (min, max) with 0 < min <= max, got ({min_size}, {max_size}).")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def _side(self, extent: int) -> int:
        hi = min(self.max_size, extent)
        return int(torch.randint(min(self.min_size, hi), hi + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = self._side(h), self._side(w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def multi_scale_resize(scales: Sequence[int], max_size: int | None = None) -> v2.Transform:
    """Short side to a random one of `scales`, shrunk further if the long side would exceed `max_size`.

    Not v2.RandomShortestSize: it truncates the scaled sides, so the short side can come out a pixel
    below the requested one (175 px -> 64 gives 63).
    """
    return v2.RandomChoice([v2.Resize(int(s), max_size=max_size) for s in scales])


def _to_model_input() -> list[v2.Transform]:
    return [
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transforms(
    scales: Sequence[int] = COCO_TRAIN_SCALES,
    max_size: int = 1333,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
) -> v2.Compose:
    """Flip (p 0.5); then, with p 0.5 each, multi-scale resize or resize -> random crop -> multi-scale resize."""
    crop_min, crop_max = (int(s) for s in crop_size)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            multi_scale_resize(scales, max_size),
            v2.Compose([
                # The official recipe caps only the final resize's long side, not this one.
                multi_scale_resize(crop_resize),
                RandomSizeCrop(crop_min, crop_max),
                multi_scale_resize(scales, max_size),
            ]),
        ]),
        *_to_model_input(),
    ])


def eval_transforms(size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Short side to `size`, shrunk further if the long side would exceed `max_size`."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(size), max_size=max_size), *_to_model_input()])


def finalize_boxes(boxes: torch.Tensor, labels: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop empty xyxy boxes (and their labels); return the rest as cxcywh divided by the (h, w) `size`.

    The official rule keeps any positive extent; v2.SanitizeBoundingBoxes would also drop
    sub-pixel boxes (its min_size is at least 1).
    """
    xyxy = boxes.as_subclass(torch.Tensor).float()
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    h, w = (int(v) for v in size)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return box_convert(xyxy[keep], "xyxy", "cxcywh") / scale, labels[keep]
