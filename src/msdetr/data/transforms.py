"""The DETR augmentation recipe on torchvision.transforms.v2; boxes and masks follow the image as
tv_tensors (BoundingBoxes, Mask): flips, crops and resizes move them with it, the dtype conversion
and normalization touch only the image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
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
            raise ValueError(
                f"crop_size must be (min, max) with 0 < min <= max, got ({min_size}, {max_size})."
            )
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


def detr_resize_size(
    height: int, width: int, size: int, max_size: int | None = None
) -> tuple[int, int]:
    """The (h, w) that the official DETR `resize` gives an image of (`height`, `width`) for short
    side `size`.

    If the long side would exceed `max_size`, the short side becomes round(max_size * short / long)
    (Python's round: halves go to even). The long side is then int(size * long / short), truncated,
    so it can end up a pixel or so above `max_size`. An image whose short side already equals the
    target is returned unchanged. Float operations follow the official order.
    """
    short, long = (width, height) if width <= height else (height, width)
    if max_size is not None and float(long) / float(short) * size > max_size:
        size = int(round(max_size * float(short) / float(long)))
    if short == size:
        return height, width
    new_long = int(size * long / short)
    return (new_long, size) if width < height else (size, new_long)


class DetrResize(v2.Transform):
    """Resize to `detr_resize_size` for a short side drawn uniformly from `sizes`.

    v2.Resize(size, max_size=...) caps differently: in most capped cases it is off by 1-2 px.
    Boxes and masks follow through v2.functional.resize to the explicit (h, w), so boxes scale by
    new/old per axis as in the official code. Images: bilinear with antialias, v2.Resize's default
    and the nearest tensor equivalent of the official PIL bilinear resize. Masks: nearest-exact
    (each output pixel takes the input pixel under its centre, the geometry of the box scaling),
    so they stay binary.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(
                f"resize sizes must be a non-empty list of positive ints, got {list(sizes)}."
            )
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be a positive int or None, got {max_size}.")
        self.max_size = None if max_size is None else int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        oh, ow = detr_resize_size(h, w, size, self.max_size)
        if min(oh, ow) < 1 and self.max_size is not None:
            # The capped short side rounded to 0 (aspect ratio over 2 * max_size : 1), where the
            # official code fails; fit the long side to max_size and keep one pixel across instead.
            scale = self.max_size / max(h, w)
            oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
        return {"size": [oh, ow]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return v2.functional.resize(
                inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT
            )
        return v2.functional.resize(
            inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )


def multi_scale_resize(scales: Sequence[int], max_size: int | None = None) -> v2.Transform:
    """Short side to a random one of `scales`, capped by `max_size` exactly as the official
    `resize`.

    See `detr_resize_size`. Neither v2.Resize(max_size=...) nor v2.RandomShortestSize gives the
    official sizes: both differ by a pixel or two in some cases.
    """
    return DetrResize(scales, max_size)


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
    """Flip (p 0.5); then, with p 0.5 each, multi-scale resize or resize -> random crop ->
    multi-scale resize."""
    crop_min, crop_max = (int(s) for s in crop_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomChoice(
                [
                    multi_scale_resize(scales, max_size),
                    v2.Compose(
                        [
                            # The official recipe caps only the final resize's long side, not this
                            # one.
                            multi_scale_resize(crop_resize),
                            RandomSizeCrop(crop_min, crop_max),
                            multi_scale_resize(scales, max_size),
                        ]
                    ),
                ]
            ),
            *_to_model_input(),
        ]
    )


def eval_transforms(size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Short side to `size`, capped by `max_size` as the official `resize` does (see
    `detr_resize_size`)."""
    return v2.Compose([v2.ToImage(), DetrResize([size], max_size), *_to_model_input()])


def finalize_target(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    size: Sequence[int],
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Drop empty xyxy boxes with their labels and masks; return (boxes as cxcywh divided by the
    (h, w) `size`, labels, masks as a plain bool (N, h, w) tensor or None).

    The official rule keeps any positive extent; v2.SanitizeBoundingBoxes would also drop
    sub-pixel boxes (its min_size is at least 1). A mask is kept or dropped with its box, never on
    its own: an instance whose mask a crop emptied while its box kept some area stays.
    """
    xyxy = boxes.as_subclass(torch.Tensor).float()
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    h, w = (int(v) for v in size)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    if masks is not None:
        masks = masks.as_subclass(torch.Tensor)
        if masks.shape != (len(xyxy), h, w):
            raise ValueError(
                f"masks of shape {tuple(masks.shape)} do not match {len(xyxy)} boxes "
                f"on a {h}x{w} image; a transform moved the image without its masks."
            )
        masks = masks[keep].bool()
    return box_convert(xyxy[keep], "xyxy", "cxcywh") / scale, labels[keep], masks


def finalize_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`finalize_target` without masks: (boxes as normalized cxcywh, labels) of the non-empty
    boxes."""
    boxes, labels, _ = finalize_target(boxes, labels, size)
    return boxes, labels
