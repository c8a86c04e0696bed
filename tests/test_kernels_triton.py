"""The Triton MSDA kernels, run by Triton's CPU interpreter, against the PyTorch reference; the
custom op's registration, input validation, determinism check and autotune warm-up. The real compile
for sm_80 / sm_90 of every autotune config is in tests/test_kernels_aot.py."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msdetr.kernels import ms_deform_attn, ms_deform_attn_reference, triton_msda
from msdetr.kernels.triton_msda import ms_deform_attn_triton

# Pinned positions must be exact in binary both for the kernel's `loc * W - 0.5` and for
# grid_sample's `((2 * loc - 1 + 1) * W - 1) / 2`: at pixel centres the location gradient jumps, so
# both sides have to take the same floor. These are exact whatever the map size.
ANYWHERE = (0.0, 0.5, 1.0, -3.0, 5.0, -0.25, 1.25)


def exact_positions(size: int) -> list[float]:
    """Map border, centre and far-outside positions; plus every pixel centre and edge when `size` is
    a power of two (then k / (2 * size) is exact)."""
    dyadic = [k / (2 * size) for k in range(2 * size + 1)] if size & (size - 1) == 0 else []
    return list(ANYWHERE) + dyadic


def make_inputs(n, lq, m, d, shapes, p, dtype=torch.float64):
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    value = torch.randn(n, int(shapes_t.prod(1).sum()), m, d, dtype=dtype)
    # Spills outside [0, 1] so the zero padding is exercised.
    loc = torch.rand(n, lq, m, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2
    rows = loc.view(-1, len(shapes), p, 2)
    for lvl, (h, w) in enumerate(shapes):
        xs, ys = exact_positions(w), exact_positions(h)
        for i, x in enumerate(xs):
            r, pt = divmod(i, p)
            if r < rows.shape[0]:
                rows[r, lvl, pt] = torch.tensor([x, ys[(3 * i) % len(ys)]])
    weights = torch.rand(n, lq, m, len(shapes), p, dtype=dtype)
    return (
        value,
        shapes_t,
        starts,
        loc.to(torch.float64 if dtype == torch.float64 else torch.float32),
        weights,
    )


CASES = {
    "3_levels_d3": dict(n=2, lq=9, m=2, d=3, shapes=((4, 5), (2, 3), (1, 1)), p=2),
    "5_levels_pow2": dict(
        n=1, lq=7, m=3, d=5, shapes=((8, 4), (4, 8), (2, 2), (1, 2), (1, 1)), p=3
    ),
    "batch_3_query_blocks": dict(n=3, lq=37, m=1, d=8, shapes=((8, 8), (4, 4)), p=4),
    "d17_1_level": dict(n=1, lq=4, m=2, d=17, shapes=((3, 7),), p=1),
}


def run_both(value, shapes, starts, loc, weights, upstream=None):
    """Outputs and (value, location, weight) gradients of the Triton op and of the reference."""
    results = []
    for fn in (ms_deform_attn_triton, ms_deform_attn_reference):
        inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
        out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
        if upstream is None:
            upstream = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
        results.append((out, torch.autograd.grad(out, inputs, upstream)))
    return results


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float64_matches_reference(case):
    (out, grads), (ref, ref_grads) = run_both(*make_inputs(**case))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-9)
    for name, got, want, rtol in zip(
        ("value", "location", "weight"), grads, ref_grads, (1e-5, 1e-4, 1e-5)
    ):
        torch.testing.assert_close(
            got, want, rtol=rtol, atol=1e-9, msg=lambda m, name=name: f"{name} grad: {m}"
        )


def test_float32_matches_reference():
    (out, grads), (ref, ref_grads) = run_both(
        *make_inputs(**CASES["5_levels_pow2"], dtype=torch.float32)
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float64(dtype):
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"], dtype=dtype)
    upstream = torch.randn(2, 9, 6, dtype=torch.float64).to(dtype)
    (out, grads), _ = run_both(value, shapes, starts, loc, weights, upstream)
    # The exact answer for the same (rounded) inputs: only the kernel's own rounding is measured.
    (exact, exact_grads), _ = run_both(
        value.double(), shapes, starts, loc.double(), weights.double(), upstream.double()
    )
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype, torch.float32, dtype]
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)


def test_no_queries_returns_empty_without_launching(monkeypatch):
    # Subscripting None (kernel[grid]) would raise: any launch fails the test.
    monkeypatch.setattr(triton_msda, "_msda_fwd_kernel", None)
    monkeypatch.setattr(triton_msda, "_msda_bwd_kernel", None)
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"] | dict(lq=0))
    (out, grads), _ = run_both(value, shapes, starts, loc, weights)
    assert out.shape == (2, 0, 6)
    assert [g.shape for g in grads] == [value.shape, loc.shape, weights.shape]
    assert all(not g.any() for g in grads)


def test_non_contiguous_inputs_and_float64_locations():
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"], dtype=torch.float32)
    expected = ms_deform_attn_triton(value, shapes, starts, loc, weights)
    value_t = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_wide = torch.cat([loc.double(), loc.double()], dim=-1)[..., :2]
    weights_t = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_t.is_contiguous() or loc_wide.is_contiguous() or weights_t.is_contiguous())
    loc_wide.requires_grad_(True)
    out = ms_deform_attn_triton(value_t, shapes, starts, loc_wide, weights_t)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The location gradient comes back through the fp32 cast in the location's own dtype.
    (grad_loc,) = torch.autograd.grad(out.sum(), loc_wide)
    assert grad_loc.dtype == torch.float64 and grad_loc.shape == loc_wide.shape


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_public_function_dispatches_to_the_custom_op():
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"])
    value.requires_grad_(True)
    with _RecordOps() as record:
        out = ms_deform_attn(value, shapes, starts, loc, weights, backend="triton")
        out.sum().backward()
    assert "msdetr::ms_deform_attn_fwd" in record.names
    assert "msdetr::ms_deform_attn_bwd" in record.names
    assert "aten::grid_sampler_2d" not in record.names


def test_opcheck():
    value, shapes, starts, loc, weights = make_inputs(
        n=1, lq=3, m=2, d=4, shapes=((3, 4), (1, 2)), p=2
    )
    inputs = (
        value.requires_grad_(True),
        shapes,
        starts,
        loc.requires_grad_(True),
        weights.requires_grad_(True),
    )
    torch.library.opcheck(torch.ops.msdetr.ms_deform_attn_fwd.default, inputs)
    upstream = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.msdetr.ms_deform_attn_bwd.default, (upstream, *(t.detach() for t in inputs))
    )


def test_torch_compile_fullgraph_with_backward():
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"])

    def loss(value, loc, weights):
        return ms_deform_attn(value, shapes, starts, loc, weights, backend="triton").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    grads = []
    for fn in (loss, compiled):
        inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
        grads.append(torch.autograd.grad(fn(*inputs), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_module_with_triton_backend_matches_reference():
    from msdetr.models.attention import MSDeformAttn

    shapes, starts = make_inputs(**CASES["5_levels_pow2"])[1:3]
    n, s = 2, int(shapes.prod(1).sum())
    query, memory = (
        torch.randn(n, 6, 8, dtype=torch.float64),
        torch.randn(n, s, 8, dtype=torch.float64),
    )
    ref_points = torch.rand(n, 6, len(shapes), 4, dtype=torch.float64)
    module = MSDeformAttn(d_model=8, n_levels=len(shapes), n_heads=2, n_points=3).double()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(module.attention_weights.weight)
    grads = []
    for backend in ("triton", "reference"):
        module.backend = backend
        out = module(query, ref_points, memory, shapes, starts)
        grads.append(torch.autograd.grad(out.square().sum(), list(module.parameters())))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_nan_and_inf_locations_contribute_zero():
    value, shapes, starts, loc, weights = make_inputs(**CASES["5_levels_pow2"])
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    bad.view(-1)[::4] = True
    poisoned = loc.clone()
    specials = (math.nan, math.inf, -math.inf)
    for k, i in enumerate(bad.view(-1).nonzero().flatten().tolist()):
        # x, y or both; NaN, +inf or -inf.
        point = poisoned.view(-1, 2)[i]
        point[k % 2] = specials[k % 3]
        if k % 5 == 0:
            point[1 - k % 2] = specials[(k + 1) % 3]
    # grid_sample (zeros padding) gives exact zeros, with zero gradients, to points far outside the
    # map.
    outside = loc.clone()
    outside[bad] = 5.0
    upstream = torch.randn(
        value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64
    )
    (out, grads), _ = run_both(value, shapes, starts, poisoned, weights, upstream)
    _, (ref, ref_grads) = run_both(value, shapes, starts, outside, weights, upstream)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    grad_value, grad_loc, grad_weights = grads
    assert not grad_loc[bad].any() and not grad_weights[bad].any()


def _op_inputs():
    return make_inputs(n=1, lq=3, m=2, d=4, shapes=((3, 4), (1, 2)), p=2)


def _replace(index, fn):
    def mutate(inputs):
        inputs = list(inputs)
        inputs[index] = fn(inputs[index])
        return inputs

    return mutate


INVALID = {
    "value_rank": (_replace(0, lambda v: v[0]), r"value must be \(N, S, M, D\)"),
    "shapes_columns": (
        _replace(1, lambda s: torch.cat([s, s[:, :1]], 1)),
        r"spatial_shapes must be \(L, 2\)",
    ),
    "starts_length": (_replace(2, lambda s: s[:1]), r"level_start_index must be \(L,\)"),
    "locations_levels": (_replace(3, lambda lc: lc[:, :, :, :1]), "sampling_locations must be"),
    "locations_heads": (_replace(3, lambda lc: lc[:, :, :1]), "sampling_locations must be"),
    "weights_points": (_replace(4, lambda w: w[..., :1]), "attention_weights must be"),
    "value_dtype": (_replace(0, lambda v: v.to(torch.int32)), "value must be one of"),
    "locations_dtype": (
        _replace(3, lambda lc: lc.to(torch.int32)),
        "sampling_locations must be one of",
    ),
    "weights_device": (_replace(4, lambda w: w.to("meta")), "must be on one device"),
}


@pytest.mark.parametrize("mutate, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_inputs_are_refused_in_one_sentence(mutate, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn_triton(*mutate(_op_inputs()))


def test_the_ops_check_index_dtypes_and_the_upstream_gradient():
    value, shapes, starts, loc, weights = _op_inputs()
    with pytest.raises(ValueError, match="spatial_shapes must be int64"):
        torch.ops.msdetr.ms_deform_attn_fwd(value, shapes.int(), starts, loc, weights)
    with pytest.raises(ValueError, match="level_start_index must be int64"):
        torch.ops.msdetr.ms_deform_attn_fwd(value, shapes, starts.int(), loc, weights)
    with pytest.raises(ValueError, match=r"grad_output must be \(N, Lq, M \* D\)"):
        upstream = torch.zeros(1, 3, 7, dtype=value.dtype)
        torch.ops.msdetr.ms_deform_attn_bwd(upstream, value, shapes, starts, loc, weights)


@pytest.fixture
def restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_atomic_backward_refuses_deterministic_algorithms(restore_determinism):
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"])
    value.requires_grad_(True)
    triton_msda.check_deterministic()  # off: nothing to say
    torch.use_deterministic_algorithms(True)
    out = ms_deform_attn_triton(value, shapes, starts, loc, weights)  # the forward is deterministic
    with pytest.raises(
        RuntimeError, match=r"msdetr::ms_deform_attn_bwd .*not deterministic.*warn_only=True"
    ):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="msdetr::ms_deform_attn_bwd"):
        triton_msda.check_deterministic()


def test_atomic_backward_warns_under_warn_only(restore_determinism):
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"])
    (_, expected), _ = run_both(
        value, shapes, starts, loc, weights, torch.ones(2, 9, 6, dtype=torch.float64)
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="msdetr::ms_deform_attn_bwd .*not deterministic"):
        (_, grads), _ = run_both(
            value, shapes, starts, loc, weights, torch.ones(2, 9, 6, dtype=torch.float64)
        )
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_warm_up_runs_forward_and_backward_once_per_tune_key(monkeypatch):
    launches = []
    kernels = {"fwd": triton_msda._msda_fwd_kernel, "bwd": triton_msda._msda_bwd_kernel}
    for name, kernel in kernels.items():

        def run(*args, _name=name, _run=kernel.run, **kwargs):
            launches.append((_name, kwargs["LQ_CLASS"], kwargs["L"], kwargs["NUM_POINTS"]))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
        # Two configs, so that the autotuner keys its cache as on a GPU; the interpreter cannot time
        # them (Triton 3.6 benchmarks even the one config left after pruning): a stand-in timing.
        monkeypatch.setattr(kernel, "configs", kernel.configs * 2)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kwargs: [1.0, 1.0, 1.0])
    keys = triton_msda.warm_up(
        [(4, 5), (2, 3)],
        num_heads=2,
        head_dim=4,
        num_points=2,
        query_counts=(3, 4, 7, 9, 0),
        dtype=torch.float64,
        device="cpu",
        batch_size=2,
    )
    assert [k["LQ_CLASS"] for k in keys] == [4, 8, 16]
    assert sorted(launches) == sorted((k, q, 2, 2) for k in ("fwd", "bwd") for q in (4, 8, 16))
    for kernel in kernels.values():
        assert len(kernel.cache) == 3
        assert {key[:5] for key in kernel.cache} == {(2, 4, 2, q, 2) for q in (4, 8, 16)}


def _record_launches(monkeypatch):
    """(kernel, VALUE_GRAD or None) of every launch, the kernels still running."""
    launches = []
    for name in ("_msda_fwd_kernel", "_msda_bwd_kernel"):
        kernel = getattr(triton_msda, name)

        def run(*args, _name=name, _run=kernel.run, **kwargs):
            launches.append((_name, kwargs.get("VALUE_GRAD")))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return launches


def test_value_without_gradient_skips_the_value_gradient(monkeypatch, restore_determinism):
    value, shapes, starts, loc, weights = make_inputs(**CASES["5_levels_pow2"])
    upstream = torch.randn(1, 7, 15, dtype=torch.float64)
    _, (_, ref_grads) = run_both(value, shapes, starts, loc, weights, upstream)
    launches = _record_launches(monkeypatch)
    loc_in, weights_in = (t.detach().clone().requires_grad_(True) for t in (loc, weights))
    out = ms_deform_attn_triton(value, shapes, starts, loc_in, weights_in)  # value: no grad
    # Without atomics the backward is deterministic: no refusal.
    torch.use_deterministic_algorithms(True)
    grads = torch.autograd.grad(out, (loc_in, weights_in), upstream)
    assert launches == [("_msda_fwd_kernel", None), ("_msda_bwd_kernel", False)]
    for got, want in zip(grads, ref_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    # The op itself: an empty value gradient.
    grad_value, *_ = torch.ops.msdetr.ms_deform_attn_bwd(
        upstream, value, shapes, starts, loc, weights, False
    )
    assert grad_value.shape == (0,)


def test_launches_go_to_the_tensors_device(monkeypatch):
    """The launch runs under a device guard of value's device (Triton launches on the current
    device). The interpreter has no CUDA device: the guard is recorded on the CPU run, and the guard
    that a cuda:1 tensor (a fake tensor: no GPU needed) gets selects device 1."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    guarded = []
    real_guard = triton_msda._device_guard

    def guard(t):
        guarded.append(t.device)
        return real_guard(t)

    monkeypatch.setattr(triton_msda, "_device_guard", guard)
    value, shapes, starts, loc, weights = make_inputs(**CASES["3_levels_d3"])
    value.requires_grad_(True)
    ms_deform_attn_triton(value, shapes, starts, loc, weights).sum().backward()
    assert guarded == [value.device, value.device]
    with FakeTensorMode():
        on_gpu1 = torch.empty(2, device="cuda:1")
    cuda_guard = real_guard(on_gpu1)
    assert isinstance(cuda_guard, torch.cuda.device) and cuda_guard.idx == 1


