"""Mask losses, matching costs and point sampling (msdetr.losses.masks), and the inference pasting
(msdetr.postprocess_masks), on hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.masks import layer_mask_losses
from msdetr.losses.masks import (
    dice_mask_loss,
    map_points,
    mask_bce_cost,
    mask_dice_cost,
    mask_match_costs,
    matched_point_losses,
    point_sample,
    sigmoid_bce_mask_loss,
    uncertain_points,
)
from msdetr.postprocess_masks import paste_masks

# -- point_sample ----------------------------------------------------------------------------------


def test_point_sample_hand_values():
    # A 2 x 2 map: pixel centres at x, y = 0.25 and 0.75; zero outside (grid_sample's zero padding).
    grid = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    coords = torch.tensor(
        [[[0.5, 0.5], [0.25, 0.25], [0.375, 0.25], [0.125, 0.25], [0.75, 0.625]]],
        dtype=torch.float64,
    )
    out = point_sample(grid, coords)
    # centre: mean of all four; a pixel centre: its value; a quarter pixel right of (0, 0):
    # 0.75 * 1 + 0.25 * 2; a quarter pixel left of it: 0.75 * 1 + 0.25 * 0 (outside);
    # x at the right column's centre, y a quarter pixel above the bottom row: 0.25 * 2 + 0.75 * 4.
    expected = torch.tensor([[2.5, 1.0, 1.25, 0.75, 3.5]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def manual_bilinear(img: torch.Tensor, x: float, y: float) -> float:
    """One channel (H, W) at (x, y) in [0, 1]: pixel (i, j) has its centre at
    ((j + .5) / W, (i + .5) / H); zero outside."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


def test_point_sample_matches_manual_bilinear_with_channels():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=g)
    coords = torch.tensor(
        [
            [[0.1, 0.9], [0.5, 0.33], [0.99, 0.01], [0.0, 0.0]],
            [[0.6, 0.2], [0.071, 0.5], [1.0, 1.0], [0.3, 0.77]],
        ],
        dtype=torch.float64,
    )
    out = point_sample(maps, coords)
    assert out.shape == (2, 3, 4)
    for n in range(2):
        for c in range(3):
            for p in range(4):
                x, y = coords[n, p].tolist()
                assert out[n, c, p].item() == pytest.approx(
                    manual_bilinear(maps[n, c], x, y), abs=1e-12
                )


# -- losses and costs, written out --------------------------------------------------------------

LOGITS = [[2.0, -1.0, 0.0, 0.5], [-3.0, 1.5, 0.25, -0.5], [0.0, 0.0, 4.0, -2.0]]
LABELS = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.5, 0.0], [1.0, 1.0, 0.0, 0.0]]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def bce_by_hand(xs: list[float], ts: list[float]) -> float:
    return sum(
        -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x))) for x, t in zip(xs, ts)
    ) / len(xs)


def dice_by_hand(xs: list[float], ts: list[float]) -> float:
    ps = [sig(x) for x in xs]
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)


def test_first_entries_by_hand():
    # The first mask's BCE, every term spelled out: sigma(2), sigma(-1), sigma(0), sigma(0.5).
    first = (-math.log(sig(2.0)) - math.log(1 - sig(-1.0)) - math.log(0.5) - math.log(sig(0.5))) / 4
    assert bce_by_hand(LOGITS[0], LABELS[0]) == pytest.approx(first, rel=1e-15)
    p = [sig(2.0), sig(-1.0), 0.5, sig(0.5)]
    dice = 1 - (2 * (p[0] + p[2] + p[3]) + 1) / (sum(p) + 3 + 1)
    assert dice_by_hand(LOGITS[0], LABELS[0]) == pytest.approx(dice, rel=1e-15)


def test_losses_equal_their_formulas_in_float64():
    x = torch.tensor(LOGITS, dtype=torch.float64)
    t = torch.tensor(LABELS, dtype=torch.float64)
    num_masks = 2.5
    bce = sigmoid_bce_mask_loss(x, t, num_masks)
    dice = dice_mask_loss(x, t, num_masks)
    assert bce.dtype == torch.float64 and dice.dtype == torch.float64
    assert bce.item() == pytest.approx(
        sum(bce_by_hand(a, b) for a, b in zip(LOGITS, LABELS)) / num_masks, rel=1e-12
    )
    assert dice.item() == pytest.approx(
        sum(dice_by_hand(a, b) for a, b in zip(LOGITS, LABELS)) / num_masks, rel=1e-12
    )


def test_costs_equal_their_formulas_pairwise():
    x = torch.tensor(LOGITS, dtype=torch.float64)
    t = torch.tensor(LABELS[:2], dtype=torch.float64)
    bce, dice = mask_bce_cost(x, t), mask_dice_cost(x, t)
    assert bce.shape == dice.shape == (3, 2)
    for q in range(3):
        for g in range(2):
            assert bce[q, g].item() == pytest.approx(bce_by_hand(LOGITS[q], LABELS[g]), rel=1e-12)
            assert dice[q, g].item() == pytest.approx(dice_by_hand(LOGITS[q], LABELS[g]), rel=1e-12)


