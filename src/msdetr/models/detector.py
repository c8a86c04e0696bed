"""The Deformable-DETR detector, composed of its parts (docs/architecture.md has the data flow).

    images -> backbone -> input projections (+ extra levels) -> encoder (`Levels` -> memory)
           -> query selection (+ training-only query blocks) -> decoder -> prediction heads
           -> `DetectorOutput`: one stream per kind of supervision

With a mask head (`mask_head`, instance segmentation after Mask DINO) the backbone also gives its
stride-4 map (or its stride-8 level is used), the head makes one pixel embedding per forward from
it and the encoder's finest level, and every decoder layer of every stream gets its queries' mask
embeddings (`mask_embed`, see `msdetr.models.outputs.MaskKeys`); mask logits are made only where
used (the loss's matched pairs, the matching cost's points, the post-process's kept detections).

Each part is built by Hydra from `conf/model/*.yaml` (the matcher configs add what their supervision
needs, e.g. the decoder's one-to-many tap or a training-only query block) and passed in here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from ..box_ops import inverse_sigmoid
from ..kernels import BACKENDS
from .attention import MSDeformAttn
from .backbone import FeatureBackbone, resize_mask
from .decoder import MLP, DeformableDecoder
from .encoder import DeformableEncoder
from .masks import MaskHead, mask_valid_ratio
from .outputs import OPTIONAL_STREAMS, DetectorOutput, LayerStream
from .position_encoding import PositionEmbeddingSine
from .queries import Queries, QuerySelection
from .training_queries import TrainingQueries, block_ids


class DeformableDETR(nn.Module):
    """Deformable-DETR with the options MS-DETR, DETA, H-DETR and Group DETR build on.

    Args:
        backbone: a module mapping (images, padding mask) to a list of (feature map, mask), with
            `num_channels` per map (`Backbone`, `SwinBackbone`).
        encoder: the deformable encoder; its width and level count are the model's.
        decoder: the deformable decoder (its layer's `o2m_tap` makes the `o2m_outputs` stream).
        queries: where the queries come from (`LearnedQueries`, `TwoStageQueries`, ...).
        num_classes: class logits per query (sigmoid focal: no background class).
        box_refine: every decoder layer refines the boxes with its own heads (iterative refinement);
            without it one class and one box head are shared by all layers, as officially.
        o2m_class_heads: the one-to-many stream gets class heads of its own, box heads shared
            (MS-DETR Figure 4 a).
        share_heads: with box_refine, one class head and one box head serve every decoder layer
            (DINO's dec_pred_class_embed_share / dec_pred_bbox_embed_share); the query selection
            then brings the encoder's heads itself (DINO's separate enc_out_* heads).
        position_embedding: the feature maps' sine position encoding (`PositionEmbeddingSine`;
            None: Deformable-DETR's, temperature 10000, pixel centres).
        training_queries: training-only query blocks by name (`HybridQueries`, `QueryGroups`, ...),
            each supervised through its own stream; none of them exist at inference.
        mask_head: instance segmentation (`MaskHead`): every decoder stream's layers then carry
            mask embeddings, and the outputs the shared pixel embedding (`MaskKeys`). Its lateral
            map is the backbone's stride-4 map (`lateral_stride=4`, a backbone with
            `stride4_channels`) or its first, stride-8 level (`lateral_stride=8`).

    `forward(images, padding_mask)` returns a `DetectorOutput`; `output_streams` lists the streams
    a training forward returns.
    """

    def __init__(
        self,
        *,
        backbone: FeatureBackbone,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        queries: QuerySelection,
        num_classes: int = 91,
        box_refine: bool = False,
        o2m_class_heads: bool = False,
        training_queries: Mapping[str, TrainingQueries | None] | None = None,
        share_heads: bool = False,
        position_embedding: PositionEmbeddingSine | None = None,
        mask_head: MaskHead | None = None,
    ):
        super().__init__()
        hidden_dim, num_levels = encoder.d_model, encoder.num_levels
        if (decoder.d_model, queries.d_model) != (
            hidden_dim,
            hidden_dim,
        ) or decoder.num_levels != num_levels:
            raise ValueError(
                f"the parts disagree: encoder d_model={hidden_dim} / levels={num_levels}, decoder "
                f"d_model={decoder.d_model} / levels={decoder.num_levels}, queries "
                f"d_model={queries.d_model}; set them from the one model.hidden_dim and "
                "model.num_feature_levels."
            )
        if num_levels < len(backbone.num_channels):
            raise ValueError(
                f"model.num_feature_levels={num_levels} is fewer than the backbone's "
                f"{len(backbone.num_channels)} outputs; use num_feature_levels >= 3 (or 1 with a "
                "single-level backbone)."
            )
        if decoder.look_forward_twice and not box_refine:
            raise ValueError(
                "look_forward_twice needs box_refine=true (it changes how refined boxes get "
                "gradients)."
            )
        if o2m_class_heads and decoder.o2m_tap is None:
            raise ValueError(
                "o2m_class_heads needs a one-to-many stream; set the decoder layer's o2m_tap as "
                "well."
            )
        if share_heads and (not box_refine or queries.uses_encoder_heads):
            raise ValueError(
                "share_heads shares the refining heads across decoder layers: it needs "
                "box_refine=true and a query selection with encoder heads of its own (DINOQueries)."
            )
        if decoder.box_query_pos == queries.gives_positions:
            raise ValueError(
                f"{type(queries).__name__} {'gives' if queries.gives_positions else 'leaves'} the "
                "query positions, and the decoder "
                f"{'also computes' if decoder.box_query_pos else 'does not compute'} them from "
                "the boxes: use decoder.box_query_pos=true exactly with DINOQueries or "
                "AnchorQueries."
            )
        if getattr(queries, "num_classes", num_classes) != num_classes:
            raise ValueError(
                f"the query selection scores {queries.num_classes} classes, the detector "
                f"{num_classes}; set both from data.num_classes."
            )
        position_embedding = position_embedding or PositionEmbeddingSine(hidden_dim // 2)
        if position_embedding.num_pos_feats is None:
            position_embedding.num_pos_feats = hidden_dim // 2
        if 2 * position_embedding.num_pos_feats != hidden_dim:
            raise ValueError(
                f"the position embedding has 2 x {position_embedding.num_pos_feats} channels, the "
                f"model {hidden_dim}; leave position_embedding.num_pos_feats null (half the width)."
            )
        if mask_head is not None:
            mask_head.bind(self._lateral_channels(backbone, mask_head, hidden_dim))
        self.num_classes = num_classes
        self.num_feature_levels = num_levels
        self.box_refine = box_refine
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, num_levels)
        self.encoder = encoder
        self.decoder = decoder
        self.queries = queries
        self.mask_head = mask_head
        self.training_queries = nn.ModuleDict()
        for name, block in (training_queries or {}).items():
            if block is None:  # a config that drops a block sets it to null
                continue
            if block.stream not in OPTIONAL_STREAMS:
                raise ValueError(
                    f"training_queries.{name} writes the stream {block.stream!r}, which "
                    f"DetectorOutput does not declare; declare it in msdetr/models/outputs.py."
                )
            taken = [
                n for n, b in zip(self.training_queries, self.blocks) if b.stream == block.stream
            ]
            if taken:
                raise ValueError(
                    f"training_queries.{name} and .{taken[0]} both write {block.stream}; keep one."
                )
            block.bind(name=name, selection=queries, num_classes=num_classes)
            self.training_queries[name] = block

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.linears()[-1].weight)
        nn.init.zeros_(bbox_embed.linears()[-1].bias)
        # One head per decoder layer, and one for the encoder's proposals when the queries score
        # them.
        num_pred = decoder.num_layers + int(queries.uses_encoder_heads)
        if box_refine and not share_heads:
            class_heads = [copy.deepcopy(class_embed) for _ in range(num_pred)]
            box_heads = [copy.deepcopy(bbox_embed) for _ in range(num_pred)]
            nn.init.constant_(box_heads[0].linears()[-1].bias[2:], -2.0)
        else:
            # One head shared by every layer: officially without refinement, and DINO's share_heads
            # (whose box head's last layer starts at zero, bias included).
            if not box_refine:
                nn.init.constant_(bbox_embed.linears()[-1].bias[2:], -2.0)
            class_heads, box_heads = [class_embed] * num_pred, [bbox_embed] * num_pred
        if queries.uses_encoder_heads:
            for head in box_heads:
                nn.init.zeros_(head.linears()[-1].bias[2:])
        self.class_embed = nn.ModuleList(class_heads)
        self.bbox_embed = nn.ModuleList(box_heads)
        if o2m_class_heads:
            self.class_embed_o2m = copy.deepcopy(self.class_embed[: decoder.num_layers])

    @staticmethod
    def _lateral_channels(backbone: FeatureBackbone, head: MaskHead, hidden_dim: int) -> int:
        """The channels of the backbone map the mask head fuses in; refuses a backbone without
        it."""
        if head.hidden_dim != hidden_dim:
            raise ValueError(
                f"model.detector.mask_head.hidden_dim={head.hidden_dim}, the model's width is "
                f"{hidden_dim}; set it from ${{model.hidden_dim}}."
            )
        name = type(backbone).__name__
        if head.stride == 4:
            if backbone.stride4_channels is None:
                raise ValueError(
                    f"the {name} backbone has no stride-4 map for "
                    "model.detector.mask_head.lateral_stride=4; set lateral_stride=8 to fuse its "
                    "stride-8 level instead."
                )
            return backbone.stride4_channels
        strides = getattr(backbone, "strides", None)
        if strides is not None and strides[0] != 8:
            raise ValueError(
                f"model.detector.mask_head.lateral_stride=8 fuses the backbone's first level, "
                f"which is at stride {strides[0]} in this {name}; return the stride-8 level "
                "(return_interm_layers=true) or use lateral_stride=4."
            )
        return backbone.num_channels[0]

    # -- what the model is --------------------------------------------------------------------
    @property
    def num_queries(self) -> int:
        """One-to-one queries: the ones used at inference."""
        return self.queries.num_queries

    @property
    def two_stage(self) -> bool:
        """The queries are encoder proposals (their boxes are the decoder's initial references)."""
        return self.queries.proposal_references

    @property
    def blocks(self) -> list[TrainingQueries]:
        """The training-query blocks, in `training_queries` order (typed: a ModuleDict's values are
        plain modules to a type checker)."""
        return [cast(TrainingQueries, block) for block in self.training_queries.values()]

    @property
    def with_box_refine(self) -> bool:
        return self.box_refine

    @property
    def output_streams(self) -> dict[str, set[str]]:
        """The streams a training forward returns (`DetectorOutput` keys; "main" for the one-to-one
        stream), each with the box keys an assigner may match against."""
        boxes = (
            {"pred_boxes", "init_reference"} if self.queries.proposal_references else {"pred_boxes"}
        )
        if self.mask_head is not None:  # the decoder streams carry mask embeddings
            boxes = boxes | {"mask_embed"}
        streams = {"main": boxes}
        if self.decoder.o2m_tap is not None:
            streams["o2m_outputs"] = boxes
        for block in self.blocks:
            streams[block.stream] = boxes
        streams.update(self.queries.streams)
        return streams

    def set_attn_backend(self, backend: str) -> None:
        """Switch every deformable attention between the backends of `msdetr.kernels.BACKENDS`."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}.")
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.backend = backend

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def _input_projections(channels: list[int], hidden_dim: int, num_levels: int) -> nn.ModuleList:
        convs = [nn.Conv2d(c, hidden_dim, 1) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_levels - len(channels)):
            convs.append(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1))
            in_channels = hidden_dim
        for conv in convs:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        return nn.ModuleList(nn.Sequential(conv, nn.GroupNorm(32, hidden_dim)) for conv in convs)

    def multiscale_features(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """The encoder's input levels (projected maps, padding masks, positions) and, with a mask
        head, the backbone map its pixel embedding fuses in (None without one)."""
        lateral = None
        if self.mask_head is not None and self.mask_head.stride == 4:
            feats, lateral = self.backbone.forward_with_stride4(images, padding_mask)
        else:
            feats = self.backbone(images, padding_mask)
            if self.mask_head is not None:
                lateral = feats[0][0]
        srcs, masks = [], []
        for lvl, (feat, mask) in enumerate(feats):
            srcs.append(self.input_proj[lvl](feat))
            masks.append(mask)
        for lvl in range(len(feats), self.num_feature_levels):
            # The first extra level convolves the raw last backbone map, later ones the previous
            # level.
            src = self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1])
            srcs.append(src)
            masks.append(resize_mask(padding_mask, src.shape[-2:]))
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos, lateral

    def head_outputs(self, hidden, box_refs, boxes=None, class_heads=None):
        """Class logits and boxes of every decoder layer (boxes given: the decoder's refined
        ones)."""
        class_heads = self.class_embed if class_heads is None else class_heads
        logits, coords = [], []
        for lvl, h in enumerate(hidden):
            logits.append(class_heads[lvl](h))
            if boxes:
                coords.append(boxes[lvl])
                continue
            delta = self.bbox_embed[lvl](h)
            ref = inverse_sigmoid(box_refs[lvl], self.decoder.logit_eps)
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            coords.append(delta.sigmoid())
        return logits, coords

    @staticmethod
    def _stream(
        logits, coords, reference, start: int, stop: int, masks: dict | None = None
    ) -> LayerStream:
        """The stream of queries start..stop: last layer on top, earlier layers in `aux_outputs`.

        `masks` (with a mask head): per layer `embed` (B, T, D) mask embeddings, and the shared
        `features` and `valid_ratio`; every layer gets its slice of the embeddings and the shared
        two (`MaskKeys`)."""
        logits = [x[:, start:stop] for x in logits]
        coords = [x[:, start:stop] for x in coords]
        layers: list[dict[str, Any]] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits, coords)
        ]
        if masks is not None:
            for layer, embed in zip(layers, masks["embed"]):
                layer["mask_embed"] = embed[:, start:stop]
                layer["mask_features"] = masks["features"]
                layer["mask_valid_ratio"] = masks["valid_ratio"]
        return cast(
            LayerStream,
            {**layers[-1], "aux_outputs": layers[:-1], "init_reference": reference[:, start:stop]},
        )

    @property
    def needs_targets(self) -> bool:
        """Whether a training forward needs the targets (a training block builds queries from
        them)."""
        return any(block.needs_targets for block in self.blocks)

    def self_attn_mask(
        self, blocks: list[TrainingQueries], sizes: list[list[int]], device
    ) -> torch.Tensor:
        """(T, T) bool, True where a query may not attend: the one-to-one queries (group 0) and
        every group of every block see only their own group, except that a block with
        `sees_one_to_one` also sees the one-to-one queries."""
        flat = [n for per_block in sizes for n in per_block]
        sees = [False] + [
            b.sees_one_to_one for b, per_block in zip(blocks, sizes[1:]) for _ in per_block
        ]
        ids = block_ids(flat, device)
        sees_main = torch.tensor(sees, dtype=torch.bool).to(device, non_blocking=True)[ids]
        return (ids[:, None] != ids[None, :]) & ~(sees_main[:, None] & (ids[None, :] == 0))

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor, targets=None
    ) -> DetectorOutput:
        """`targets` (training only): the batch's targets, for training blocks that build queries
        from them (denoising)."""
        srcs, masks, pos, lateral = self.multiscale_features(images, padding_mask)
        levels = self.encoder.flatten(srcs, masks, pos)
        memory = self.encoder(levels)
        pixel = None
        if self.mask_head is not None:
            assert lateral is not None
            # One pixel embedding per forward, shared by every stream and layer.
            pixel = self.mask_head.pixel_embedding(memory, levels.shapes, lateral)
        extra = self.blocks if self.training else []
        from_targets = [b for b in extra if b.needs_targets]
        if from_targets and targets is None:
            raise ValueError(
                "this model's training queries are built from the targets: call model(images, "
                "padding_mask, targets) in training."
            )
        from_selection = [b for b in extra if not b.needs_targets]
        blocks = from_selection + from_targets  # the order of their queries and streams
        heads = (
            (self.class_embed[-1], self.bbox_embed[-1]) if self.queries.uses_encoder_heads else None
        )
        queries = self.queries(memory, levels, from_selection, heads)
        if from_targets:
            made = [b.build(targets, self.queries) for b in from_targets]
            # Positions are None where the decoder computes them from the boxes (DINO), for all or
            # none.
            positions = [queries.pos, *(m.pos for m in made)]
            given = [p for p in positions if p is not None]
            if given and len(given) != len(positions):
                raise RuntimeError(
                    "a training block and the query selection disagree on whether "
                    "queries carry positions; the decoder's box_query_pos decides it."
                )
            queries = Queries(
                torch.cat([queries.tgt, *(m.tgt for m in made)], 1),
                torch.cat(given, 1) if given else None,
                torch.cat([queries.reference, *(m.reference for m in made)], 1),
                queries.outputs,
            )
        q = self.num_queries
        # The one-to-one queries, then each training block's groups (see `self_attn_mask`).
        sizes = [[q]] + [b.sizes(q, targets) for b in blocks]
        dec = self.decoder(
            queries.tgt,
            queries.reference,
            memory,
            levels,
            queries.pos,
            self.bbox_embed if self.box_refine else None,
            self.self_attn_mask(blocks, sizes, images.device) if blocks else None,
        )
        logits, coords = self.head_outputs(dec.hidden, dec.box_refs, dec.boxes)
        mask_out: dict[str, Any] | None = None
        if self.mask_head is not None and pixel is not None:
            mask_out = {
                "embed": [self.mask_head.embed(h) for h in dec.hidden],
                "features": pixel,
                "valid_ratio": mask_valid_ratio(
                    padding_mask, pixel.shape[-2:], self.mask_head.stride
                ),
            }
        # Stream keys come from the blocks (checked against DetectorOutput's when they were bound).
        out: dict[str, Any] = dict(self._stream(logits, coords, queries.reference, 0, q, mask_out))
        start = q
        for block, per_block in zip(blocks, sizes[1:]):
            stop = start + sum(per_block)
            out[block.stream] = self._stream(
                logits, coords, queries.reference, start, stop, mask_out
            )
            start = stop
        if dec.hidden_o2m and dec.hidden_o2m[0] is not None:
            # One-to-many predictions of the one-to-one queries, on the same references as their
            # layer.
            o2m_hidden = [h[:, :q] for h in dec.hidden_o2m]
            o2m_logits, o2m_coords = self.head_outputs(
                o2m_hidden,
                [r[:, :q] for r in dec.box_refs],
                class_heads=getattr(self, "class_embed_o2m", None),
            )
            o2m_masks = None
            if mask_out is not None and self.mask_head is not None:
                # The one-to-many states through the same mask embedding MLP (as the box heads).
                o2m_masks = {**mask_out, "embed": [self.mask_head.embed(h) for h in o2m_hidden]}
            out["o2m_outputs"] = self._stream(
                o2m_logits, o2m_coords, queries.reference, 0, q, o2m_masks
            )
        out.update(queries.outputs)
        return cast(DetectorOutput, out)
