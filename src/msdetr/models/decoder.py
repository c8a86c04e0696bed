"""The deformable decoder, with MS-DETR's one-to-many tap in each layer (Figure 4 of the paper).
See docs/architecture.md for where it sits in the detector."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..box_ops import inverse_sigmoid
from .attention import MSDeformAttn
from .encoder import FFN, Levels, clones, reset_transformer_parameters
from .position_encoding import reference_sine_embedding

O2M_TAPS = (None, "self_attn", "cross_attn", "output")


class MLP(nn.Module):
    """Linear layers with ReLU between them (the official prediction and position heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def linears(self) -> list[nn.Linear]:
        """The layers, typed (iterating the ModuleList gives plain modules)."""
        return [layer for layer in self.layers if isinstance(layer, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention and FFN, each with add & LayerNorm.

    Args:
        d_model, n_heads, n_levels, n_points, d_ffn, dropout, attn_backend: as `EncoderLayer`.
        cross_attn_first: run the cross-attention before the self-attention (MS-DETR Figure 4 b/c).
        o2m_tap: where a one-to-many stream leaves the layer: after "self_attn", after "cross_attn",
            or the "output"; None: no such stream. It is only computed in training.
        aux_ffn: pass the one-to-many stream through an FFN of its own first (MS-DETR as released).
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
        cross_attn_first: bool = False,
        o2m_tap: str | None = None,
        aux_ffn: bool = False,
    ):
        super().__init__()
        if o2m_tap not in O2M_TAPS:
            raise ValueError(f"unknown o2m_tap {o2m_tap!r}; choose one of {O2M_TAPS}.")
        if aux_ffn and o2m_tap is None:
            raise ValueError("aux_ffn transforms the one-to-many stream; set o2m_tap as well.")
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, ("linear1", "linear2", "norm3"))
        self.cross_attn_first = cross_attn_first
        self.o2m_tap = o2m_tap
        if aux_ffn:
            self.aux_ffn = FFN(d_model, d_ffn, dropout, ("linear3", "linear4", "norm4"))

    def self_attention(self, tgt, query_pos, attn_mask=None):
        q = k = tgt + query_pos
        tgt2 = self.self_attn(
            q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), attn_mask=attn_mask
        )[0]
        return self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))

    def cross_attention(self, tgt, query_pos, reference_points, memory, levels: Levels):
        tgt2 = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            levels.spatial_shapes,
            levels.level_start_index,
            levels.mask,
            shapes=levels.shapes,
        )
        return self.norm1(tgt + self.dropout1(tgt2))

    def forward(
        self, tgt, query_pos, reference_points, memory, levels: Levels, self_attn_mask=None
    ):
        """-> (one-to-one features, one-to-many features or None)."""

        def cross(x):
            return self.cross_attention(x, query_pos, reference_points, memory, levels)

        def self_(x):
            return self.self_attention(x, query_pos, self_attn_mask)

        steps = (
            (("cross_attn", cross), ("self_attn", self_))
            if self.cross_attn_first
            else (("self_attn", self_), ("cross_attn", cross))
        )
        tap = self.o2m_tap if self.training else None
        o2m = None
        for name, step in steps:
            tgt = step(tgt)
            if name == tap:
                o2m = tgt
        tgt = self.ffn(tgt)
        if tap == "output":
            o2m = tgt
        if o2m is not None and hasattr(self, "aux_ffn"):
            o2m = self.aux_ffn(o2m)
        return tgt, o2m


class DecoderOutput(NamedTuple):
    """Per decoder layer: the hidden states (B, T, C), the one-to-many hidden states (None where
    not computed), the reference each layer's box head is added to (detached input reference, or
    with look-forward-twice the non-detached one) and the refined boxes (empty without refinement,
    and with the decoder's output `norm`: the heads then predict from the normed states on
    `box_refs`, while the references were refined from the states before the norm, as in DINO)."""

    hidden: list[torch.Tensor]
    hidden_o2m: list[torch.Tensor | None]
    box_refs: list[torch.Tensor]
    boxes: list[torch.Tensor]