def test_low_precision_logits_give_float32_losses():
    x = torch.tensor(LOGITS, dtype=torch.bfloat16)
    t = torch.tensor(LABELS)
    assert sigmoid_bce_mask_loss(x, t, 1.0).dtype == torch.float32
    assert mask_dice_cost(x, t).dtype == torch.float32


# -- importance sampling --------------------------------------------------------------------------


def confident_right_map(n: int = 2) -> torch.Tensor:
    """(n, 8, 8) logits: 0 (most uncertain) in columns 0-3, +-10 in columns 4-7."""
    logits = torch.full((n, 8, 8), 10.0)
    logits[:, ::2, 4:] = -10.0
    logits[:, :, :4] = 0.0
    return logits


def test_importance_points_fall_in_the_uncertain_region():
    num_points, over, frac = 200, 3.0, 0.75
    logits = confident_right_map()
    g = torch.Generator().manual_seed(3)
    coords = uncertain_points(logits, num_points, over, frac, generator=g)
    num_uncertain = int(frac * num_points)
    assert coords.shape == (2, num_points, 2)
    assert ((coords >= 0) & (coords < 1)).all()
    # Points left of the 4th column's centre (x < 3.5 / 8) read exactly 0; about 3 * 200 * 0.44 of
    # the oversampled points lie there, more than the 150 kept: all importance points are there.
    assert (coords[:, :num_uncertain, 0] < 3.5 / 8).all()
    # The rest is the complement: fresh uniform points, the generator's next draw after the
    # oversampling.
    g = torch.Generator().manual_seed(3)
    oversampled = torch.rand(2, int(num_points * over), 2, generator=g)
    fresh = torch.rand(2, num_points - num_uncertain, 2, generator=g)
    torch.testing.assert_close(coords[:, num_uncertain:], fresh, rtol=0, atol=0)
    # and the importance points are oversampled ones (the most uncertain of them)
    for n in range(2):
        kept = {tuple(p) for p in coords[n, :num_uncertain].tolist()}
        assert kept <= {tuple(p) for p in oversampled[n].tolist()}
    assert (coords[:, num_uncertain:, 0] > 0.6).any()  # the uniform share is not confined


