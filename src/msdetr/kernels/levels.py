"""The levels' (H, W) as Python ints: what every backend and the model split and size things by."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Shapes = Sequence[tuple[int, int]]


def level_shapes(spatial_shapes: torch.Tensor | Shapes) -> tuple[tuple[int, int], ...]:
    """The levels' (H, W) as Python ints. The model passes them down as such (derived from the
    feature maps' shapes); a (L, 2) tensor is still accepted and read (a device sync on a GPU)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    # No int(): under torch.compile the sizes are symbolic, and int() would specialize the graph to
    # one image size (a recompile for every new size).
    return tuple((h, w) for h, w in spatial_shapes)
