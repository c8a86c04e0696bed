"""The mask losses of one decoder layer from its (B, Q, h, w) logits and the matcher's indices, as
the criterion computes them (`matched_point_losses` over the matched pairs' maps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msdetr.losses.masks import matched_point_losses


def layer_mask_losses(
    pred_masks: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
    indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    valid_ratios: torch.Tensor,
    num_masks: float | torch.Tensor,
    **sampling,
) -> dict[str, torch.Tensor]:
    """{"mask", "dice"} of a layer's matched pairs: `pred_masks` (B, Q, h, w) logits, `indices`
    per image (query indices, GT indices); `sampling`: matched_point_losses' keyword options."""
    pairs = torch.cat([pred_masks[b, src] for b, (src, _) in enumerate(indices)])
    counts = [len(src) for src, _ in indices]
    return matched_point_losses(
        pairs, counts, gt_masks, [tgt for _, tgt in indices], valid_ratios, num_masks, **sampling
    )
