"""Multi-scale deformable attention on the CPU as one gather: ``F.embedding_bag`` over ``value``'s
rows, with a hand-written backward.

Same semantics as :func:`msdetr.kernels.reference.ms_deform_attn_reference` (bilinear sampling,
``align_corners=False``: pixel centre ``i`` sits at ``(i + 0.5) / W``; corners outside the map read
zero), except that a NaN or infinite location contributes nothing (output and gradients) where the
reference returns NaN.

* forward: ``value`` (N, S, M, D) is viewed as a table of N*S*M rows of D. One
  ``embedding_bag(mode="sum")`` whose bag (n, q, m) holds the ``L*P*4`` bilinear corner rows of its
  samples, weighted by attention weight x bilinear weight (zero for a corner outside the map, whose
  row is clamped into it). No ``(N*M, D, Lq, L*P)`` temporaries as in the ``grid_sample`` reference:
  the largest ones are the indices and weights, ``L*P*4`` numbers per bag (``L*P*D`` there).
* backward: the dot products of the output gradient with the four corner values
  (``aten::_embedding_bag_per_sample_weights_backward``) give the attention-weight and location
  gradients in closed form. The value gradient is a scatter; ``embedding_bag``'s own backward (sort
  all ``L*P*4`` indices per bag, then add row by row) is slower than the whole reference. Here the
  scatter is itself an ``embedding_bag`` over the output gradient with one bag per table row, its
  entries grouped by row by a stable sort: of the in-map corner rows themselves when they are few
  ("merged"), else ("keyed") of only the top-left corners' positions in a virtual table with a
  one-pixel border around every level, an order in which the in-map corners of each of the four
  kinds are sorted by row too, so one sort of a quarter of the indices serves four ``embedding_bag``
  calls.

Every reduction sums in a fixed order (stable sort, one bag at a time): results are bit-identical
from run to run (for a given thread count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .levels import level_shapes

__all__ = ["ms_deform_attn_gather"]

_STRATEGY = None  # value-gradient strategy override for benchmarks: "merged" or "keyed"


def ms_deform_attn_gather(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]] | torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by gather (CPU; works on any device).

    value (N, S, M, D); shapes the (h, w) of each level, S = sum(h * w), levels in that order;
    sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P).
    Returns (N, Lq, M * D) in value's dtype, computed in float64 for float64 values and in float32
    otherwise. Differentiable in all three tensors.
    """
    levels = level_shapes(shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}.")
    n, s, m, d = value.shape
    total = sum(h * w for h, w in levels)
    if s != total:
        raise ValueError(
            f"value has {s} tokens per image (dim 1) but the level shapes {list(levels)} "
            f"hold sum(h * w) = {total}."
        )
    expected = (
        n,
        sampling_locations.shape[1] if sampling_locations.dim() == 6 else -1,
        m,
        len(levels),
    )
    if (
        sampling_locations.dim() != 6
        or tuple(sampling_locations.shape[:4]) != expected
        or sampling_locations.shape[-1] != 2
    ):
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2) = ({n}, Lq, {m}, {len(levels)}, P, "
            f"2), got {tuple(sampling_locations.shape)}."
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P) = {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}."
        )
    out_dtype = value.dtype
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    out = _GatherMSDA.apply(
        value.to(compute).contiguous(),
        levels,
        sampling_locations.to(compute),
        attention_weights.to(compute),
    )
    return out.to(out_dtype)


