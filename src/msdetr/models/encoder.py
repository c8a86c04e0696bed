"""The deformable encoder: flattens the feature levels (`Levels`) and refines them with deformable
self-attention. See docs/architecture.md for where it sits in the detector."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import Shapes, level_shapes
from .attention import MSDeformAttn


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def reset_transformer_parameters(module: nn.Module) -> None:
    """The official initialisation of a stack of layers: Xavier on every matrix, then each
        deformable
    attention's own scheme (what `DeformableTransformer._reset_parameters` does officially)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()


class FFN(nn.Module):
    """Linear -> ReLU -> Linear, residual, LayerNorm (post-norm), with the official attribute
    names."""

    def __init__(
        self, d_model: int, d_ffn: int, dropout: float, names=("linear1", "linear2", "norm")
    ):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Linear(d_model, d_ffn))
        setattr(self, names[1], nn.Linear(d_ffn, d_model))
        setattr(self, names[2], nn.LayerNorm(d_model))
        self.dropout_inner = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, norm = (getattr(self, n) for n in self._names)
        y = second(self.dropout_inner(F.relu(first(x))))
        return norm(x + self.dropout_out(y))


@dataclass
class Levels:
    """The feature levels flattened into one token sequence (what the encoder, the query selection
    and the decoder's cross-attention read).

    Attributes:
        src: (B, S, C) tokens of all levels, level after level (S = sum of H * W).
        mask: (B, S) True on padding.
        pos: (B, S, C) sine position plus level embedding.
        spatial_shapes: (L, 2) int64 (H, W) on the device, for the kernels.
        level_start_index: (L,) int64 on the device.
        valid_ratios: (B, L, 2) valid (w, h) fraction of each padded level.
        shapes: the same (H, W) as Python ints: what host-side code reads (never the device tensor).
    """

    src: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    shapes: Shapes


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2) valid (w, h) fraction of the padded map."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the FFN, each with add & LayerNorm.

    Args:
        d_model: token width.
        n_heads: attention heads (d_model must split evenly).
        n_levels: feature levels the attention samples.
        n_points: sampling points per head and level.
        d_ffn: hidden width of the FFN.
        dropout: dropout after the attention and inside / after the FFN.
        attn_backend: "auto", "triton", "gather" or "reference" (see `msdetr.kernels`).
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        n_heads: int = 8,
        n_levels: int = 4,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, ("linear1", "linear2", "norm2"))

    def forward(self, src, pos, reference_points, levels: Levels):
        src2 = self.self_attn(
            src + pos,
            reference_points,
            src,
            levels.spatial_shapes,
            levels.level_start_index,
            levels.mask,
            shapes=levels.shapes,
        )
        src = self.norm1(src + self.dropout1(src2))
        return self.ffn(src)


class DeformableEncoder(nn.Module):
    """`num_layers` copies of `layer` (each initialised afresh), and the level embedding.

    Args:
        layer: the layer to stack; its width and level count are the encoder's.
        num_layers: how many.
    """

    def __init__(self, *, layer: EncoderLayer, num_layers: int = 6):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the encoder needs num_layers >= 1, got {num_layers}.")
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        attn = layer.self_attn
        self.d_model, self.num_levels = attn.d_model, attn.n_levels
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, self.d_model))
        reset_transformer_parameters(self.layers)
        nn.init.normal_(self.level_embed)

    def flatten(
        self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor]
    ) -> Levels:
        """Per-level maps (B, C, H, W), masks (B, H, W) and position embeddings -> `Levels`."""
        # ints (symbolic under torch.compile)
        shapes = tuple((s.shape[-2], s.shape[-1]) for s in srcs)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        # One host-to-device copy for both tensors; non_blocking: the host never waits for the
        # device.
        geometry = torch.tensor([v for hw in shapes for v in hw] + starts, dtype=torch.long)
        geometry = geometry.to(srcs[0].device, non_blocking=True)
        return Levels(
            src=torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            mask=torch.cat([m.flatten(1) for m in masks], 1),
            pos=torch.cat(
                [
                    p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                    for lvl, p in enumerate(pos)
                ],
                1,
            ),
            spatial_shapes=geometry[: 2 * len(shapes)].view(len(shapes), 2),
            level_start_index=geometry[2 * len(shapes) :],
            valid_ratios=torch.stack([valid_ratio(m) for m in masks], 1),
            shapes=shapes,
        )

    @staticmethod
    def reference_points(
        spatial_shapes: torch.Tensor | Shapes, valid_ratios: torch.Tensor
    ) -> torch.Tensor:
        """Pixel centres of every level in the valid-region frame, then scaled into each level's
        frame.

        `spatial_shapes`: the levels' (H, W), best as Python ints (see `level_shapes`)."""
        refs = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ys = torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            xs = torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, levels: Levels) -> torch.Tensor:
        """-> memory (B, S, C): the encoded tokens."""
        reference_points = self.reference_points(levels.shapes, levels.valid_ratios)
        src = levels.src
        for layer in self.layers:
            src = layer(src, levels.pos, reference_points, levels)
        return src