@pytest.mark.parametrize("block_q", [1, 2, 4])
def test_small_query_blocks_match_reference(monkeypatch, block_q):
    """The GPU candidates' BLOCK_Q (1 and 2 in one-warp CTAs, 4, ...), under the interpreter."""
    import triton

    for name in ("_msda_fwd_kernel", "_msda_bwd_kernel"):
        config = triton.Config({"BLOCK_Q": block_q}, num_warps=1, num_stages=1)
        monkeypatch.setattr(getattr(triton_msda, name), "configs", [config])
    (out, grads), (ref, ref_grads) = run_both(*make_inputs(**CASES["batch_3_query_blocks"]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-9)
    for got, want, rtol in zip(grads, ref_grads, (1e-5, 1e-4, 1e-5)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-9)


def test_int64_offsets_match_reference(monkeypatch):
    """Offsets within a (batch, head) slice are int32 below 2**31 elements; the int64 variant (for
    larger values) computes the same."""
    metas = []
    real_meta = triton_msda._meta

    def meta(*args):
        metas.append(real_meta(*args))
        return metas[-1]

    monkeypatch.setattr(triton_msda, "_INT32_MAX", 0)
    monkeypatch.setattr(triton_msda, "_meta", meta)
    (out, grads), (ref, ref_grads) = run_both(*make_inputs(**CASES["5_levels_pow2"]))
    assert metas and all(m["IDX"] == triton_msda.tl.int64 for m in metas)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-9)
    for got, want, rtol in zip(grads, ref_grads, (1e-5, 1e-4, 1e-5)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-9)
