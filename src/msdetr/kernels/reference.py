"""PyTorch reference of multi-scale deformable attention (bilinear sampling via grid_sample)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .levels import level_shapes


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """`shapes`: the levels' (H, W) as Python ints; without them they are read from `spatial_shapes`
    (one device-to-host copy when it lives on a GPU)."""
    out_dtype = value.dtype
    # Half-precision inputs are sampled in fp32: bf16 locations are ~0.6 px off on a 167-wide map.
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    value = value.to(compute)
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    # Python ints so the per-level split works without a device sync per level.
    shapes = level_shapes(spatial_shapes if shapes is None else shapes)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's align_corners=False convention: pixel centre i sits at (2i + 1) / W - 1.
    grids = 2 * sampling_locations.to(compute) - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L, P) weighted over (L, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = (
        attention_weights.to(compute).transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    )
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)
