"""The Triton MSDA kernels, run by Triton's CPU interpreter, against the PyTorch reference; the custom
op's registration; and a real compile of every kernel for sm_80 and sm_90 (no GPU needed)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msdetr.kernels import ms_deform_attn, ms_deform_attn_reference
from msdetr.kernels import triton_msda
from msdetr.kernels.triton_msda import ms_deform_attn_triton

# Pinned positions must be exact in binary both for the kernel's `loc * W - 0.5` and for grid_sample's
# `((2 * loc - 1 + 1) * W - 1) / 2`: at pixel centres the location gradient jumps, so both sides have to
# take the same floor. These are exact whatever the map size.
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
    return value, shapes_t, starts, loc.to(torch.float64 if dtype == torch.float64 else torch.float32), weights


CASES = {
    "3_levels_d3": dict(n=2, lq=9, m=2, d=3, shapes=((4, 5), (2, 3), (1, 1)), p=2),
    "5_levels_pow2": dict(n=1, lq=7, m=3, d=5, shapes=((8, 4), (4, 8), (2, 2), (1, 2), (1, 1)), p=3),
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
    for name, got, want, rtol in zip(("value", "location", "weight"), grads, ref_grads, (1e-5, 1e-4, 1e-5)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-9, msg=lambda m: f"{name} grad: {m}")


def test_float32_matches_reference():
    (out, grads), (ref, ref_grads) = run_both(*make_inputs(**CASES["5_levels_pow2"], dtype=torch.float32))
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
    (exact, exact_grads), _ = run_both(value.double(), shapes, starts, loc.double(), weights.double(),
                                       upstream.double())
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
    value, shapes, starts, loc, weights = make_inputs(n=1, lq=3, m=2, d=4, shapes=((3, 4), (1, 2)), p=2)
    inputs = (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True), weights.requires_grad_(True))
    torch.library.opcheck(torch.ops.msdetr.ms_deform_attn_fwd.default, inputs)
    upstream = torch.randn(1, 3, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.msdetr.ms_deform_attn_bwd.default, (upstream, *(t.detach() for t in inputs)))


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


# Runs with TRITON_INTERPRET unset: there triton.jit gives real JITFunctions (here, interpreter stubs).
_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from msdetr.kernels import triton_msda

    def signature(fn, dtype):
        pointers = {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "grad_loc_ptr": "*fp32",
                    "grad_value_ptr": "*fp32"}
        constexprs = {p.name for p in fn.params if p.is_constexpr}
        return {name: "constexpr" if name in constexprs else pointers.get(name, "*" + dtype)
                if name.endswith("_ptr") else "i32" for name in fn.arg_names}

    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            for kernel in (triton_msda._msda_fwd_kernel, triton_msda._msda_bwd_kernel):
                fn = kernel.fn
                constants = dict(D=32, NUM_POINTS=4, POINTS_PAD=4, BLOCK_D=32, ACC=tl.float32, BLOCK_Q=8)
                # Pointers from the torch allocator are 16-byte aligned; the launcher tells the compiler so.
                aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
                src = ASTSource(fn, signature(fn, dtype), constexprs=constants, attrs=aligned)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=4, num_stages=1))
                ptx = compiled.asm["ptx"]
                assert compiled.asm["cubin"], (fn.__name__, arch, dtype)
                assert f".target sm_{arch}" in ptx, (fn.__name__, arch, dtype)
                if "bwd" in fn.__name__:
                    assert "atom.global" in ptx or "red.global" in ptx, "value gradient is not scattered atomically"
                print("compiled", fn.__name__, f"sm_{arch}", dtype, flush=True)
""")


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: every kernel really goes through ptxas
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 12, proc.stdout


def test_attention_module_with_triton_backend_matches_reference():
    from msdetr.models.attention import MSDeformAttn

    shapes, starts = make_inputs(**CASES["5_levels_pow2"])[1:3]
    n, s = 2, int(shapes.prod(1).sum())
    query, memory = torch.randn(n, 6, 8, dtype=torch.float64), torch.randn(n, s, 8, dtype=torch.float64)
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
