"""Mask losses and matching costs over point samples (PointRend / Mask2Former / Mask DINO).

Coordinates. A point is (x, y) in [0, 1] of the image's valid (unpadded) region, as boxes are
normalized in this project. GT masks (G, h, w) come at the image's transformed, unpadded size, so
they cover exactly that region: a point samples them at (x, y) directly. Predicted mask logits
(Q, h4, w4) live on the padded batch canvas (see `msdetr.models.masks`): the valid region is the
top-left `valid_ratio` = (w, h) fraction of the map, so the same point samples them at
(x * valid_ratio[0], y * valid_ratio[1]). Sampling is bilinear, `grid_sample` with
align_corners=False (pixel i of an n-pixel map covers [i/n, (i+1)/n)).

Losses (Mask DINO's defaults: 12544 = 112 * 112 points, oversample 3.0, importance 0.75, mask and
dice weights 5.0 each, matching costs 5.0 each):
- the loss's points per matched (prediction, GT) pair: `uncertain_points` on the prediction;
- the Hungarian cost's points per image: `uniform_points`, one set shared by all predictions and
  GTs of the image (`mask_match_costs`).
The losses are sums over masks divided by `num_masks`: pass the box losses' `num_boxes` (the same
normalizer, all-reduced over the world and clamped at 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Mask DINO's (and Mask2Former's) point sampling defaults.
NUM_POINTS = 112 * 112
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75

Ratio = torch.Tensor | Sequence[float]


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of maps at points.

    Args:
        inputs: (N, C, H, W) or (N, H, W) maps.
        coords: (N, P, 2) points (x, y) in [0, 1] of each map (0: its left / top edge, 1: its
            right / bottom edge; `grid_sample`, align_corners=False, zero outside).
    Returns: (N, C, P), or (N, P) for (N, H, W) maps.
    """
    squeeze = inputs.dim() == 3
    if squeeze:
        inputs = inputs.unsqueeze(1)
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # (N, P, 1, 2)
    out = F.grid_sample(inputs, grid, mode="bilinear", align_corners=False)[..., 0]
    return out[:, 0] if squeeze else out


def _ratio(valid_ratio: Ratio | None, like: torch.Tensor) -> torch.Tensor:
    """valid (w, h) fraction as an (N or 1, 1, 2) tensor on `like`'s device."""
    if valid_ratio is None:
        return torch.ones(1, 1, 2, dtype=like.dtype, device=like.device)
    ratio = torch.as_tensor(valid_ratio, dtype=like.dtype).to(like.device, non_blocking=True)
    return ratio.reshape(-1, 1, 2)


def map_points(coords: torch.Tensor, valid_ratio: Ratio | None) -> torch.Tensor:
    """(N, P, 2) points normalized to the valid region -> the same points normalized to the padded
    map, whose valid region is the top-left `valid_ratio` (w, h) fraction ((2,), (N, 2) or None)."""
    return coords * _ratio(valid_ratio, coords)