class DeformableDecoder(nn.Module):
    """`num_layers` copies of `layer` (each initialised afresh). With box heads given to `forward`
    (box refinement) each layer refines the reference boxes.

    Args:
        layer: the layer to stack; its width, level count and one-to-many tap are the decoder's.
        num_layers: how many.
        look_forward_twice: a layer's refined box also takes gradient through the previous
            layer's box (H-DETR / DINO); needs box refinement.
        box_query_pos: every layer computes its queries' positions from its current reference
            boxes (DINO): a sine embedding of the box (times the first level's valid ratios) through
            an MLP(2C, C, C) (`ref_point_head`); the query selection then gives no positions.
        query_scale: with box_query_pos, the positions of every layer after the first are scaled
            element-wise by an MLP(C, C, C) of the layer's input states (`query_scale`; DAB-DETR,
            DN-Deformable-DETR; DINO drops it).
        norm: a LayerNorm (`norm`) on every layer's output states before the heads read them; the
            next layer and the box refinement take the states before it (DINO).
        logit_eps: the clamp of the inverse sigmoid that takes reference boxes back to logits when
            the box heads refine them (1e-5 in Deformable-DETR, 1e-3 in DINO).
    """

    def __init__(
        self,
        *,
        layer: DecoderLayer,
        num_layers: int = 6,
        look_forward_twice: bool = False,
        box_query_pos: bool = False,
        query_scale: bool = False,
        norm: bool = False,
        logit_eps: float = 1e-5,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs num_layers >= 1, got {num_layers}.")
        if not 0 < logit_eps < 0.5:
            raise ValueError(f"the decoder's logit_eps must be in (0, 0.5), got {logit_eps}.")
        if query_scale and not box_query_pos:
            raise ValueError(
                "query_scale scales the positions the decoder computes from the boxes; set "
                "box_query_pos=true as well."
            )
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.d_model = layer.cross_attn.d_model
        self.num_levels = layer.cross_attn.n_levels
        self.o2m_tap = layer.o2m_tap
        reset_transformer_parameters(self.layers)
        self.box_query_pos = box_query_pos
        self.logit_eps = logit_eps
        if box_query_pos:
            self.ref_point_head = MLP(2 * self.d_model, self.d_model, self.d_model, 2)
            # Xavier, as DINO initialises its transformer
            for linear in self.ref_point_head.linears():
                nn.init.xavier_uniform_(linear.weight)
        if query_scale:
            self.query_scale = MLP(self.d_model, self.d_model, self.d_model, 2)
            # Xavier, as DN-DETR initialises its transformer
            for linear in self.query_scale.linears():
                nn.init.xavier_uniform_(linear.weight)
        if norm:
            self.norm = nn.LayerNorm(self.d_model)

    def query_positions(self, ref_input: torch.Tensor) -> torch.Tensor:
        """DINO's (and DAB's, before `query_scale`) positions of the queries from their references
        scaled into level 0's frame (B, T, 4)."""
        if ref_input.shape[-1] != 4:
            raise ValueError(
                "box_query_pos embeds reference boxes; the query selection must give (B, T, 4) "
                "references (a two-stage selection or AnchorQueries)."
            )
        return self.ref_point_head(reference_sine_embedding(ref_input, self.d_model // 2))

    def forward(
        self,
        tgt,
        reference_points,
        memory,
        levels: Levels,
        query_pos,
        bbox_embed: nn.ModuleList | None = None,
        self_attn_mask=None,
    ) -> DecoderOutput:
        out = DecoderOutput([], [], [], [])
        valid_ratios = levels.valid_ratios
        ref_for_head = reference_points  # what layer l's box head is added to
        norm = getattr(self, "norm", None)
        query_scale = getattr(self, "query_scale", None)
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = (
                    reference_points[:, :, None]
                    * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                )
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            if self.box_query_pos:
                query_pos = self.query_positions(ref_input[:, :, 0])
                if query_scale is not None and lid > 0:  # DAB: scaled by the layer's input states
                    query_pos = query_scale(tgt) * query_pos
            tgt, tgt_o2m = layer(tgt, query_pos, ref_input, memory, levels, self_attn_mask)
            out.hidden.append(tgt if norm is None else norm(tgt))
            out.hidden_o2m.append(tgt_o2m if norm is None or tgt_o2m is None else norm(tgt_o2m))
            out.box_refs.append(ref_for_head)
            if bbox_embed is None:
                continue
            delta = bbox_embed[lid](tgt)
            if reference_points.shape[-1] == 4:
                new_ref = (delta + inverse_sigmoid(reference_points, self.logit_eps)).sigmoid()
            else:
                new_ref = torch.cat(
                    [
                        delta[..., :2] + inverse_sigmoid(reference_points, self.logit_eps),
                        delta[..., 2:],
                    ],
                    -1,
                )
                new_ref = new_ref.sigmoid()
            # With the output norm the heads predict from the normed states instead (see
            # DecoderOutput).
            if norm is None and self.look_forward_twice and lid > 0:
                # Same value as new_ref, but the gradient also reaches the previous layer's box.
                out.boxes.append((delta + inverse_sigmoid(ref_for_head, self.logit_eps)).sigmoid())
            elif norm is None:
                out.boxes.append(new_ref)
            reference_points = new_ref.detach()
            ref_for_head = new_ref if self.look_forward_twice else reference_points
        return out
