"""Sine position encodings: of image feature maps and of reference boxes (two-stage queries)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _frequencies(num_feats: int, temperature: float, device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave(pos: torch.Tensor) -> torch.Tensor:
    # sin on even channels, cos on odd ones, interleaved along the last axis
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalized sine encoding of the valid (unpadded) region: (B, H, W) mask -> (B, 2F, H, W).

    Args:
        num_pos_feats: F, channels per axis; None: half the detector's width (the detector sets it).
        temperature: the frequencies' base (10000 in Deformable-DETR, 20 in DINO).
        scale: the normalised coordinate is multiplied by this.
        offset: subtracted from the 1-based pixel count before normalising: 0.5 (Deformable-DETR,
            pixel centres) or 0 (DINO's PositionEmbeddingSineHW).
    """

    def __init__(
        self,
        num_pos_feats: int | None = 128,
        temperature: float = 10000.0,
        scale: float = 2 * math.pi,
        offset: float = 0.5,
    ):
        super().__init__()
        if num_pos_feats is not None and num_pos_feats < 1 or temperature <= 0:
            raise ValueError(
                f"num_pos_feats={num_pos_feats} / temperature={temperature}: use num_pos_feats >= "
                "1 (or null) and temperature > 0."
            )
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        if self.num_pos_feats is None:
            raise RuntimeError(
                "num_pos_feats is unset: the detector sets it to half its width when it is built."
            )
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave(x_embed[..., None] / dim_t)
        pos_y = _interleave(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(
    boxes_unact: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """Sine encoding of sigmoid(boxes_unact) (B, Q, 4) -> (B, Q, 4 * num_pos_feats), order cx, cy,
    w, h."""
    dim_t = _frequencies(num_pos_feats, temperature, boxes_unact.device)
    pos = boxes_unact.sigmoid() * scale
    return _interleave(pos[..., None] / dim_t).flatten(2)


def reference_sine_embedding(
    reference: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> torch.Tensor:
    """DINO's sine encoding of reference boxes already in [0, 1]: (..., 4) -> (..., 4 *
        num_pos_feats),
    the coordinates in the order y, x, w, h (points (..., 2): y, x)."""
    if reference.shape[-1] not in (2, 4):
        raise ValueError(
            "reference_sine_embedding takes (..., 2) points or (..., 4) boxes, got "
            f"{reference.shape[-1]}."
        )
    dim_t = _frequencies(num_pos_feats, temperature, reference.device)
    order = [1, 0, 2, 3][: reference.shape[-1]]
    pos = reference[..., order] * scale
    return _interleave(pos[..., None] / dim_t).flatten(-2)