class _Layout:
    """Row arithmetic. value (N, S, M, D) is the table, viewed as (N * S * M, D) rows: pixel (y, x)
    of level l of image n, head m is row ((n * S + start_l + y * w_l + x) * M + m)."""

    def __init__(self, levels, n, s, m, device, dtype):
        self.levels, self.n, self.s, self.m = levels, n, s, m
        self.rows = n * s * m
        # A sort key on a virtual table with a one-pixel border around every level, (h + 2) x (w +
        # 2).
        padded = [(h + 2) * (w + 2) for h, w in levels]
        self.key_dtype = torch.int32 if n * sum(padded) * m < 2**31 - 1 else torch.int64
        self.index_dtype = torch.int32 if self.rows < 2**31 - 1 else torch.int64

        def column(values, dt):
            return torch.tensor(values, dtype=dt, device=device)[:, None]  # (L, 1), beside P

        self.width = column([w for _, w in levels], dtype)
        self.height = column([h for h, _ in levels], dtype)
        self.iwidth = column([w for _, w in levels], self.index_dtype)
        # An empty level's corners all get weight zero; its start is kept inside the table.
        starts = [min(sum(h * w for h, w in levels[:i]), s - 1) for i in range(len(levels))]
        self.start = column(starts, self.index_dtype)
        self.pwidth = column([w + 2 for _, w in levels], self.key_dtype)
        self.pstart = column([sum(padded[:i]) for i in range(len(levels))], self.key_dtype)
        self.pimage = sum(padded)

    def _heads(self, dt, device):
        image = (torch.arange(self.n, dtype=dt, device=device)).view(self.n, 1, 1, 1, 1)
        head = torch.arange(self.m, dtype=dt, device=device).view(1, 1, self.m, 1, 1)
        return image, head

    def geometry(self, loc: torch.Tensor):
        """Per sample (N, Lq, M, L, P): fractional offsets fx, fy, the border-table key of its
        top-left corner; per corner (N, Lq, M, L, P, 4): table rows and in-map masks."""
        # align_corners=False: continuous pixel coordinate x = loc * W - 0.5, pixel centres at
        # integers. NaN / inf go far outside, where no corner is in the map.
        x = torch.nan_to_num(loc[..., 0] * self.width - 0.5, nan=-2.0, posinf=-2.0, neginf=-2.0)
        y = torch.nan_to_num(loc[..., 1] * self.height - 0.5, nan=-2.0, posinf=-2.0, neginf=-2.0)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        w1, h1 = self.width - 1, self.height - 1
        in_x = ((x0 >= 0) & (x0 <= w1), (x0 >= -1) & (x0 < w1))  # columns x0, x0 + 1 inside the map
        in_y = ((y0 >= 0) & (y0 <= h1), (y0 >= -1) & (y0 < h1))  # rows y0, y0 + 1
        # Table rows of the corners, clamped into the map (those outside get weight zero).
        it = self.index_dtype
        # (Clamped at 0 last: an empty level has w - 1 = -1.)
        xs = [
            torch.minimum(x0, w1).clamp_(min=0).to(it),
            torch.minimum(x0 + 1, w1).clamp_(min=0).to(it),
        ]
        ys = [
            torch.minimum(y0, h1).clamp_(min=0).to(it),
            torch.minimum(y0 + 1, h1).clamp_(min=0).to(it),
        ]
        image, head = self._heads(it, loc.device)
        base = image * self.s + self.start
        lines = [base + yy * self.iwidth for yy in ys]
        corner_rows = torch.stack(
            [(lines[dy] + xs[dx]) * self.m + head for dy in (0, 1) for dx in (0, 1)], -1
        )
        corner_in = torch.stack([in_x[dx] & in_y[dy] for dy in (0, 1) for dx in (0, 1)], -1)
        # Sort key for the backward: the top-left corner's index in a virtual table with a one-pixel
        # border around every level, (h + 2) x (w + 2), rows ordered like the table's (image, level,
        # pixel, head). The corner (x0 + 1, y0 + 1) in border coordinates is in [0, w] x [0, h] for
        # every sample that touches the map (clamped for the others, which have no corner inside).
        kt = self.key_dtype
        bx = torch.minimum((x0 + 1).clamp(min=0), self.width).to(kt)
        by = torch.minimum((y0 + 1).clamp(min=0), self.height).to(kt)
        kimage, khead = self._heads(kt, loc.device)
        key = (kimage * self.pimage + self.pstart + by * self.pwidth + bx) * self.m + khead
        return fx, fy, key, corner_rows, corner_in


def _corner_weights(fx, fy, a):
    """(..., 4) weights of the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)."""
    gx, gy = 1 - fx, 1 - fy
    ay, afy = a * gy, a * fy
    return torch.stack([gx * ay, fx * ay, gx * afy, fx * afy], -1)


def _corner_dots(grad, table, indices, bags, per_bag):
    """grad[b] . table[indices[b, k]] for every (b, k): (bags, per_bag)."""
    flat = indices.reshape(-1)
    offsets = torch.arange(0, bags * per_bag, per_bag, dtype=flat.dtype, device=flat.device)
    offset2bag = torch.arange(bags, dtype=flat.dtype, device=flat.device).repeat_interleave(per_bag)
    try:
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, table, flat, offsets, offset2bag, 0
        )
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without the private op
        weights = torch.zeros(
            bags, per_bag, dtype=table.dtype, device=table.device, requires_grad=True
        )
        with torch.enable_grad():
            out = F.embedding_bag(
                indices.reshape(bags, per_bag), table, per_sample_weights=weights, mode="sum"
            )
            (dots,) = torch.autograd.grad(out, weights, grad)
    return dots.view(bags, per_bag)


