"""The multi-scale deformable attention op: one public function, several backends."""
from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")


def _triton_op():
    try:
        from .triton_msda import ms_deform_attn_triton
    except ImportError as exc:  # Triton missing or the kernels not importable on this platform
        raise RuntimeError(
            f"backend='triton' is unavailable here ({exc}); install triton or use backend='reference'."
        ) from exc
    return ms_deform_attn_triton


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
    sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P).
    Returns (N, Lq, M * D) in value's dtype. backend "auto" uses Triton for CUDA tensors and the
    PyTorch reference on CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "auto":
        backend = "triton" if value.is_cuda else "reference"
    if backend == "triton":
        if not value.is_cuda and not _triton_interpreted():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                "imported, for CPU testing); use backend='reference' on CPU."
            )
        return _triton_op()(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
