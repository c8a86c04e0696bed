"""Triton forward and backward kernels for multi-scale deformable attention, registered as the
differentiable custom op ``msdetr::ms_deform_attn_fwd`` (backward: ``msdetr::ms_deform_attn_bwd``).

Kernel v3: the number of levels and points are compile-time constants (levels unrolled with
``tl.static_range``); each level's locations and weights are loaded directly as (BLOCK_Q, points)
tiles, so that every per-sample value is born in the layout of the channel gathers (kernel v2's
all-level tile sliced with where + sum made the compiler move them through shared memory: 61-192
CTA barriers per kernel, bench/RESULTS.md); offsets within a (batch, head) slice of value are int32
when they fit; the backward stores each level's location / weight gradients as it goes and skips
the value gradient when value needs none. Autotuning is bounded over a training run (see _TUNE_KEY).
Besides the op: ``check_deterministic`` (the backward's atomics under
``torch.use_deterministic_algorithms``), ``warm_up`` (autotune before CUDA-graph capture),
``query_class`` (the tuner's size class), ``candidate_configs`` and ``aot_compile``
(per-architecture configs, checked for spills, barriers and occupancy without a GPU by
``bench/aot.py`` and ``tests/test_kernels_aot.py``). docs/architecture.md has the overview.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "ms_deform_attn_triton",
    "query_class",
    "check_deterministic",
    "warm_up",
    "candidate_configs",
    "aot_compile",
    "AotResult",
]

# Read once, like triton itself: the interpreter flag must be set before triton is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Autotune candidates per GPU architecture and kernel, as (BLOCK_Q, num_warps), and the most
# elements per thread that one (BLOCK_Q, points, channels) corner gather may hold there (4 such
# tiles are in flight). The candidates differ in work per thread (at D=32, 4 points: 4, 8 or 16
# elements) as well as in CTA size: one-warp CTAs need no CTA barrier at all (every layout
# conversion stays in the warp), larger ones share the per-level scalars. tests/test_kernels_aot.py
# compiles every candidate for its architecture (D=32, 4 points, 5 levels, fp32 / bf16) and pins
# spills (none) and barriers; bench/RESULTS.md lists registers, barriers and theoretical occupancy
# of each. A device uses the table of the highest architecture not above its own (sm_86 / sm_89:
# sm_80's; sm_100 and later, never compiled here: sm_90's).
class _Candidates(NamedTuple):
    pairs: tuple[tuple[int, int], ...]  # (BLOCK_Q, num_warps) candidates
    max_per_thread: int  # elements of a (BLOCK_Q, points, channels) tile per thread, at most


_FWD_PAIRS = ((2, 1), (4, 4), (8, 4), (16, 4), (16, 8))
_ARCH_CONFIGS = {
    80: {
        "fwd": _Candidates(pairs=_FWD_PAIRS, max_per_thread=16),
        # The backward holds the 4 corner tiles and their atomics' operands: at 8 elements per
        # thread in a 4-warp CTA sm_80's ptxas needs 168 registers (12 warps per SM; 16 elements:
        # 255), so its 8-element candidate is a one-warp CTA (no barriers, 141 registers).
        "bwd": _Candidates(pairs=((1, 1), (2, 1), (4, 4), (8, 8)), max_per_thread=8),
    },
    90: {
        "fwd": _Candidates(pairs=_FWD_PAIRS, max_per_thread=16),
        # 16 elements per thread (BLOCK_Q=16, 4 warps) costs 71 barriers and 132 registers: out.
        "bwd": _Candidates(pairs=((1, 1), (2, 1), (4, 4), (8, 4), (8, 8)), max_per_thread=8),
    },
}
# Below 2 elements per thread most threads of a block wait on a handful of loads.
_MIN_ELEMENTS_PER_THREAD = 2
KERNELS = ("fwd", "bwd")


def _union_configs(kernel: str) -> list[triton.Config]:
    if _INTERPRET:
        # The interpreter runs program instances one by one (~10 ms each) and cannot benchmark: one
        # config, with a block of queries large enough to keep the instance count small.
        return [triton.Config({"BLOCK_Q": 32}, num_warps=4, num_stages=1)]
    pairs = sorted({pair for arch in _ARCH_CONFIGS.values() for pair in arch[kernel].pairs})
    # num_stages=1: the body is gathers through data-dependent pointers, nothing to pipeline.
    return [triton.Config({"BLOCK_Q": bq}, num_warps=w, num_stages=1) for bq, w in pairs]


_CONFIGS = {kernel: _union_configs(kernel) for kernel in KERNELS}


def _arch_table(arch: int) -> dict[str, _Candidates]:
    below = [a for a in _ARCH_CONFIGS if a <= arch]
    return _ARCH_CONFIGS[max(below) if below else min(_ARCH_CONFIGS)]


def elements_per_thread(config: triton.Config, head_dim: int, num_points: int) -> float:
    """Elements of one (BLOCK_Q, points, channels) corner gather that each thread holds."""
    tile = triton.next_power_of_2(num_points) * triton.next_power_of_2(head_dim)
    return config.kwargs["BLOCK_Q"] * tile / (32 * config.num_warps)


def candidate_configs(
    arch: int, head_dim: int, num_points: int, kernel: str = "bwd"
) -> list[triton.Config]:
    """The autotune configs that ``kernel`` ("fwd" or "bwd") may run with on a GPU of compute
    capability ``arch`` (e.g. 80, 90) for this head dimension and number of points: the autotuner
    benchmarks these."""
    if _INTERPRET:
        return list(_CONFIGS[kernel])
    table = _arch_table(arch)[kernel]
    configs = [c for c in _CONFIGS[kernel] if (c.kwargs["BLOCK_Q"], c.num_warps) in table.pairs]
    kept = [
        c
        for c in configs
        if _MIN_ELEMENTS_PER_THREAD
        <= elements_per_thread(c, head_dim, num_points)
        <= table.max_per_thread
    ]
    # Large heads or many points: every tile of the table holds more; take the smallest.
    return kept or [min(configs, key=lambda c: elements_per_thread(c, head_dim, num_points))]


@functools.cache
def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        value = args["value_ptr"]
        if not value.is_cuda:  # only reached under the interpreter: nothing to choose
            return configs[:1]
        chosen = candidate_configs(_capability(value.device), args["D"], args["NUM_POINTS"], kernel)
        keep = {id(c) for c in chosen}
        return [c for c in configs if id(c) in keep]

    return prune


# Autotuning and compilation over a training run with multi-scale augmentation, where the value
# length S (the encoder's query count) changes with nearly every batch:
# - the tuner keys on heads, head dim, levels, points, the tensors' dtypes and LQ_CLASS (an argument
#   the kernels never read): the query count's power-of-two class, capped at _QUERY_CLASS_CAP. Every
#   encoder (S >= 4096 from 480-pixel images up) is one class, each decoder's fixed query count
#   another: the tuner runs in the first training step and never again, on every rank alike;
# - Lq, S, M and LQ_CLASS are not specialized (do_not_specialize): Triton would otherwise compile a
#   variant per value of `x % 16 == 0` (and x == 1); the alignment that the gathers need comes from
#   the constexpr D, so their divisibility buys nothing;
# - the tuner's timings are cached on disk (cache_results, as TRITON_CACHE_AUTOTUNING=1): later runs
#   on the same GPU and Triton do not tune again.
# tests/test_kernels_autotune.py counts the keys and compiles over a simulated epoch of DETR image
# sizes with Triton's own specialization code. D is a constexpr so that the compiler knows how far
# channel rows are aligned and vectorizes the gathers; L and NUM_POINTS are constexprs so that the
# level loop unrolls and the point tiles have a fixed size.
_TUNE_KEY = ["M", "D", "L", "LQ_CLASS", "NUM_POINTS"]
_NOT_SPECIALIZED = ["Lq", "S", "M", "LQ_CLASS"]
_QUERY_CLASS_CAP = 4096


def query_class(lq: int) -> int:
    """The autotune class of a query count: its next power of two, capped at 4096."""
    return min(triton.next_power_of_2(max(lq, 1)), _QUERY_CLASS_CAP)


@triton.jit
def _program_coords(Lq, M, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch n, head m, query rows (with mask) and channel vector (with mask)."""
    # Heads vary fastest across program ids: neighbouring programs then read the same query rows of
    # the locations and the same pixels of value (heads are adjacent in memory), sharing L2 lines.
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    rest = pid // M
    num_q_blocks = tl.cdiv(Lq, BLOCK_Q)
    n = rest // num_q_blocks
    q = (rest % num_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Lq
    row = (n * Lq + q) * M + m
    c = tl.arange(0, BLOCK_D)
    return n, m, q_mask, row, c, c < D


@triton.jit
def _level_tiles(
    loc_ptr,
    attn_ptr,
    row,
    q_mask,
    level: tl.constexpr,
    L: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    POINTS_PAD: tl.constexpr,
    ACC: tl.constexpr,
):
    """The locations and weights of one level of this program's (query, head) rows, loaded
    directly as (BLOCK_Q, POINTS_PAD) tiles x, y, a; their flat index lp in attention_weights and
    mask."""
    # Kernel v2 loaded all levels once as a (BLOCK_Q, L_PAD, POINTS_PAD) tile and sliced it per
    # level with where + sum: the compiler then moved every per-sample value between layouts through
    # shared memory, 73 CTA barriers in the fp32 forward (bench/RESULTS.md). Loaded per level, the
    # tiles are born in the layout the gathers use; the x / y / weight re-reads hit L1.
    pt = tl.arange(0, POINTS_PAD)[None, :]
    lp = (row[:, None] * L + level) * NUM_POINTS + pt
    mask = q_mask[:, None] & (pt < NUM_POINTS)
    # Padding reads NaN: it then takes the out-of-map path of _bilinear (zero contribution) and
    # needs no mask of its own later.
    x = tl.load(loc_ptr + 2 * lp, mask=mask, other=float("nan")).to(ACC)
    y = tl.load(loc_ptr + 2 * lp + 1, mask=mask, other=float("nan")).to(ACC)
    a = tl.load(attn_ptr + lp, mask=mask, other=0.0).to(ACC)
    return lp, mask, x, y, a


@triton.jit
def _bilinear(x, y, shapes_ptr, starts_ptr, level: tl.constexpr, MD, IDX: tl.constexpr):
    """Bilinear set-up of (BLOCK_Q, POINTS_PAD) samples of one level: fractions, the element offset
    (of type IDX) of the top-left corner's channel 0 relative to value[n, 0, m, 0], validity of the
    4 corners."""
    # Three uniform scalars per level, the same for every thread: served by the cache, and with the
    # level loop unrolled all of them are independent loads issued up front.
    h = tl.load(shapes_ptr + 2 * level).to(IDX)
    w = tl.load(shapes_ptr + 2 * level + 1).to(IDX)
    start = tl.load(starts_ptr + level).to(IDX)
    wf = w.to(x.dtype)
    hf = h.to(x.dtype)
    # align_corners=False: pixel i's centre sits at normalized (i + 0.5) / W.
    px = x * wf - 0.5
    py = y * hf - 0.5
    # px < -1 or px > W has no corner in the map: zero contribution and zero gradients, as at -2.
    # Moving those to -2, and NaN / inf (every comparison false), keeps fx, fy and the int
    # conversion finite: a NaN fraction would poison the weighted sums even with masked corners.
    px = tl.where((px >= -1.0) & (px <= wf), px, -2.0)
    py = tl.where((py >= -1.0) & (py <= hf), py, -2.0)
    x0 = tl.floor(px)
    y0 = tl.floor(py)
    fx = px - x0
    fy = py - y0
    x_lo = (x0 >= 0) & (x0 < wf)
    x_hi = (x0 >= -1) & (x0 < wf - 1)
    y_lo = (y0 >= 0) & (y0 < hf)
    y_hi = (y0 >= -1) & (y0 < hf - 1)
    # Offsets within one (batch, head) slice of value: int32 when S * M * D < 2**31 (IDX, chosen on
    # the host), which halves the registers of the per-element offsets; the int64 base
    # value[n, 0, m, 0] is a scalar.
    corner = (start + y0.to(IDX) * w + x0.to(IDX)) * MD
    return w, h, fx, fy, corner, y_lo & x_lo, y_lo & x_hi, y_hi & x_lo, y_hi & x_hi


@triton.autotune(
    configs=_CONFIGS["fwd"],
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("fwd")},
    cache_results=True,
)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _msda_fwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    Lq,
    S,
    M,
    LQ_CLASS,
    D: tl.constexpr,
    L: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    POINTS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    n, m, q_mask, row, c, c_in = _program_coords(Lq, M, D, BLOCK_Q, BLOCK_D)
    MD = M * D
    c_mask = c_in[None, None, :]
    c3 = c[None, None, :]
    value_nm = value_ptr + n * S * MD + m * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for level in tl.static_range(L):
        _, _, x, y, a_l = _level_tiles(
            loc_ptr, attn_ptr, row, q_mask, level, L, NUM_POINTS, POINTS_PAD, ACC
        )
        w, _, fx, fy, corner, in00, in01, in10, in11 = _bilinear(
            x, y, shapes_ptr, starts_ptr, level, MD, IDX
        )
        ptr = value_nm + corner[:, :, None] + c3
        # All 4 * points gathers of the level are independent loads in flight together.
        v00 = tl.load(ptr, mask=in00[:, :, None] & c_mask, other=0.0).to(ACC)
        v01 = tl.load(ptr + MD, mask=in01[:, :, None] & c_mask, other=0.0).to(ACC)
        v10 = tl.load(ptr + w * MD, mask=in10[:, :, None] & c_mask, other=0.0).to(ACC)
        v11 = tl.load(ptr + (w + 1) * MD, mask=in11[:, :, None] & c_mask, other=0.0).to(ACC)
        w00 = (a_l * (1 - fx) * (1 - fy))[:, :, None]
        w01 = (a_l * fx * (1 - fy))[:, :, None]
        w10 = (a_l * (1 - fx) * fy)[:, :, None]
        w11 = (a_l * fx * fy)[:, :, None]
        acc += tl.sum(w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11, axis=1)
    out = out_ptr + row[:, None] * D + c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & c_in[None, :])