def test_importance_counts_follow_the_ratios():
    # Uncertain in columns 0-5 (x < 5.5 / 8 reads 0): with oversample 2, about 2 * 0.69 * n of the
    # oversampled points are there, more than the largest share kept (n).
    logits = torch.full((1, 8, 8), -10.0)
    logits[:, :, :6] = 0.0
    for num_points, frac in ((100, 0.0), (100, 1.0), (37, 0.5), (10, 0.75)):
        coords = uncertain_points(
            logits, num_points, 2.0, frac, generator=torch.Generator().manual_seed(0)
        )
        assert coords.shape == (1, num_points, 2)
        k = int(frac * num_points)
        assert (coords[0, :k, 0] < 5.5 / 8).all()
        g = torch.Generator().manual_seed(0)
        torch.rand(1, 2 * num_points, 2, generator=g)
        torch.testing.assert_close(
            coords[:, k:], torch.rand(1, num_points - k, 2, generator=g), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertain_points(logits, 10, 0.5, 0.75)


def test_importance_points_respect_the_valid_region():
    # The valid region is the left half of the map; the map is uncertain in its first two columns,
    # i.e. in the valid region's left half (x < 0.5 there, minus the half-pixel blur).
    logits = torch.full((1, 8, 8), 10.0)
    logits[:, :, :2] = 0.0
    coords = uncertain_points(
        logits, 100, 3.0, 0.75, valid_ratio=(0.5, 1.0), generator=torch.Generator().manual_seed(1)
    )
    assert (coords[0, :75, 0] < 1.5 / 8 / 0.5).all()
    assert (coords[..., 0] < 1).all()  # drawn in the valid region only


def test_uncertain_points_reproducible_with_a_generator():
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0))
    a = uncertain_points(logits, 50, 3.0, 0.75, generator=torch.Generator().manual_seed(7))
    b = uncertain_points(logits, 50, 3.0, 0.75, generator=torch.Generator().manual_seed(7))
    c = uncertain_points(logits, 50, 3.0, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- the coordinate mapping -----------------------------------------------------------------------


def block_case():
    """An image of 48 x 80 pixels on a 64 x 96 canvas, stride 4: a map of 16 x 24 whose valid region
    is (80 / 96, 48 / 64). The GT fills rows 16-47, columns 16-63; the prediction is the same shape
    on the canvas: map rows 4-11, columns 4-15, logits +-20 (a sharp edge where the GT's is one
    pixel soft: the dice left is that pixel's)."""
    gt = torch.zeros(48, 80, dtype=torch.bool)
    gt[16:48, 16:64] = True
    pred = torch.full((16, 24), -20.0)
    pred[4:12, 4:16] = 20.0
    return pred, gt, torch.tensor([80 / 96, 48 / 64])


def test_same_shape_on_the_canvas_gives_near_zero_dice():
    # Uniform points (importance share 0): importance points would sit on the edge, where both
    # maps read 1/2 by construction.
    pred, gt, ratio = block_case()

    def dice(valid_ratio):
        g = torch.Generator().manual_seed(0)
        return matched_point_losses(
            pred[None],
            [1],
            [gt[None]],
            [torch.tensor([0])],
            valid_ratio[None],
            1.0,
            num_points=4000,
            importance_sample_ratio=0.0,
            generator=g,
        )["dice"].item()

    best = dice(ratio)
    assert best < 0.02
    for scale in (0.97, 1.03):  # a valid region 3 % off is worse
        assert dice(ratio * scale) > best + 0.01
    # The wrong mapping (the GT taken as covering the whole canvas) misses by far.
    assert dice(torch.ones(2)) > 0.15


def test_mask_losses_over_a_batch_and_matching_costs():
    pred, gt, ratio = block_case()
    other = torch.full((16, 24), -20.0)
    other[0, :] = 20.0
    preds = torch.stack([other, pred])[None].repeat(2, 1, 1, 1).requires_grad_()  # (B=2, Q=2, 4, 6)
    gts = [torch.stack([gt, ~gt]), gt[None]]
    ratios = ratio.expand(2, 2)
    indices = [
        (torch.tensor([1]), torch.tensor([0])),
        (torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)),
    ]
    losses = layer_mask_losses(
        preds,
        gts,
        indices,
        ratios,
        1.0,
        num_points=2000,
        importance_sample_ratio=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert losses["dice"].item() < 0.02 and losses["mask"].item() < 0.2
    (losses["mask"] + losses["dice"]).backward()
    assert (
        preds.grad is not None
        and preds.grad[0, 1].abs().sum() > 0
        and preds.grad[0, 0].abs().sum() == 0
    )
    empty = layer_mask_losses(preds, gts, [indices[1]] * 2, ratios, 1.0, num_points=10)
    assert empty["mask"].item() == 0 and empty["mask"].requires_grad
    bce, dice = mask_match_costs(
        preds[0].detach(),
        gts[0],
        ratio,
        num_points=2000,
        generator=torch.Generator().manual_seed(0),
    )
    assert bce.shape == dice.shape == (2, 2)
    assert dice[1, 0] < 0.02 and dice[1, 0] < dice[0, 0] and dice[1, 0] < dice[1, 1]
    assert bce[1, 0] < bce[0, 0]
    none = mask_match_costs(preds[0].detach(), gts[0][:0], ratio, num_points=10)
    assert none[0].shape == (2, 0)


def test_match_costs_from_given_point_logits():
    pred, gt, ratio = block_case()
    coords = torch.rand(1, 500, 2, generator=torch.Generator().manual_seed(2))
    points = point_sample(pred[None], map_points(coords, ratio))
    from_maps = mask_match_costs(pred[None], gt[None], ratio, coords=coords)
    from_points = mask_match_costs(None, gt[None], ratio, coords=coords, pred_points=points)
    for a, b in zip(from_maps, from_points):
        torch.testing.assert_close(a, b)


# -- pasting at inference ------------------------------------------------------------------------


def test_paste_puts_a_known_mask_at_the_original_size():
    # Original 24 x 36, resized to 16 x 24, padded to a 20 x 28 canvas: a 5 x 7 map at stride 4,
    # valid (24 / 28, 16 / 20). Map rows 1-2 are the transformed image's rows 4-11, i.e.
    # [0.25, 0.75) of it: the original's rows 6-17; map columns 2-4 its columns 8-19, [1/3, 5/6):
    # the original's columns 12-29. Bands across the whole map (a rectangle's corners are rounded by
    # the bilinear resampling of the logits).
    logits = torch.full((3, 5, 7), -10.0)
    logits[0, 1:3, :] = 10.0
    logits[1, :, 2:5] = 10.0
    masks = paste_masks(logits, torch.tensor([24 / 28, 16 / 20]), (24, 36), chunk=2)
    assert masks.shape == (3, 24, 36) and masks.dtype == torch.bool
    rows = torch.zeros(24, 36, dtype=torch.bool)
    rows[6:18] = True
    cols = torch.zeros(24, 36, dtype=torch.bool)
    cols[:, 12:30] = True
    assert torch.equal(masks[0], rows) and torch.equal(masks[1], cols)
    assert not masks[2].any()
    assert paste_masks(logits[:0], (1.0, 1.0), (5, 6)).shape == (0, 5, 6)