def _scatter(grad, rows, weights, corner_in, key, samples, num_rows, strategy):
    """The value gradient: sum over (bag b, corner e) of weights[b, e] * grad[b] into row rows[b,
        e], as
    embedding_bag over grad with one bag per table row (entries grouped by row, in a fixed
    order)."""
    if strategy == "merged":
        # Few entries: sort the in-map corner rows themselves, one bag list for all corners.
        entries = corner_in.view(-1).nonzero().squeeze(1)
        sorted_rows, perm = torch.sort(rows.view(-1).index_select(0, entries), stable=True)
        entries = entries.index_select(0, perm)
        counts = torch.bincount(sorted_rows, minlength=num_rows)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return F.embedding_bag(
            entries // (4 * samples),
            grad,
            offsets,
            mode="sum",
            per_sample_weights=weights.view(-1).index_select(0, entries),
            include_last_offset=True,
        )
    # Many entries: in the order of the border-table key, the in-map corners of each kind are in row
    # order too (a corner is a fixed key offset from its top-left one, and border positions inside
    # the map map one-to-one to rows), so one stable sort of a quarter of the indices groups the
    # entries of all four corners; corners outside the map (weight zero) are dropped.
    order = torch.sort(key, stable=True).indices
    bags = order // samples
    rows, weights = rows.index_select(0, order), weights.index_select(0, order)
    corner_in = corner_in.index_select(0, order)
    grad_table = None
    for j in range(4):
        keep = corner_in[:, j].nonzero().squeeze(1)
        counts = torch.bincount(rows[:, j].index_select(0, keep), minlength=num_rows)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        part = F.embedding_bag(
            bags.index_select(0, keep),
            grad,
            offsets,
            mode="sum",
            per_sample_weights=weights[:, j].index_select(0, keep),
            include_last_offset=True,
        )
        grad_table = part if grad_table is None else grad_table.add_(part)
    return grad_table


class _GatherMSDA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, levels, loc, attn):
        n, s, m, d = value.shape
        _, lq, _, num_levels, num_points, _ = loc.shape
        bags = n * lq * m
        ctx.empty = bags == 0 or d == 0 or s == 0 or num_levels * num_points == 0
        if ctx.empty:
            ctx.save_for_backward(value, loc, attn)
            return value.new_zeros(n, lq, m * d)
        layout = _Layout(levels, n, s, m, value.device, value.dtype)
        fx, fy, key, rows, corner_in = layout.geometry(loc)
        weights = _corner_weights(fx, fy, attn) * corner_in
        out = F.embedding_bag(
            rows.view(bags, -1),
            value.view(-1, d),
            per_sample_weights=weights.view(bags, -1),
            mode="sum",
        )
        ctx.save_for_backward(value, attn, fx, fy, key, rows, corner_in, weights)
        ctx.layout = layout
        # Sorting all corner rows costs more than 4 row-sized passes once there are many per row.
        ctx.strategy = _STRATEGY or ("merged" if rows.numel() <= 4 * layout.rows else "keyed")
        return out.view(n, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.empty:
            value, loc, attn = ctx.saved_tensors
            return torch.zeros_like(value), None, torch.zeros_like(loc), torch.zeros_like(attn)
        value, attn, fx, fy, key, rows, corner_in, weights = ctx.saved_tensors
        layout = ctx.layout
        need_value, _, need_loc, need_attn = ctx.needs_input_grad
        n, lq, m, num_levels, num_points = fx.shape
        d = value.shape[-1]
        bags, samples = n * lq * m, num_levels * num_points
        grad = grad_out.reshape(bags, d).to(value.dtype).contiguous()
        table = value.view(-1, d)
        grad_value = grad_loc = grad_attn = None

        if need_loc or need_attn:
            # c_j = grad . (corner j's value), zero for corners outside the map (zero padding).
            c = _corner_dots(grad, table, rows, bags, samples * 4).view(rows.shape) * corner_in
            c0, c1, c2, c3 = c.unbind(-1)
            gx, gy = 1 - fx, 1 - fy
            if need_attn:
                grad_attn = gy * (gx * c0 + fx * c1) + fy * (gx * c2 + fx * c3)
            if need_loc:
                # d/dfx and d/dfy of attn * bilinear; dx/dloc_x = W, dy/dloc_y = H (floor has no
                # gradient).
                dfx = attn * (gy * (c1 - c0) + fy * (c3 - c2))
                dfy = attn * (gx * (c2 - c0) + fx * (c3 - c1))
                grad_loc = torch.stack([dfx * layout.width, dfy * layout.height], -1)

        if need_value:
            grad_table = _scatter(
                grad,
                rows.view(-1, 4),
                weights.view(-1, 4),
                corner_in.view(-1, 4),
                key.reshape(-1),
                samples,
                layout.rows,
                ctx.strategy,
            )
            grad_value = grad_table.view(value.shape)
        return grad_value, None, grad_loc, grad_attn