@triton.autotune(
    configs=_CONFIGS["bwd"],
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("bwd")},
    reset_to_zero=["grad_value_ptr"],  # benchmarking replays the atomic scatter
    cache_results=True,
)
@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _msda_bwd_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    Lq,
    S,
    M,
    LQ_CLASS,
    D: tl.constexpr,
    L: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    POINTS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    n, m, q_mask, row, c, c_in = _program_coords(Lq, M, D, BLOCK_Q, BLOCK_D)
    MD = M * D
    c_mask = c_in[None, None, :]
    c3 = c[None, None, :]
    nm_offset = n * S * MD + m * D
    value_nm = value_ptr + nm_offset
    grad_value_nm = grad_value_ptr + nm_offset
    g = tl.load(
        grad_out_ptr + row[:, None] * D + c[None, :],
        mask=q_mask[:, None] & c_in[None, :],
        other=0.0,
    ).to(ACC)
    g3 = g[:, None, :]
    for level in tl.static_range(L):
        lp, lp_mask, x, y, a_l = _level_tiles(
            loc_ptr, attn_ptr, row, q_mask, level, L, NUM_POINTS, POINTS_PAD, ACC
        )
        w, h, fx, fy, corner, in00, in01, in10, in11 = _bilinear(
            x, y, shapes_ptr, starts_ptr, level, MD, IDX
        )
        offs = corner[:, :, None] + c3
        m00 = in00[:, :, None] & c_mask
        m01 = in01[:, :, None] & c_mask
        m10 = in10[:, :, None] & c_mask
        m11 = in11[:, :, None] & c_mask
        # Recompute the corner values instead of storing per-point samples in the forward pass.
        s00 = tl.sum(tl.load(value_nm + offs, mask=m00, other=0.0).to(ACC) * g3, axis=2)
        s01 = tl.sum(tl.load(value_nm + offs + MD, mask=m01, other=0.0).to(ACC) * g3, axis=2)
        s10 = tl.sum(tl.load(value_nm + offs + w * MD, mask=m10, other=0.0).to(ACC) * g3, axis=2)
        s11 = tl.sum(
            tl.load(value_nm + offs + (w + 1) * MD, mask=m11, other=0.0).to(ACC) * g3, axis=2
        )
        b00 = (1 - fx) * (1 - fy)
        b01 = fx * (1 - fy)
        b10 = (1 - fx) * fy
        b11 = fx * fy
        # This program alone owns these (query, head) rows: plain stores, once per level.
        grad_a = b00 * s00 + b01 * s01 + b10 * s10 + b11 * s11
        tl.store(grad_attn_ptr + lp, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=lp_mask)
        # d sample / d loc = (d sample / d pixel) * (map size); out-of-map corners count as zeros.
        grad_x = a_l * w.to(ACC) * ((1 - fy) * (s01 - s00) + fy * (s11 - s10))
        grad_y = a_l * h.to(ACC) * ((1 - fx) * (s10 - s00) + fx * (s11 - s01))
        tl.store(grad_loc_ptr + 2 * lp, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=lp_mask)
        tl.store(grad_loc_ptr + 2 * lp + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=lp_mask)
        if VALUE_GRAD:
            # Pixels are shared between queries of all programs: scatter with (relaxed) atomics.
            ag = a_l[:, :, None] * g3
            tl.atomic_add(grad_value_nm + offs, b00[:, :, None] * ag, mask=m00, sem="relaxed")
            tl.atomic_add(grad_value_nm + offs + MD, b01[:, :, None] * ag, mask=m01, sem="relaxed")
            tl.atomic_add(
                grad_value_nm + offs + w * MD, b10[:, :, None] * ag, mask=m10, sem="relaxed"
            )
            tl.atomic_add(
                grad_value_nm + offs + (w + 1) * MD, b11[:, :, None] * ag, mask=m11, sem="relaxed"
            )


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _validate(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    grad_output=None,
) -> None:
    """Shapes, dtypes and devices only: nothing is read from the device (no host-device sync)."""
    op = "ms_deform_attn (triton)"
    if value.dim() != 4:
        raise ValueError(f"{op}: value must be (N, S, M, D), got shape {_shape(value)}.")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"{op}: spatial_shapes must be (L, 2) rows of (H, W), got shape "
            f"{_shape(spatial_shapes)}."
        )
    n, _, m, d = value.shape
    num_levels = spatial_shapes.shape[0]
    if _shape(level_start_index) != (num_levels,):
        raise ValueError(
            f"{op}: level_start_index must be (L,) = ({num_levels},) like spatial_shapes, "
            f"got shape {_shape(level_start_index)}."
        )
    loc = sampling_locations
    if loc.dim() != 6 or (loc.shape[0], loc.shape[2], loc.shape[3], loc.shape[5]) != (
        n,
        m,
        num_levels,
        2,
    ):
        raise ValueError(
            f"{op}: sampling_locations must be (N, Lq, M, L, P, 2) = ({n}, Lq, {m}, {num_levels}, "
            f"P, 2) for value {_shape(value)} and {num_levels} levels, got shape {_shape(loc)}."
        )
    if _shape(attention_weights) != _shape(loc)[:-1]:
        raise ValueError(
            f"{op}: attention_weights must be (N, Lq, M, L, P) = {_shape(loc)[:-1]} like "
            f"sampling_locations, got shape {_shape(attention_weights)}."
        )
    if grad_output is not None and _shape(grad_output) != (n, loc.shape[1], m * d):
        raise ValueError(
            f"{op}: grad_output must be (N, Lq, M * D) = {(n, loc.shape[1], m * d)}, "
            f"got shape {_shape(grad_output)}."
        )
    named = dict(
        value=value,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        sampling_locations=loc,
        attention_weights=attention_weights,
    )
    if grad_output is not None:
        named["grad_output"] = grad_output
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(
                f"{op}: all inputs must be on one device, but value is on {value.device} "
                f"and {name} on {t.device}."
            )
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            raise ValueError(f"{op}: {name} must be int64, got {named[name].dtype}.")
    for name in ("value", "sampling_locations", "attention_weights", "grad_output"):
        if name in named and named[name].dtype not in _SUPPORTED:
            raise ValueError(
                f"{op}: {name} must be one of {', '.join(map(str, _SUPPORTED))}, "
                f"got {named[name].dtype}."
            )