def uniform_points(
    n: int,
    num_points: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n, num_points, 2) points uniform in [0, 1)^2 (the valid region)."""
    return torch.rand(n, num_points, 2, device=device, dtype=dtype, generator=generator)


@torch.no_grad()
def uncertain_points(
    logits: torch.Tensor,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    *,
    valid_ratio: Ratio | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PointRend's importance sampling toward uncertain points (Mask2Former's rule).

    Draws `int(num_points * oversample_ratio)` uniform points per mask, takes the logits there
    (bilinear), and keeps the `int(importance_sample_ratio * num_points)` most uncertain ones
    (uncertainty -|logit|: the logit nearest 0), then adds the rest as fresh uniform points.

    Args:
        logits: (N, h, w) mask logits (or (N, 1, h, w)), on the padded map.
        valid_ratio: the valid region's (w, h) fraction of the map, (2,) or (N, 2); None: all of it.
            Points are drawn in the valid region only.
        generator: draws the uniform points (on the logits' device) for reproducible samples.
    Returns: (N, num_points, 2) points (x, y) normalized to the valid region: the importance points
    first, then the uniform ones. No gradient.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            "mask point sampling needs oversample_ratio >= 1 and importance_sample_ratio in "
            f"[0, 1], got {oversample_ratio} and {importance_sample_ratio}; fix the mask loss "
            "config."
        )
    if logits.dim() == 4:
        logits = logits[:, 0]
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    coords = uniform_points(n, num_sampled, device=logits.device, dtype=dtype, generator=generator)
    values = point_sample(logits.to(dtype), map_points(coords, valid_ratio))  # (N, num_sampled)
    uncertainty = -values.abs()
    idx = torch.topk(uncertainty, num_uncertain, dim=1).indices
    chosen = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    extra = uniform_points(n, num_random, device=logits.device, dtype=dtype, generator=generator)
    return torch.cat([chosen, extra], 1)


def sigmoid_bce_mask_loss(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float | torch.Tensor
) -> torch.Tensor:
    """Sigmoid binary cross-entropy, mean over each mask's P points, summed over masks / num_masks.

    (M, P) logits and (M, P) targets in [0, 1] -> scalar (float32 or wider)."""
    x = point_logits.float() if point_logits.dtype != torch.float64 else point_logits
    bce = F.binary_cross_entropy_with_logits(x, point_labels.to(x.dtype), reduction="none")
    return bce.mean(1).sum() / num_masks


def dice_mask_loss(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float | torch.Tensor
) -> torch.Tensor:
    """Dice loss 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask (p = sigmoid of the logit),
    summed over masks / num_masks. (M, P) logits and (M, P) targets -> scalar."""
    x = point_logits.float() if point_logits.dtype != torch.float64 else point_logits
    p, t = x.sigmoid(), point_labels.to(x.dtype)
    loss = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return loss.sum() / num_masks


def mask_bce_cost(pred_points: torch.Tensor, gt_points: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid BCE (mean over points): (Q, P) logits, (G, P) targets -> (Q, G); entry
    (q, g) equals `sigmoid_bce_mask_loss(pred[q:q+1], gt[g:g+1], 1)`."""
    x = pred_points.float() if pred_points.dtype != torch.float64 else pred_points
    t = gt_points.to(x.dtype)
    pos = F.softplus(-x)  # BCE against 1
    neg = F.softplus(x)  # BCE against 0
    return (pos @ t.T + neg @ (1 - t).T) / x.shape[1]


