"""The embedding_bag formulation of ms_deform_attn (msdetr.kernels.gather) against the grid_sample
reference: forward, the three gradients, gradcheck, NaN / inf locations, empty inputs, half
    precision
and run-to-run determinism."""

import pytest
import torch

import msdetr.kernels.gather as gather
from msdetr.kernels import ms_deform_attn_reference
from msdetr.kernels.gather import ms_deform_attn_gather

STRATEGIES = ["merged", "keyed"]  # the two value-gradient scatters; the default picks one by size


def make(
    n=2, lq=7, m=3, d=5, shapes=((6, 7), (3, 4), (1, 1), (4, 8)), p=3, dtype=torch.float64, seed=0
):
    g = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    s = int(shapes_t.prod(1).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64).to(dtype)
    # Locations spill outside [0, 1] so zero padding and fully outside samples are exercised.
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if lq and len(shapes) == 4 and p >= 3:
        # On the map's border, on pixel edges of level 0 (6 x 7) and on pixel centres of level 3
        # (4 x 8; exact in binary, so both ops take the same side of the location gradient's jump).
        loc[0, 0, 0, 0, :3] = torch.tensor(
            [[0.0, 0.0], [1.0, 1.0], [1 / 7, 2 / 6]], dtype=torch.float64
        )
        loc[0, 0, 1, 0, :3] = torch.tensor(
            [[1.0, 0.5], [0.0, 1.0], [3 / 7, 1.0]], dtype=torch.float64
        )
        loc[0, 0, 0, 3, :3] = torch.tensor(
            [[0.5 / 8, 0.5 / 4], [7.5 / 8, 3.5 / 4], [3.5 / 8, 0.0]], dtype=torch.float64
        )
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64).to(dtype)
    return value, shapes_t, starts, loc, weights


