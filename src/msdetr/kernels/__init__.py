"""The multi-scale deformable attention op: one public function, several backends."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .levels import Shapes, level_shapes
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "level_shapes", "Shapes", "BACKENDS"]


def _triton_op():
    try:
        from .triton_msda import ms_deform_attn_triton
    except ImportError as exc:  # Triton missing or the kernels not importable on this platform
        raise RuntimeError(
            f"backend='triton' is unavailable here ({exc}); install triton or use backend='gather'."
        ) from exc
    return ms_deform_attn_triton


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _run_triton(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, shapes
):
    # The kernels read the level geometry from the int64 device tensors; `shapes` is not needed.
    if not value.is_cuda and not _triton_interpreted():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            "imported, for CPU testing); use backend='auto' or 'gather' on CPU."
        )
    return _triton_op()(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _run_reference(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, shapes
):
    return ms_deform_attn_reference(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        shapes=shapes,
    )


def _run_gather(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, shapes
):
    from .gather import ms_deform_attn_gather

    return ms_deform_attn_gather(
        value, spatial_shapes if shapes is None else shapes, sampling_locations, attention_weights
    )


# Backend name -> implementation(value, spatial_shapes, level_start_index, sampling_locations,
# attention_weights, shapes); `shapes` is the levels' (H, W) as Python ints or None (then an
# implementation that needs them on the host reads `spatial_shapes`). A new backend is one entry
# here.
_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": _run_triton,
    "reference": _run_reference,
    "gather": _run_gather,
}
BACKENDS = ("auto", *_IMPLEMENTATIONS)


def _auto_backend(value: torch.Tensor) -> str:
    """Triton on CUDA; the gather formulation on the CPU (same result as the reference, about a
    third of its time and half its memory, bench/RESULTS.md), and on CUDA under
    `torch.use_deterministic_algorithms(True)`, where Triton's atomic backward refuses and the
    reference's `grid_sample` backward is not deterministic either."""
    if value.is_cuda and not torch.are_deterministic_algorithms_enabled():
        return "triton"
    return "gather"


def _checked_shapes(
    shapes: Shapes, value: torch.Tensor, sampling_locations: torch.Tensor
) -> tuple[tuple[int, int], ...]:
    """`shapes` as a tuple of (H, W) Python ints, checked against the tensors' shapes (no device
    read)."""
    shapes = level_shapes(shapes)
    tokens = sum(h * w for h, w in shapes)
    if value.shape[1] != tokens or sampling_locations.shape[3] != len(shapes):
        raise ValueError(
            f"ms_deform_attn: shapes={list(shapes)} give {len(shapes)} levels and {tokens} "
            f"tokens, but value has {value.shape[1]} tokens and sampling_locations "
            f"{sampling_locations.shape[3]} levels; pass the (H, W) of every level, in order."
        )
    return shapes


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
    *,
    shapes: Shapes | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention.

    value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
    sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P).
    Returns (N, Lq, M * D) in value's dtype. backend "auto" uses Triton for CUDA tensors and the
    gather formulation on the CPU (and on CUDA under deterministic algorithms); "reference" is the
    `grid_sample` algorithm of the official CPU path.

    `shapes`: the same (H, W) per level as Python ints, when the caller has them (the model derives
    them from the feature maps). Backends that split `value` on the host use them instead of reading
    `spatial_shapes` back from the device, which would synchronize with it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}; choose one of {BACKENDS}.")
    if shapes is not None:
        shapes = _checked_shapes(shapes, value, sampling_locations)
    if backend == "auto":
        backend = _auto_backend(value)
    return _IMPLEMENTATIONS[backend](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, shapes
    )
