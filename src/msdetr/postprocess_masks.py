"""Inference masks: the kept detections' low-resolution mask logits pasted at the original image
size.

The logits live on the padded batch canvas at 1/stride (see `msdetr.models.masks`); the image's
valid region is the map's top-left `valid_ratio` (w, h) fraction. Pasting resamples that region
bilinearly (align_corners=False) straight to the original (H, W) and thresholds at logit 0 (a
sigmoid probability of 0.5), in one step: the crop and the resize at once, without a
full-canvas upsampled copy. Only the kept detections are pasted; compute their logits alone with
`MaskHead.pair_logits` (image and query index of each kept detection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def paste_grid(
    valid_ratio: torch.Tensor | Sequence[float],
    image_size: tuple[int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(1, H, W, 2) `grid_sample` grid: the centre of each of the original image's H x W pixels,
    in the map's [-1, 1] frame, for a valid region of `valid_ratio` (w, h)."""
    height, width = (int(v) for v in image_size)
    ratio = (
        torch.as_tensor(valid_ratio, dtype=torch.float32).to(device, non_blocking=True).reshape(2)
    )
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    gy, gx = torch.meshgrid(ys * ratio[1], xs * ratio[0], indexing="ij")
    return (2.0 * torch.stack([gx, gy], -1) - 1.0).unsqueeze(0)


@torch.no_grad()
def paste_masks(
    mask_logits: torch.Tensor,
    valid_ratio: torch.Tensor | Sequence[float],
    image_size: tuple[int, int],
    threshold: float = 0.0,
    chunk: int = 32,
) -> torch.Tensor:
    """Kept detections' mask logits -> bool masks at the original image size.

    Args:
        mask_logits: (N, h, w) logits at 1/stride of the padded canvas.
        valid_ratio: the image's valid (w, h) fraction of the map (`mask_valid_ratio`), (2,).
        image_size: the original (H, W) as Python ints (`orig_size`).
        threshold: logit threshold (0: probability 0.5).
        chunk: masks resampled at once (bounds the float (chunk, H, W) buffer).
    Returns: (N, H, W) bool.
    """
    height, width = (int(v) for v in image_size)
    n = mask_logits.shape[0]
    out = torch.empty(n, height, width, dtype=torch.bool, device=mask_logits.device)
    if n == 0:
        return out
    grid = paste_grid(valid_ratio, (height, width), mask_logits.device)
    for start in range(0, n, chunk):
        part = (
            mask_logits[start : start + chunk].float().unsqueeze(0)
        )  # (1, n', h, w): one grid for all
        up = F.grid_sample(part, grid, mode="bilinear", align_corners=False)[0]
        out[start : start + chunk] = up > threshold
    return out


def detection_masks(
    mask_logits: Sequence[torch.Tensor],
    valid_ratios: torch.Tensor,
    orig_sizes: Sequence[tuple[int, int]],
    threshold: float = 0.0,
) -> list[torch.Tensor]:
    """Per image: (N_b, h, w) kept detections' logits -> (N_b, H_b, W_b) bool masks.

    `valid_ratios`: (B, 2) (w, h); `orig_sizes`: per image (H, W) as ints (read once on the
    host)."""
    return [
        paste_masks(m, valid_ratios[b], orig_sizes[b], threshold) for b, m in enumerate(mask_logits)
    ]
