"""The PyTorch reference of ms_deform_attn against a direct bilinear loop, and the op's dispatch."""

import math

import pytest
import torch

from msdetr.kernels import ms_deform_attn, ms_deform_attn_reference


def naive(value, shapes, starts, loc, weights):
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(num_levels):
                    hh, ww = (int(v) for v in shapes[lvl])
                    start = int(starts[lvl])
                    for p in range(num_points):
                        x = loc[b, q, h, lvl, p, 0] * ww - 0.5
                        y = loc[b, q, h, lvl, p, 1] * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=value.dtype)
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = x0 + dx, y0 + dy
                                if 0 <= xi < ww and 0 <= yi < hh:
                                    wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    acc += wgt * value[b, start + yi * ww + xi, h]
                        out[b, q, h] += weights[b, q, h, lvl, p] * acc
    return out.flatten(2)


def make(n=2, lq=5, m=2, d=3, shapes=((4, 5), (2, 3), (1, 1)), p=2, dtype=torch.float64):
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    s = int(shapes_t.prod(1).sum())
    value = torch.randn(n, s, m, d, dtype=dtype)
    # Locations spill outside [0, 1] so zero padding is exercised; some sit exactly on pixel edges.
    loc = torch.rand(n, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2
    if lq:
        loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 0.0])
        loc[0, 0, 0, 0, 1] = torch.tensor([0.5, 0.25])
    weights = torch.rand(n, lq, m, len(shapes), p, dtype=dtype)
    return value, shapes_t, starts, loc, weights


def test_reference_matches_direct_bilinear():
    value, shapes, starts, loc, weights = make()
    ref = ms_deform_attn_reference(value, shapes, starts, loc, weights)
    torch.testing.assert_close(
        ref, naive(value, shapes, starts, loc, weights), rtol=1e-10, atol=1e-10
    )


def test_reference_empty_queries_and_half_precision():
    value, shapes, starts, loc, weights = make(lq=0)
    assert ms_deform_attn(value, shapes, starts, loc, weights).shape == (2, 0, 6)
    value, shapes, starts, loc, weights = make(dtype=torch.bfloat16)
    out = ms_deform_attn(value, shapes, starts, loc.float(), weights)
    assert out.dtype == torch.bfloat16
    exact = ms_deform_attn_reference(value.double(), shapes, starts, loc, weights.double())
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)


def test_backend_validation():
    value, shapes, starts, loc, weights = make()
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend"):
        ms_deform_attn(value, shapes, starts, loc, weights, backend="cuda")


def test_auto_backend_is_gather_on_cpu_and_under_deterministic_algorithms_on_cuda():
    """On the CPU "auto" runs the gather formulation (the reference's result, faster); on CUDA it
    runs Triton, except under torch.use_deterministic_algorithms, whose atomic backward refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msdetr.kernels import _auto_backend

    value, shapes, starts, loc, weights = make()
    assert _auto_backend(value) == "gather"
    torch.testing.assert_close(
        ms_deform_attn(value, shapes, starts, loc, weights),
        ms_deform_attn(value, shapes, starts, loc, weights, backend="reference"),
        rtol=1e-10,
        atol=1e-10,
    )
    with FakeTensorMode():
        on_cuda = torch.empty(1, 4, 1, 2, device="cuda")  # a fake CUDA tensor: no GPU needed
    assert _auto_backend(on_cuda) == "triton"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _auto_backend(on_cuda) == "gather"
    finally:
        torch.use_deterministic_algorithms(previous)