def check_deterministic(op: str = "msdetr::ms_deform_attn_bwd") -> None:
    """Refuse, like PyTorch's own non-deterministic ops, when ``torch.use_deterministic_algorithms``
    is on (warn instead under ``warn_only=True``): the backward adds the value gradient with
    atomics, whose order, and so the rounding of the sum, changes from run to run."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{op} (Triton) adds the value gradient with atomics, which is not deterministic, but "
        "torch.use_deterministic_algorithms(True) is set; use attn_backend='auto' (which then "
        "picks the deterministic 'gather' backend) or 'gather', or pass warn_only=True to it to "
        "run Triton anyway with this warning."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def _meta(value: torch.Tensor, sampling_locations: torch.Tensor) -> dict:
    n, s, m, d = value.shape
    lq, num_levels, num_points = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    return dict(
        Lq=lq,
        S=s,
        M=m,
        LQ_CLASS=query_class(lq),
        D=d,
        L=num_levels,
        NUM_POINTS=num_points,
        POINTS_PAD=triton.next_power_of_2(num_points),
        BLOCK_D=triton.next_power_of_2(d),
        ACC=tl.float64 if value.dtype == torch.float64 else tl.float32,
        IDX=tl.int32 if (2 * s + 2) * m * d <= _INT32_MAX else tl.int64,
    )


# Offsets within one (batch, head) slice of value are int32 while they fit: a corner's offset is at
# most (start + (H + 1) * W + W + 1) * M * D + D < (2 * S + 2) * M * D (W <= S).
_INT32_MAX = 2**31 - 1


def _grid(n: int, m: int, lq: int):
    return lambda meta: (n * m * triton.cdiv(lq, meta["BLOCK_Q"]),)


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels' tensor inputs, contiguous (the kernels index them as dense row-major)."""
    return tuple(t.contiguous() for t in tensors)