def both(value, shapes, starts, loc, weights, grad=None):
    """Outputs and (value, loc, weights) gradients of the reference and of the gather op."""
    results = []
    for op in ("reference", "gather"):
        ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
        if op == "reference":
            out = ms_deform_attn_reference(ins[0], shapes, starts, ins[1], ins[2])
        else:
            out = ms_deform_attn_gather(ins[0], shapes, ins[1], ins[2])
        if grad is None:
            grad = torch.randn(
                out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            )
        grads = torch.autograd.grad(out, ins, grad.to(out.dtype))
        results.append((out, grads))
    return results


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setattr(gather, "_STRATEGY", request.param)
    return request.param


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"n": 1, "lq": 13, "m": 1, "d": 1, "shapes": ((1, 1),), "p": 1},
        {"n": 3, "lq": 5, "m": 2, "d": 4, "shapes": ((9, 2), (1, 7), (4, 4)), "p": 4, "seed": 3},
        {"n": 2, "lq": 40, "m": 8, "d": 8, "shapes": ((12, 17), (6, 9), (3, 5)), "p": 4, "seed": 7},
    ],
)
def test_forward_and_gradients_match_reference(case, strategy):
    (ref, ref_grads), (out, grads) = both(*make(**case))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("value", "loc", "weights"), grads, ref_grads):
        torch.testing.assert_close(
            got, want, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def test_float32_matches_reference(strategy):
    value, shapes, starts, loc, weights = make(dtype=torch.float32, lq=30)
    (ref, ref_grads), (out, grads) = both(value, shapes, starts, loc.float(), weights)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64(strategy):
    value, shapes, _, loc, weights = make(n=1, lq=3, m=2, d=2, shapes=((3, 4), (2, 2)), p=2)
    # Away from pixel centres, where the location gradient jumps.
    loc = loc + 0.013
    inputs = [t.requires_grad_(True) for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_gather(v, shapes, loc, w), inputs
    )


def test_nan_and_inf_locations_contribute_nothing(strategy):
    value, shapes, starts, loc, weights = make()
    bad = loc.clone()
    bad[0, 1, 0, 0, 0, 0] = float("nan")
    bad[0, 2, 1, 1, 1, 1] = float("inf")
    bad[1, 3, 2, 2, 0, 0] = -float("inf")
    bad[1, 4, 0, 3, 2] = float("nan")
    hit = ~torch.isfinite(bad).all(-1)
    # The same as the reference with those samples' weights zeroed.
    clean_weights = weights.masked_fill(hit, 0.0)
    clean_loc = torch.where(hit[..., None], 0.5, bad)
    (ref, ref_grads), _ = both(value, shapes, starts, clean_loc, clean_weights)
    ins = [t.detach().clone().requires_grad_(True) for t in (value, bad, weights)]
    out = ms_deform_attn_gather(ins[0], shapes, ins[1], ins[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, ins, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-9, atol=1e-9)
    assert (grads[1][hit] == 0).all() and (grads[2][hit] == 0).all()
    torch.testing.assert_close(grads[1][~hit], ref_grads[1][~hit], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[2][~hit], ref_grads[2][~hit], rtol=1e-9, atol=1e-9)


def test_far_outside_locations_are_zero():
    value, shapes, _, loc, weights = make(lq=4)
    loc = torch.full_like(loc, 1e30)
    loc[1] = -1e30
    ins = [t.requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn_gather(*ins[:1], shapes, *ins[1:])
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), ins)
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize(
    "n, lq, m, d, p", [(2, 0, 3, 5, 2), (0, 4, 3, 5, 2), (2, 4, 3, 0, 2), (2, 4, 3, 5, 0)]
)
def test_empty_inputs(n, lq, m, d, p):
    shapes = ((3, 4), (1, 2))
    value = torch.randn(n, 14, m, d, requires_grad=True)
    loc = torch.rand(n, lq, m, 2, p, 2, requires_grad=True)
    weights = torch.rand(n, lq, m, 2, p, requires_grad=True)
    out = ms_deform_attn_gather(value, shapes, loc, weights)
    assert out.shape == (n, lq, m * d) and (out == 0).all()
    out.sum().backward()
    assert value.grad.shape == value.shape and (value.grad == 0).all()
    assert loc.grad.shape == loc.shape and weights.grad.shape == weights.shape


@pytest.mark.parametrize(
    "shapes, keep", [(((4, 5), (0, 3), (2, 2)), [0, 2]), (((0, 3), (4, 5), (2, 0)), [1])]
)
def test_empty_level(shapes, keep):
    """An empty level samples nothing: the same as the reference without that level (grid_sample
    refuses empty maps)."""
    value, shapes, _, loc, weights = make(shapes=shapes)
    empty = [i for i in range(len(shapes)) if i not in keep]
    kept = shapes[keep]
    starts = torch.cat([kept.new_zeros(1), kept.prod(1).cumsum(0)[:-1]])
    (ref, ref_grads), _ = both(value, kept, starts, loc[:, :, :, keep], weights[:, :, :, keep])
    ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn_gather(ins[0], shapes, ins[1], ins[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, ins, grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[1][:, :, :, keep], ref_grads[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[2][:, :, :, keep], ref_grads[2], rtol=1e-9, atol=1e-9)
    assert (grads[1][:, :, :, empty] == 0).all() and (grads[2][:, :, :, empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    value, shapes, starts, loc, weights = make(dtype=dtype, lq=20)
    ins = [t.detach().clone().requires_grad_(True) for t in (value, loc.float(), weights)]
    out = ms_deform_attn_gather(ins[0], shapes, ins[1], ins[2])
    assert out.dtype == dtype
    exact = ms_deform_attn_reference(value.double(), shapes, starts, loc, weights.double())
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out, ins, torch.ones_like(out))
    assert [g.dtype for g in grads] == [dtype, torch.float32, dtype]
    _, ref_grads = both(
        value.double(), shapes, starts, loc, weights.double(), grad=torch.ones(out.shape)
    )[0]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)


def test_bit_identical_across_runs(strategy):
    value, shapes, _, loc, weights = make(dtype=torch.float32, n=2, lq=200, m=4, d=8, p=4)
    grad = torch.randn(2, 200, 32)
    runs = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_(True) for t in (value, loc.float(), weights)]
        out = ms_deform_attn_gather(ins[0], shapes, ins[1], ins[2])
        runs.append((out, *torch.autograd.grad(out, ins, grad)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_shapes_as_tensor_or_list():
    value, shapes, _, loc, weights = make()
    a = ms_deform_attn_gather(value, shapes, loc, weights)
    b = ms_deform_attn_gather(value, [tuple(s) for s in shapes.tolist()], loc, weights)
    assert torch.equal(a, b)


def test_token_count_mismatch_is_a_value_error():
    value, shapes, _, loc, weights = make()
    with pytest.raises(ValueError, match="tokens per image"):
        ms_deform_attn_gather(value[:, :-1], shapes, loc, weights)
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn_gather(value, shapes, loc[:, :, :, :2], weights)
