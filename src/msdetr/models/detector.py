"""The Deformable-DETR detector: backbone, input projections, transformer and prediction heads."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..box_ops import inverse_sigmoid
from ..kernels import BACKENDS
from .attention import MSDeformAttn
from .backbone import Backbone, resize_mask
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableTransformer


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DeformableDETR(nn.Module):
    """Deformable-DETR with the options MS-DETR and DETA build on.

    forward(images, padding_mask) returns the named output streams of DESIGN.md: `pred_logits`,
    `pred_boxes`, `aux_outputs`, and in two-stage `enc_outputs` (with `anchors`) and `init_reference`.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 91,
        num_queries: int = 300,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        with_box_refine: bool = False,
        mixed_selection: bool = False,
        look_forward_twice: bool = False,
        cross_attn_first: bool = False,
        o2m_tap: str | None = None,
        aux_ffn: bool = False,
        o2m_separate_class_heads: bool = False,
        pix_trans: bool = False,
        proposal_selection: str = "topk",
        hybrid_queries: int = 0,
        query_groups: int = 1,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if hybrid_queries < 0 or query_groups < 1:
            raise ValueError(f"hybrid_queries={hybrid_queries} / query_groups={query_groups}: use hybrid_queries >= 0 "
                             "and query_groups >= 1.")
        if hybrid_queries and query_groups > 1:
            raise ValueError("hybrid_queries (H-DETR) and query_groups (Group DETR) both add training-only queries; "
                             "set only one of them.")
        if query_groups > 1 and two_stage and not mixed_selection:
            raise ValueError("query_groups on a two-stage model needs mixed_selection=true: the groups share the "
                             "selected proposals, so without learned content they would be identical copies.")
        if o2m_separate_class_heads and o2m_tap is None:
            raise ValueError("o2m_separate_class_heads needs a one-to-many stream; set o2m_tap as well.")
        if mixed_selection and not two_stage:
            raise ValueError("mixed_selection needs two_stage=true (it mixes learned content with two-stage positions).")
        if look_forward_twice and not with_box_refine:
            raise ValueError("look_forward_twice needs with_box_refine=true (it changes how refined boxes get gradients).")
        if num_feature_levels < len(backbone.num_channels):
            raise ValueError(
                f"num_feature_levels={num_feature_levels} is fewer than the backbone's {len(backbone.num_channels)} "
                "outputs; use num_feature_levels >= 3 (or 1 with a single-level backbone)."
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        # Training-only query blocks that see nothing of each other in self-attention: the one-to-one
        # queries first, then H-DETR's one-to-many queries or Group DETR's extra groups.
        self.query_blocks = [num_queries, hybrid_queries] if hybrid_queries else [num_queries] * query_groups
        self.query_groups = query_groups
        total_queries = sum(self.query_blocks)
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.with_box_refine = with_box_refine
        self.backbone = backbone
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer = DeformableTransformer(
            hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, num_feature_levels,
            enc_n_points, dec_n_points, two_stage, num_queries, mixed_selection, look_forward_twice,
            with_box_refine, cross_attn_first, o2m_tap, aux_ffn, pix_trans, proposal_selection, attn_backend,
        )
        if not two_stage:
            self.query_embed = nn.Embedding(total_queries, hidden_dim * 2)
        elif mixed_selection:
            self.query_embed = nn.Embedding(total_queries, hidden_dim)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, num_feature_levels)

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = dec_layers + 1 if two_stage else dec_layers
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            # Without refinement the official model shares one head across layers.
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])
        if o2m_separate_class_heads:
            # MS-DETR Figure 4 (a): one-to-many class heads of their own, box heads shared.
            self.class_embed_o2m = copy.deepcopy(self.class_embed[:dec_layers])

    def set_attn_backend(self, backend: str) -> None:
        """Switch every deformable attention between "auto", "triton" and "reference"."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}.")
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

    @staticmethod
    def _input_projections(channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
        projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_levels - len(channels)):
            projs.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                                       nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        return nn.ModuleList(projs)

    def multiscale_features(self, images: torch.Tensor, padding_mask: torch.Tensor):
        feats = self.backbone(images, padding_mask)
        srcs, masks = [], []
        for lvl, (feat, mask) in enumerate(feats):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(mask)
        for lvl in range(len(feats), self.num_feature_levels):
            # The first extra level convolves the raw last backbone map, later ones the previous level.
            src = self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            masks.append(resize_mask(padding_mask, src.shape[-2:]))
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def head_outputs(self, hidden, box_refs, boxes=None, class_heads=None):
        """Class logits and boxes of every decoder layer (boxes given: the decoder's refined ones)."""
        class_heads = self.class_embed if class_heads is None else class_heads
        logits, coords = [], []
        for lvl, h in enumerate(hidden):
            logits.append(class_heads[lvl](h))
            if boxes:
                coords.append(boxes[lvl])
                continue
            delta = self.bbox_embed[lvl](h)
            ref = inverse_sigmoid(box_refs[lvl])
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            coords.append(delta.sigmoid())
        return logits, coords

    @staticmethod
    def _stream(logits: list[torch.Tensor], coords: list[torch.Tensor]) -> dict:
        return {
            "pred_logits": logits[-1],
            "pred_boxes": coords[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], coords[:-1])],
        }

    @property
    def output_streams(self) -> dict[str, set[str]]:
        """The streams a training forward returns, each with the box keys an assigner may match against."""
        boxes = {"pred_boxes", "init_reference"} if self.two_stage else {"pred_boxes"}
        streams = {"main": boxes}
        if self.transformer.decoder.layers[0].o2m_tap is not None:
            streams["o2m_outputs"] = boxes
        if len(self.query_blocks) > 1:
            streams["hybrid_outputs"] = boxes
        if self.two_stage:
            streams["enc_outputs"] = {"pred_boxes", "anchors"}
        return streams

    def self_attn_mask(self, device) -> torch.Tensor:
        """(T, T) bool, True where a query may not attend: across the training query blocks."""
        # Built on the device from Python ints: no host-to-device copy, no size read back.
        block = torch.cat([torch.full((n,), i, dtype=torch.long, device=device)
                           for i, n in enumerate(self.query_blocks)])
        return block[:, None] != block[None, :]

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        srcs, masks, pos = self.multiscale_features(images, padding_mask)
        extra = self.training and len(self.query_blocks) > 1
        total = sum(self.query_blocks) if extra else self.num_queries
        query_embed = self.query_embed.weight[:total] if hasattr(self, "query_embed") else None
        # H-DETR ranks proposals for all its queries; Group DETR's groups share the one-to-one proposals.
        groups = self.query_groups if extra else 1
        t = self.transformer(srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed,
                             self.self_attn_mask(images.device) if extra else None,
                             num_proposals=total // groups, proposal_groups=groups)
        q = self.num_queries
        logits, coords = self.head_outputs(t["hidden"], t["box_refs"], t["boxes"])
        out = self._stream([x[:, :q] for x in logits], [x[:, :q] for x in coords])
        out["init_reference"] = t["init_reference"][:, :q]
        if extra:
            out["hybrid_outputs"] = self._stream([x[:, q:] for x in logits], [x[:, q:] for x in coords])
            out["hybrid_outputs"]["init_reference"] = t["init_reference"][:, q:]
        if t["hidden_o2m"] and t["hidden_o2m"][0] is not None:
            # One-to-many predictions of the one-to-one queries, on the same references as their layer.
            heads = getattr(self, "class_embed_o2m", None)
            out["o2m_outputs"] = self._stream(*self.head_outputs(
                [h[:, :q] for h in t["hidden_o2m"]], [r[:, :q] for r in t["box_refs"]], class_heads=heads))
            out["o2m_outputs"]["init_reference"] = out["init_reference"]
        if self.two_stage:
            out["enc_outputs"] = {
                "pred_logits": t["enc_class"],
                "pred_boxes": t["enc_coord_unact"].sigmoid(),
                "anchors": t["proposals"].sigmoid(),
            }
        return out