def _device_guard(t: torch.Tensor):
    """Make the tensor's GPU the current one for a launch: Triton launches on the current device
    (and its current stream), which need not be the tensors' (e.g. cuda:1 tensors with cuda:0
    current, as in a process that drives several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _nothing_to_do(value: torch.Tensor, sampling_locations: torch.Tensor) -> bool:
    # No batch, query, head, level or point, or no channel: the output is empty or all zeros.
    return sampling_locations.numel() == 0 or value.shape[-1] == 0


@torch.library.custom_op("msdetr::ms_deform_attn_fwd", mutates_args=())
def ms_deform_attn_fwd(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    if _nothing_to_do(value, sampling_locations):
        return value.new_zeros(n, lq, m * d)
    meta = _meta(value, sampling_locations)
    out = value.new_empty(n, lq, m * d)
    with _device_guard(value):
        _msda_fwd_kernel[_grid(n, m, lq)](
            *_contiguous(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            ),
            out,
            **meta,
        )
    return out


@ms_deform_attn_fwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_locations.shape[1], m * d)


@torch.library.custom_op("msdetr::ms_deform_attn_bwd", mutates_args=())
def ms_deform_attn_bwd(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    value_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, sampling_locations and attention_weights. With ``value_grad=False``
    (value needs none) the value gradient is not computed: no atomics, no (N, S, M, D) fp32 buffer
    (1.5 GB per layer at N=16, S=90k, 8 heads of 32), a deterministic kernel; the first result is
    then an empty tensor."""
    _validate(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    # fp32 (fp64) buffer: half-precision atomics lose the small contributions, bf16 ones are slow.
    grad_value = torch.zeros(
        value.shape if value_grad else (0,), dtype=acc_dtype, device=value.device
    )
    launch = not _nothing_to_do(value, sampling_locations)
    # The kernel stores every location / weight gradient once, so they need no clearing.
    alloc = torch.empty if launch else torch.zeros
    grad_loc = alloc(
        sampling_locations.shape, dtype=sampling_locations.dtype, device=sampling_locations.device
    )
    grad_attn = alloc(
        attention_weights.shape, dtype=attention_weights.dtype, device=attention_weights.device
    )
    if launch:
        if value_grad:  # only the value gradient's atomics are nondeterministic
            check_deterministic()
        n, _, m, _ = value.shape
        lq = sampling_locations.shape[1]
        with _device_guard(value):
            _msda_bwd_kernel[_grid(n, m, lq)](
                *_contiguous(
                    grad_output,
                    value,
                    spatial_shapes,
                    level_start_index,
                    sampling_locations,
                    attention_weights,
                ),
                grad_value,
                grad_loc,
                grad_attn,
                **_meta(value, sampling_locations),
                VALUE_GRAD=value_grad,
            )
    return grad_value.to(value.dtype), grad_loc, grad_attn


@ms_deform_attn_bwd.register_fake
def _(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    value_grad=True,
):
    _validate(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return (
        value.new_empty(value.shape if value_grad else (0,)),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    # Value needing no gradient (a frozen input projection, or value a constant): no atomics.
    value_grad = bool(ctx.needs_input_grad[0])
    grad_value, grad_loc, grad_attn = ms_deform_attn_bwd(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        value_grad,
    )
    return grad_value if value_grad else None, None, None, grad_loc, grad_attn


ms_deform_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``msdetr.kernels.ms_deform_attn``; locations are sampled in fp32 (fp64 for
    fp64 values) whatever dtype they come in, and their gradient flows back through the cast.
    NaN / inf locations contribute zero and get zero gradients (as grid_sample's zeros padding)."""
    if sampling_locations.dtype not in _SUPPORTED:
        raise ValueError(
            f"ms_deform_attn (triton): sampling_locations must be one of "
            f"{', '.join(map(str, _SUPPORTED))}, got {sampling_locations.dtype}."
        )
    loc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    return ms_deform_attn_fwd(
        value,
        spatial_shapes.to(value.device, torch.int64),
        level_start_index.to(value.device, torch.int64),
        sampling_locations.to(loc_dtype),
        attention_weights,
    )


def warm_up(
    spatial_shapes: Sequence[Sequence[int]] | torch.Tensor,
    num_heads: int,
    head_dim: int,
    num_points: int,
    query_counts: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cuda",
    weight_dtype: torch.dtype | None = None,
    batch_size: int = 1,
) -> list[dict]:
    """Run the forward and the backward once for every autotune key these shapes will meet, so
    that the autotuner has benchmarked and picked its configs before the kernels are captured in a
    CUDA graph (benchmarking inside a capture fails). Call it outside the capture, e.g. before
    ``torch.cuda.graphs.make_graphed_callables`` or ``torch.compile(mode="reduce-overhead")``.

    The tuner keys on heads, head dim, levels, points, the class of the query count
    (``query_class``: its power of two, capped at 4096, so one class for every encoder) and the
    tensors' dtypes: pass every query count the model uses (the encoder's is the value
    length, sum(H * W); the decoder's the number of queries) and the value dtype; weight_dtype
    (default: dtype) is the attention weights' dtype, fp32 under autocast (softmax runs in fp32).
    The spatial shapes and batch_size (not part of the key) only set the inputs benchmarked: the
    training ones pick the configs best for training. Returns the keys warmed up, as dicts.
    """
    device = torch.device(device)
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()  # one sync, outside any capture
    hw = [(int(h), int(w)) for h, w in spatial_shapes]
    shapes = torch.tensor(hw, dtype=torch.int64, device=device)
    starts = torch.tensor(
        [0] + [h * w for h, w in hw][:-1], dtype=torch.int64, device=device
    ).cumsum(0)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # A few pixels around one reference point per query, like trained models sample.
    pixel = torch.tensor([[1.0 / w, 1.0 / h] for h, w in hw], dtype=loc_dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    value = torch.randn(
        batch_size,
        sum(h * w for h, w in hw),
        num_heads,
        head_dim,
        dtype=dtype,
        device=device,
        generator=generator,
    )
    warmed, seen = [], set()
    for lq in query_counts:
        key = dict(
            M=num_heads,
            D=head_dim,
            L=len(hw),
            LQ_CLASS=query_class(lq),
            NUM_POINTS=num_points,
            dtype=dtype,
            weight_dtype=weight_dtype,
        )
        if lq <= 0 or tuple(key.values()) in seen:
            continue
        seen.add(tuple(key.values()))
        size = (batch_size, lq, num_heads, len(hw), num_points)
        reference = torch.rand(
            batch_size, lq, 1, 1, 1, 2, dtype=loc_dtype, device=device, generator=generator
        )
        offsets = torch.randn(*size, 2, dtype=loc_dtype, device=device, generator=generator) * 2
        loc = (reference + offsets * pixel[:, None, :]).requires_grad_(True)
        weights = torch.rand(
            size, dtype=weight_dtype, device=device, generator=generator
        ).requires_grad_(True)
        val = value.detach().requires_grad_(True)
        out = ms_deform_attn_triton(val, shapes, starts, loc, weights)
        torch.autograd.grad(out, (val, loc, weights), torch.ones_like(out))
        warmed.append(key)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return warmed


# Ahead-of-time compilation (no GPU needed): registers, spills and shared memory of each config.


class AotResult(NamedTuple):
    kernel: str  # "fwd" or "bwd"
    arch: int  # compute capability, e.g. 90
    dtype: str  # of value (and of weights, output, gradients)
    block_q: int
    num_warps: int
    n_regs: int  # registers per thread
    n_spills: int  # as Triton's CompiledKernel.n_spills: local memory bytes per thread / 4
    shared: int  # bytes of shared memory per block (Triton's metadata.shared)
    compiled: object  # triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata)


_AOT_ACC = {"fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32, "fp64": tl.float64}


def _aot_signature(fn, dtype: str) -> dict:
    loc = "fp64" if dtype == "fp64" else "fp32"
    grad_value = "fp64" if dtype == "fp64" else "fp32"
    pointers = {
        "shapes_ptr": "*i64",
        "starts_ptr": "*i64",
        "loc_ptr": f"*{loc}",
        "grad_loc_ptr": f"*{loc}",
        "grad_value_ptr": f"*{grad_value}",
    }
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    return {
        name: "constexpr"
        if name in constexprs
        else pointers.get(name, f"*{dtype}")
        if name.endswith("_ptr")
        else "i32"
        for name in fn.arg_names
    }


def _resource_usage(cubin: bytes) -> dict:
    """REG / LOCAL / SHARED ... of the (single) kernel in a cubin, from cuobjdump -res-usage (as the
    driver would report them; triton only asks the driver, which needs a GPU)."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "-res-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def aot_compile(
    kernel: str,
    dtype: str,
    arch: int,
    config: triton.Config,
    head_dim: int = 32,
    num_levels: int = 4,
    num_points: int = 4,
) -> AotResult:
    """Compile the "fwd" or "bwd" kernel for compute capability ``arch`` (80, 90, ...) with one
    autotune ``config`` and value ``dtype`` ("fp32", "bf16", "fp16", "fp64"), without a GPU: what
    the autotuner would build on that GPU (16-byte aligned pointers, as torch allocates), and its
    resources. Needs TRITON_INTERPRET unset when this module was imported."""
    if _INTERPRET:
        raise RuntimeError(
            "aot_compile needs the real Triton compiler: unset TRITON_INTERPRET before importing "
            "triton."
        )
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fwd": _msda_fwd_kernel, "bwd": _msda_bwd_kernel}[kernel].fn
    acc = _AOT_ACC[dtype]
    constexprs = dict(
        D=head_dim,
        L=num_levels,
        NUM_POINTS=num_points,
        POINTS_PAD=triton.next_power_of_2(num_points),
        BLOCK_D=triton.next_power_of_2(head_dim),
        ACC=acc,
        IDX=tl.int32,
        **config.kwargs,
    )
    if "VALUE_GRAD" in fn.arg_names:
        constexprs["VALUE_GRAD"] = True
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr")
    }
    source = ASTSource(fn, _aot_signature(fn, dtype), constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    usage = _resource_usage(compiled.asm["cubin"])
    return AotResult(
        kernel,
        arch,
        dtype,
        config.kwargs["BLOCK_Q"],
        config.num_warps,
        usage["REG"],
        usage["LOCAL"] // 4,
        compiled.metadata.shared,
        compiled,
    )
