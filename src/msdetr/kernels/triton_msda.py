"""Triton forward and backward kernels for multi-scale deformable attention, registered as the
differentiable custom op ``msdetr::ms_deform_attn_fwd`` (backward: ``msdetr::ms_deform_attn_bwd``)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["ms_deform_attn_triton"]

# Read once, like triton itself: the interpreter flag must be set before triton is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_ELEMENTS_PER_THREAD = 16


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # The interpreter runs program instances one by one (~10 ms each) and cannot benchmark: one
        # config, with a block of queries large enough to keep the instance count small.
        return [triton.Config({"BLOCK_Q": 32}, num_warps=4, num_stages=1)]
    # num_stages=1: the loop body is gathers through data-dependent pointers, nothing to pipeline.
    return [
        triton.Config({"BLOCK_Q": bq}, num_warps=w, num_stages=1)
        for bq in (4, 8, 16, 32, 64)
        for w in (2, 4, 8)
    ]


def _prune(configs, named_args, **kwargs):
    """Benchmark only configs holding 2..16 elements per thread of a (BLOCK_Q, points, channels)
    tile: each of the four corner gathers is such a tile, beyond 16 the backward spills registers
    (ptxas, sm_90, D=32), below 2 most threads of the block wait on a handful of loads."""
    args = {**named_args, **kwargs}
    tile = args["POINTS_PAD"] * args["BLOCK_D"]

    def per_thread(cfg):
        return cfg.kwargs["BLOCK_Q"] * tile / (32 * cfg.num_warps)

    kept = [c for c in configs if 2 <= per_thread(c) <= _MAX_ELEMENTS_PER_THREAD]
    return kept or [min(configs, key=lambda c: abs(per_thread(c) - _MAX_ELEMENTS_PER_THREAD))]


# Lq changes with every image size; keying the tuner on its power-of-two class (LQ_CLASS, an argument
# the kernels never read) tunes once per class instead of once per shape. D is a constexpr so that
# the compiler knows how far channel rows are aligned and vectorizes the gathers.
_TUNE_KEY = ["M", "D", "L", "LQ_CLASS", "NUM_POINTS"]


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
def _level_samples(loc_ptr, attn_ptr, shapes_ptr, starts_ptr, row, q_mask, level, MD, L,
                   NUM_POINTS: tl.constexpr, POINTS_PAD: tl.constexpr, ACC: tl.constexpr):
    """Bilinear set-up of every (query, point) of one level: (BLOCK_Q, POINTS_PAD) tiles."""
    h = tl.load(shapes_ptr + 2 * level)
    w = tl.load(shapes_ptr + 2 * level + 1)
    start = tl.load(starts_ptr + level)
    pt = tl.arange(0, POINTS_PAD)
    # Index of (n, q, m, level, point) in attention_weights; locations interleave (x, y) after it.
    lp = (row[:, None] * L + level) * NUM_POINTS + pt[None, :]
    lp_mask = q_mask[:, None] & (pt[None, :] < NUM_POINTS)
    loc_x = tl.load(loc_ptr + 2 * lp, mask=lp_mask, other=0.0).to(ACC)
    loc_y = tl.load(loc_ptr + 2 * lp + 1, mask=lp_mask, other=0.0).to(ACC)
    a = tl.load(attn_ptr + lp, mask=lp_mask, other=0.0).to(ACC)
    wf = w.to(ACC)
    hf = h.to(ACC)
    # align_corners=False: pixel i's centre sits at normalized (i + 0.5) / W.
    x = loc_x * wf - 0.5
    y = loc_y * hf - 0.5
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    fx = x - x0
    fy = y - y0
    # Corner validity is decided in floating point, before the clamp below could make it look valid.
    x_lo = (x0 >= 0) & (x0 < wf)
    x_hi = (x0 >= -1) & (x0 < wf - 1)
    y_lo = lp_mask & (y0 >= 0) & (y0 < hf)
    y_hi = lp_mask & (y0 >= -1) & (y0 < hf - 1)
    # Clamping keeps the float->int conversion defined for locations far outside the map.
    xi = tl.minimum(tl.maximum(x0, -1.0), wf).to(tl.int64)
    yi = tl.minimum(tl.maximum(y0, -1.0), hf).to(tl.int64)
    # Element offset of the top-left corner's channel 0 relative to value[n, 0, m, 0].
    corner = (start + yi * w + xi) * MD
    return h, w, lp, lp_mask, a, fx, fy, corner, y_lo & x_lo, y_lo & x_hi, y_hi & x_lo, y_hi & x_hi


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    Lq, S, M, L, LQ_CLASS,
    D: tl.constexpr, NUM_POINTS: tl.constexpr, POINTS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    n, m, q_mask, row, c, c_in = _program_coords(Lq, M, D, BLOCK_Q, BLOCK_D)
    MD = M * D
    c_mask = c_in[None, None, :]
    c3 = c[None, None, :]
    value_nm = value_ptr + n * S * MD + m * D
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for level in range(L):
        _, w, _, _, a, fx, fy, corner, in00, in01, in10, in11 = _level_samples(
            loc_ptr, attn_ptr, shapes_ptr, starts_ptr, row, q_mask, level, MD, L, NUM_POINTS, POINTS_PAD, ACC)
        ptr = value_nm + corner[:, :, None] + c3
        # All 4 * points gathers of the level are independent loads in flight together.
        v00 = tl.load(ptr, mask=in00[:, :, None] & c_mask, other=0.0).to(ACC)
        v01 = tl.load(ptr + MD, mask=in01[:, :, None] & c_mask, other=0.0).to(ACC)
        v10 = tl.load(ptr + w * MD, mask=in10[:, :, None] & c_mask, other=0.0).to(ACC)
        v11 = tl.load(ptr + (w + 1) * MD, mask=in11[:, :, None] & c_mask, other=0.0).to(ACC)
        w00 = (a * (1 - fx) * (1 - fy))[:, :, None]
        w01 = (a * fx * (1 - fy))[:, :, None]
        w10 = (a * (1 - fx) * fy)[:, :, None]
        w11 = (a * fx * fy)[:, :, None]
        acc += tl.sum(w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11, axis=1)
    out = out_ptr + row[:, None] * D + c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & c_in[None, :])


@triton.autotune(configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["grad_value_ptr"])  # benchmarking replays the atomic scatter
@triton.jit
def _msda_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    Lq, S, M, L, LQ_CLASS,
    D: tl.constexpr, NUM_POINTS: tl.constexpr, POINTS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    n, m, q_mask, row, c, c_in = _program_coords(Lq, M, D, BLOCK_Q, BLOCK_D)
    MD = M * D
    c_mask = c_in[None, None, :]
    c3 = c[None, None, :]
    nm_offset = n * S * MD + m * D
    value_nm = value_ptr + nm_offset
    grad_value_nm = grad_value_ptr + nm_offset
    g = tl.load(grad_out_ptr + row[:, None] * D + c[None, :], mask=q_mask[:, None] & c_in[None, :],
                other=0.0).to(ACC)
    g3 = g[:, None, :]
    for level in range(L):
        h, w, lp, lp_mask, a, fx, fy, corner, in00, in01, in10, in11 = _level_samples(
            loc_ptr, attn_ptr, shapes_ptr, starts_ptr, row, q_mask, level, MD, L, NUM_POINTS, POINTS_PAD, ACC)
        offs = corner[:, :, None] + c3
        m00 = in00[:, :, None] & c_mask
        m01 = in01[:, :, None] & c_mask
        m10 = in10[:, :, None] & c_mask
        m11 = in11[:, :, None] & c_mask
        # Recompute the corner values instead of storing per-point samples in the forward pass.
        s00 = tl.sum(tl.load(value_nm + offs, mask=m00, other=0.0).to(ACC) * g3, axis=2)
        s01 = tl.sum(tl.load(value_nm + offs + MD, mask=m01, other=0.0).to(ACC) * g3, axis=2)
        s10 = tl.sum(tl.load(value_nm + offs + w * MD, mask=m10, other=0.0).to(ACC) * g3, axis=2)
        s11 = tl.sum(tl.load(value_nm + offs + (w + 1) * MD, mask=m11, other=0.0).to(ACC) * g3, axis=2)
        b00 = (1 - fx) * (1 - fy)
        b01 = fx * (1 - fy)
        b10 = (1 - fx) * fy
        b11 = fx * fy
        grad_a = b00 * s00 + b01 * s01 + b10 * s10 + b11 * s11
        # d sample / d loc = (d sample / d pixel) * (map size); out-of-map corners count as zeros.
        grad_x = a * w.to(ACC) * ((1 - fy) * (s01 - s00) + fy * (s11 - s10))
        grad_y = a * h.to(ACC) * ((1 - fx) * (s10 - s00) + fx * (s11 - s01))
        # This program alone owns these (query, head) rows: plain stores.
        tl.store(grad_attn_ptr + lp, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=lp_mask)
        tl.store(grad_loc_ptr + 2 * lp, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=lp_mask)
        tl.store(grad_loc_ptr + 2 * lp + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=lp_mask)
        # Pixels are shared between queries of all programs: scatter with (relaxed) atomics.
        ag = a[:, :, None] * g3
        tl.atomic_add(grad_value_nm + offs, b00[:, :, None] * ag, mask=m00, sem="relaxed")
        tl.atomic_add(grad_value_nm + offs + MD, b01[:, :, None] * ag, mask=m01, sem="relaxed")
        tl.atomic_add(grad_value_nm + offs + w * MD, b10[:, :, None] * ag, mask=m10, sem="relaxed")
        tl.atomic_add(grad_value_nm + offs + (w + 1) * MD, b11[:, :, None] * ag, mask=m11, sem="relaxed")


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _meta(value: torch.Tensor, sampling_locations: torch.Tensor) -> dict:
    if value.dtype not in _SUPPORTED:
        raise TypeError(f"ms_deform_attn (triton) supports {_SUPPORTED} values, got {value.dtype}.")
    n, s, m, d = value.shape
    lq, num_levels, num_points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return dict(
        Lq=lq, S=s, M=m, D=d, L=num_levels, LQ_CLASS=triton.next_power_of_2(lq),
        NUM_POINTS=num_points, POINTS_PAD=triton.next_power_of_2(num_points),
        BLOCK_D=triton.next_power_of_2(d),
        ACC=tl.float64 if value.dtype == torch.float64 else tl.float32,
    )


def _grid(n: int, m: int, lq: int):
    return lambda meta: (n * m * triton.cdiv(lq, meta["BLOCK_Q"]),)


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
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    if _nothing_to_do(value, sampling_locations):
        return value.new_zeros(n, lq, m * d)
    meta = _meta(value, sampling_locations)
    out = value.new_empty(n, lq, m * d)
    _msda_fwd_kernel[_grid(n, m, lq)](
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous(), out, **meta,
    )
    return out


@ms_deform_attn_fwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    # fp32 (fp64) buffer: half-precision atomics lose the small contributions, bf16 ones are slow.
    grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
    launch = not _nothing_to_do(value, sampling_locations)
    # The kernel stores every location / weight gradient once, so they need no clearing.
    alloc = torch.empty if launch else torch.zeros
    grad_loc = alloc(sampling_locations.shape, dtype=sampling_locations.dtype, device=sampling_locations.device)
    grad_attn = alloc(attention_weights.shape, dtype=attention_weights.dtype, device=attention_weights.device)
    if launch:
        n, _, m, _ = value.shape
        lq = sampling_locations.shape[1]
        _msda_bwd_kernel[_grid(n, m, lq)](
            grad_output.contiguous(), value.contiguous(), spatial_shapes.contiguous(),
            level_start_index.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous(),
            grad_value, grad_loc, grad_attn, **_meta(value, sampling_locations),
        )
    return grad_value.to(value.dtype), grad_loc, grad_attn


@ms_deform_attn_bwd.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_bwd(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_loc, grad_attn


ms_deform_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``msdetr.kernels.ms_deform_attn``; locations are sampled in fp32 (fp64 for
    fp64 values) whatever dtype they come in, and their gradient flows back through the cast."""
    loc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    index = dict(device=value.device, dtype=torch.int64)
    return ms_deform_attn_fwd(
        value, spatial_shapes.to(**index), level_start_index.to(**index),
        sampling_locations.to(loc_dtype), attention_weights,
    )