def mask_dice_cost(pred_points: torch.Tensor, gt_points: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss: (Q, P) logits, (G, P) targets -> (Q, G); entry (q, g) equals
    `dice_mask_loss(pred[q:q+1], gt[g:g+1], 1)`."""
    x = pred_points.float() if pred_points.dtype != torch.float64 else pred_points
    p, t = x.sigmoid(), gt_points.to(x.dtype)
    return 1 - (2 * p @ t.T + 1) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1)


@torch.no_grad()
def mask_match_costs(
    pred_masks: torch.Tensor | None,
    gt_masks: torch.Tensor,
    valid_ratio: Ratio | None,
    *,
    num_points: int = NUM_POINTS,
    generator: torch.Generator | None = None,
    pred_points: torch.Tensor | None = None,
    coords: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (Q, G) mask BCE and dice costs on one set of uniform points shared by all its
    predictions and GTs (Mask DINO's matcher).

    Args:
        pred_masks: (Q, h4, w4) mask logits on the padded map; or None with `pred_points`.
        gt_masks: (G, h, w) GT masks at the unpadded size.
        valid_ratio: the image's valid (w, h) fraction of the map, (2,).
        pred_points: (Q, P) logits already taken at `coords` (e.g. `MaskHead.point_logits` at
            `map_points(coords, valid_ratio)`, which makes no (Q, h4, w4) maps).
        coords: (1, P, 2) the points, normalized to the valid region; None: drawn here
            (`uniform_points(1, num_points)`).
    Returns: (Q, G) BCE cost and (Q, G) dice cost; weigh them (Mask DINO: 5.0 each) and add them
    to the box and class costs.
    """
    ref = pred_masks if pred_masks is not None else pred_points
    if ref is None:
        raise ValueError("mask_match_costs needs pred_masks or pred_points.")
    if coords is None:
        coords = uniform_points(1, num_points, device=ref.device, generator=generator)
    coords = coords.float()
    if gt_masks.shape[0] == 0:  # nothing to match: (Q, 0) costs
        empty = ref.new_zeros(ref.shape[0], 0, dtype=torch.float32)
        return empty, empty
    if pred_points is None:
        assert pred_masks is not None
        q = pred_masks.shape[0]
        pred_points = point_sample(
            pred_masks.float(), map_points(coords, valid_ratio).expand(q, -1, -1)
        )
    g = gt_masks.shape[0]
    gt_index = torch.arange(g, device=gt_masks.device)
    gt_points = sample_gt_masks(gt_masks, gt_index, coords.expand(g, -1, -1))
    return mask_bce_cost(pred_points, gt_points), mask_dice_cost(pred_points, gt_points)


def sample_gt_masks(
    masks: torch.Tensor, index: torch.Tensor, coords: torch.Tensor, chunk: int = 16
) -> torch.Tensor:
    """Bilinear samples of binary GT masks at points: `point_sample(masks[index].float(), coords)`
    (grid_sample, align_corners=False, zero outside), `chunk` rows at a time, so that the float
    copies of full-resolution masks stay bounded (16 COCO-sized masks: ~60 MB) however many rows
    share a GT (a one-to-many branch samples each GT for several queries).

    Args:
        masks: (G, h, w) bool (or {0, 1}) GT masks at the image's unpadded size.
        index: (M,) which mask each row samples.
        coords: (M, P, 2) points (x, y) in [0, 1] of the mask.
    Returns: (M, P) float32 values in [0, 1].
    """
    m, p, _ = coords.shape
    if m == 0 or masks.shape[0] == 0:
        return coords.new_zeros(m, p, dtype=torch.float32)
    parts = [
        point_sample(masks[index[i : i + chunk]].float(), coords[i : i + chunk].float())
        for i in range(0, m, chunk)
    ]
    return torch.cat(parts)


def matched_point_losses(
    pair_logits: torch.Tensor,
    pair_image: list[int],
    gt_masks: Sequence[torch.Tensor],
    gt_index: Sequence[torch.Tensor],
    valid_ratios: torch.Tensor,
    num_masks: float | torch.Tensor,
    *,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """{"mask": BCE, "dice": dice} of matched pairs whose logit maps are already made.

    Args:
        pair_logits: (M, h4, w4) the matched predictions' mask logits on the padded map, image
            after image (`msdetr.models.masks.image_pair_logits`).
        pair_image: per image, how many of the M rows are its (host ints: the index shapes).
        gt_masks: per image (G_b, h_b, w_b) GT masks; gt_index: per image (n_b,) the GT of each of
            its rows.
        valid_ratios: (B, 2) valid (w, h) fraction of the map per image.
    The points are drawn once for all M pairs (`uncertain_points`, each pair in its image's valid
    region); the GTs are read at them per image (`sample_gt_masks`)."""
    if pair_logits.shape[0] == 0:
        zero = pair_logits.sum() * 0.0
        return {"mask": zero, "dice": zero}
    ratios = torch.cat(
        [valid_ratios[b].expand(n, 2) for b, n in enumerate(pair_image) if n], 0
    )  # (M, 2)
    coords = uncertain_points(
        pair_logits,
        num_points,
        oversample_ratio,
        importance_sample_ratio,
        valid_ratio=ratios,
        generator=generator,
    )
    pred = point_sample(pair_logits, map_points(coords, ratios).to(pair_logits.dtype))
    gts, start = [], 0
    for b, n in enumerate(pair_image):
        if n:
            gts.append(sample_gt_masks(gt_masks[b], gt_index[b], coords[start : start + n]))
        start += n
    gt = torch.cat(gts)
    return {
        "mask": sigmoid_bce_mask_loss(pred, gt, num_masks),
        "dice": dice_mask_loss(pred, gt, num_masks),
    }
