"""Where the decoder's queries come from: the query selection.

A `QuerySelection` turns the encoded tokens into the decoder's initial queries (`Queries`): learned
embeddings (`LearnedQueries`), DAB's learned anchor boxes (`AnchorQueries`), the encoder's best
proposals (`TwoStageQueries`), DETA's per-level NMS over them (`NMSTwoStageQueries`), or DINO's
proposals scored by encoder heads of its own (`DINOQueries`). It also makes the queries of the
training-only blocks that take theirs from the selection (`extra`; the blocks are in
`training_queries.py`): per block the next ranked proposals or the one-to-one ones again
(`proposal_order`), and its learned content rows after the selection's own (`learned_rows`).
A new selection is a new subclass and a `model/` config. See docs/architecture.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torchvision.ops import batched_nms

from ..box_ops import cxcywh_to_xyxy
from ..kernels import Shapes, level_shapes
from .decoder import MLP
from .encoder import Levels
from .position_encoding import box_sine_embedding

if TYPE_CHECKING:
    from .training_queries import TrainingQueries


@dataclass
class Queries:
    """The decoder's initial queries: content `tgt` (B, T, C), position `pos` (B, T, C; None where
        the
    decoder computes every layer's positions from the boxes, DINO) and `reference` (B, T, 2) points
    or (B, T, 4) boxes in [0, 1]; `outputs`: streams the selection adds to the detector's output
    (two-stage: `enc_outputs`)."""

    tgt: torch.Tensor
    pos: torch.Tensor | None
    reference: torch.Tensor
    outputs: dict


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the best-scoring tokens of (B, S) `scores`, best first; on maps with fewer
    than k tokens the ranking repeats (tiny images) instead of failing in topk."""
    num_tokens = scores.shape[1]
    topk = torch.topk(scores, min(k, num_tokens), dim=1)[1]
    if num_tokens < k:
        topk = topk[:, torch.arange(k, device=topk.device) % num_tokens]
    return topk


class QuerySelection(nn.Module):
    """The base class: `forward(memory, levels, extra, heads)` -> `Queries` for the one-to-one
    queries followed by the training-only blocks `extra`.

    Class attributes: `uses_encoder_heads` (the detector gives it a class and a box head of its own
    to score the encoder tokens), `proposal_references` (its references are box proposals an
    assigner may match against), `streams` (output streams it adds, with their box keys),
    `gives_positions` (False: `Queries.pos` is None, the decoder computes the positions from the
    boxes), `content_embed` (the attribute holding its learned content rows, if any),
    `official_prefixes` (its parameters the official code keeps elsewhere than the common naming
    table says: {prefix under `queries.`: official prefix}), `serves_selection_blocks` (whether
    training blocks that take their queries from the selection can bind to it), `box_positions`
    (whether `positions` places queries at given boxes, as the denoising blocks need).
    """

    uses_encoder_heads: ClassVar[bool] = False
    proposal_references: ClassVar[bool] = False
    streams: ClassVar[dict[str, set[str]]] = {}
    gives_positions: ClassVar[bool] = True
    content_embed: ClassVar[str] = "query_embed"
    official_prefixes: ClassVar[dict[str, str]] = {}
    serves_selection_blocks: ClassVar[bool] = True
    box_positions: ClassVar[bool] = False

    num_queries: int
    d_model: int

    @property
    def embedding_dim(self) -> int | None:
        """Width of one learned query row (what training-only blocks must learn per query)."""
        embed = getattr(self, self.content_embed, None)
        return embed.embedding_dim if embed is not None else None

    def learned_rows(self, extra: Sequence[TrainingQueries]) -> torch.Tensor:
        rows = getattr(self, self.content_embed).weight
        if not extra:
            return rows
        return torch.cat([rows] + [b.embed.weight for b in extra if b.embed is not None])

    def positions(self, boxes_unact: torch.Tensor) -> torch.Tensor | None:
        """(B, T, 4) boxes in logit space -> (B, T, C) positions of queries placed at them (for
        training blocks built from boxes); None where the decoder computes every query's position
        from its box (`gives_positions` False). Selections with `box_positions` implement it."""
        if not self.gives_positions:
            return None
        raise NotImplementedError(f"{type(self).__name__} places no queries at given boxes")


class LearnedQueries(QuerySelection):
    """Deformable-DETR's single-stage queries: a learned position and content per query, and a
    reference point predicted from the position.

    Args:
        num_queries: one-to-one queries (the ones used at inference).
        d_model: query width.
    """

    def __init__(self, *, num_queries: int = 300, d_model: int = 256):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
        self.num_queries, self.d_model = num_queries, d_model
        self.query_embed = nn.Embedding(num_queries, d_model * 2)
        self.reference_points = nn.Linear(d_model, 2)
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)

    def forward(
        self,
        memory: torch.Tensor,
        levels: Levels,
        extra: Sequence[TrainingQueries] = (),
        heads=None,
    ) -> Queries:
        bs = memory.shape[0]
        query_pos, tgt = torch.split(self.learned_rows(extra), self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
        tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        return Queries(tgt, query_pos, self.reference_points(query_pos).sigmoid(), {})


class TwoStageQueries(QuerySelection):
    """Two-stage Deformable-DETR: every encoder token proposes a box (scored by the encoder heads);
    the best `num_queries` become the queries, their boxes the references and (sine-embedded) the
    positions; the content comes from the proposals too, or is learned (`mixed_selection`).

    Args:
        num_queries: one-to-one queries (proposals taken).
        d_model: query width.
        mixed_selection: learned content with the proposals' positions (DINO / H-DETR "++").
        pix_trans: the selected tokens' (detached) features join the content (DETA).
    """

    uses_encoder_heads = True
    proposal_references = True
    box_positions = True
    streams = {"enc_outputs": {"pred_boxes", "anchors"}}

    def __init__(
        self,
        *,
        num_queries: int = 300,
        d_model: int = 256,
        mixed_selection: bool = False,
        pix_trans: bool = False,
    ):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
        self.num_queries, self.d_model = num_queries, d_model
        self.mixed_selection = mixed_selection
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
        self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        if pix_trans:
            self.pix_trans = nn.Linear(d_model, d_model)
            self.pix_trans_norm = nn.LayerNorm(d_model)
        self.pix_trans_enabled = pix_trans
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if mixed_selection:
            self.query_embed = nn.Embedding(num_queries, d_model)

    def positions(self, boxes_unact: torch.Tensor) -> torch.Tensor:
        """(B, T, 4) boxes in logit space -> (B, T, C) query positions, as the proposals get
        them."""
        c = self.d_model
        return self.pos_trans_norm(self.pos_trans(box_sine_embedding(boxes_unact, c // 2)))[..., :c]

    @staticmethod
    def encoder_proposals(memory, padding_mask, spatial_shapes: torch.Tensor | Shapes):
        """Per token a box (centre of its pixel, size 0.05 * 2^level) in logit space, +inf where
        invalid.

        `spatial_shapes`: the levels' (H, W), best as Python ints (see `level_shapes`)."""
        n = memory.shape[0]
        shapes = level_shapes(spatial_shapes)
        per_level: list[torch.Tensor] = []
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            mask = padding_mask[:, start : start + h * w].view(n, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            per_level.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(per_level, 1)
        level_ids = torch.cat(
            [
                torch.full((h * w,), lvl, dtype=torch.long, device=memory.device)
                for lvl, (h, w) in enumerate(shapes)
            ]
        )
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), proposals, level_ids

    def select(
        self,
        enc_class: torch.Tensor,
        enc_coord_unact: torch.Tensor,
        level_ids: torch.Tensor,
        k: int,
        shapes: Shapes | None = None,
    ) -> torch.Tensor:
        """(B, k) token indices, best first: top-k by the channel-0 encoder logit; on maps smaller
        than k they repeat."""
        return top_tokens(enc_class[..., 0], k)

    def forward(
        self,
        memory: torch.Tensor,
        levels: Levels,
        extra: Sequence[TrainingQueries] = (),
        heads=None,
    ) -> Queries:
        """`heads`: the (class, box) heads that score and regress the encoder tokens."""
        class_head, box_head = heads
        bs, _, c = memory.shape
        output_memory, proposals, level_ids = self.encoder_proposals(
            memory, levels.mask, levels.shapes
        )
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = class_head(output_memory)
        enc_coord_unact = box_head(output_memory) + proposals
        topk = proposal_order(self, enc_class, enc_coord_unact, level_ids, extra, levels.shapes)
        topk_coords_unact = torch.gather(
            enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)
        ).detach()
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans(box_sine_embedding(topk_coords_unact, c // 2))
        )
        query_pos = pos_trans_out[..., :c]
        if self.mixed_selection:
            tgt = self.learned_rows(extra).unsqueeze(0).expand(bs, -1, -1)
        else:
            tgt = pos_trans_out[..., c:]
        if self.pix_trans_enabled:
            # DETA: the selected tokens' own (detached) features join the query content.
            feats = torch.gather(output_memory, 1, topk.unsqueeze(-1).expand(-1, -1, c)).detach()
            tgt = tgt + self.pix_trans_norm(self.pix_trans(feats))
        enc = {
            "pred_logits": enc_class,
            "pred_boxes": enc_coord_unact.sigmoid(),
            "anchors": proposals.sigmoid(),
        }
        return Queries(tgt, query_pos, topk_coords_unact.sigmoid(), {"enc_outputs": enc})


def proposal_order(
    selection,
    enc_class,
    enc_coord_unact,
    level_ids,
    extra: Sequence[TrainingQueries],
    shapes: Shapes,
) -> torch.Tensor:
    """(B, T) the encoder tokens whose proposals become the queries: the one-to-one queries' first
    (`selection.select`, best first), then each block's: the next ranked ones, or the one-to-one
    ones again."""
    q = selection.num_queries
    ranked = q + sum(sum(b.sizes(q)) for b in extra if b.proposals == "ranked")
    best = selection.select(enc_class, enc_coord_unact, level_ids, ranked, shapes)
    parts, start = [best[:, :q]], q
    for block in extra:
        size = sum(block.sizes(q))
        if block.proposals == "ranked":
            parts.append(best[:, start : start + size])
            start += size
        else:
            parts.append(best[:, :q].repeat(1, size // q))
    return torch.cat(parts, 1) if extra else best


class DINOQueries(QuerySelection):
    """DINO's two-stage selection (two_stage_type "standard"): the encoder tokens are scored by a
    class head and regressed by a box head of this selection's own (DINO's enc_out_class_embed and
    enc_out_bbox_embed), the `num_queries` tokens with the best score over all classes become the
    queries: their (detached) regressed boxes the references, learned rows (`tgt_embed`) the
    content. No positions: the decoder embeds the boxes at every layer (`box_query_pos`).

    The `enc_outputs` stream holds the selected tokens only, as DINO's `interm_outputs`: their
    class logits and (not detached) boxes, with `anchors` their unregressed proposals; DINO
    supervises it with class-specific Hungarian matching (not class-agnostic as Deformable-DETR).

    Args:
        num_queries: one-to-one queries (proposals taken).
        d_model: query width.
        num_classes: classes of the encoder's class head (the detector's).
    """

    proposal_references = True
    streams = {"enc_outputs": {"pred_boxes", "anchors"}}
    gives_positions = False
    box_positions = True
    content_embed = "tgt_embed"

    def __init__(self, *, num_queries: int = 900, d_model: int = 256, num_classes: int = 91):
        super().__init__()
        if num_queries < 1 or num_classes < 1:
            raise ValueError(
                f"num_queries={num_queries} / num_classes={num_classes}: both must be >= 1."
            )
        self.num_queries, self.d_model, self.num_classes = num_queries, d_model, num_classes
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        # As DINO's transformer: Xavier on its matrices (the content rows too); the heads as the
        # detector's.
        nn.init.xavier_uniform_(self.enc_output.weight)
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        nn.init.constant_(self.enc_out_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(self.enc_out_bbox_embed.linears()[-1].weight)
        nn.init.zeros_(self.enc_out_bbox_embed.linears()[-1].bias)

    def select(
        self,
        enc_class: torch.Tensor,
        enc_coord_unact: torch.Tensor,
        level_ids: torch.Tensor,
        k: int,
        shapes: Shapes,
    ) -> torch.Tensor:
        """(B, k) token indices, best first by the largest class logit; on maps smaller than k they
        repeat."""
        return top_tokens(enc_class.max(-1)[0], k)

    def forward(
        self,
        memory: torch.Tensor,
        levels: Levels,
        extra: Sequence[TrainingQueries] = (),
        heads=None,
    ) -> Queries:
        bs, _, c = memory.shape
        output_memory, proposals, level_ids = TwoStageQueries.encoder_proposals(
            memory, levels.mask, levels.shapes
        )
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = self.enc_out_class_embed(output_memory)
        enc_coord_unact = self.enc_out_bbox_embed(output_memory) + proposals
        topk = proposal_order(self, enc_class, enc_coord_unact, level_ids, extra, levels.shapes)
        coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
        tgt = self.learned_rows(extra).unsqueeze(0).expand(bs, -1, -1)
        # The encoder stream: the one-to-one tokens' own predictions, boxes not detached.
        q = topk[:, : self.num_queries]
        selected = torch.gather(output_memory, 1, q.unsqueeze(-1).expand(-1, -1, c))
        anchors = torch.gather(proposals, 1, q.unsqueeze(-1).expand(-1, -1, 4))
        enc = {
            "pred_logits": self.enc_out_class_embed(selected),
            "pred_boxes": coords_unact[:, : self.num_queries].sigmoid(),
            "anchors": anchors.sigmoid(),
        }
        return Queries(tgt, None, coords_unact.detach().sigmoid(), {"enc_outputs": enc})


class AnchorQueries(QuerySelection):
    """DAB-Deformable-DETR's single-stage queries (DN-DETR's detector): per query a learned content
    row (`tgt_embed`) and a learned anchor box (`refpoint_embed`, 4 logits: cx, cy, w, h) whose
    sigmoid is the decoder's initial reference. No positions: the decoder embeds every layer's boxes
    (`box_query_pos`, with DAB's `query_scale`).

    Args:
        num_queries: one-to-one queries.
        d_model: query width.
        indicator: DN-DETR's indicator feature: the content rows are d_model - 1 wide and every
            query gets a constant 0 as its last feature (denoising queries get a 1, see
            `DenoisingQueries(indicator=)`).
    """

    gives_positions = False
    box_positions = True
    content_embed = "tgt_embed"
    serves_selection_blocks = False  # anchors for the one-to-one queries only
    # This project's names under `queries.` -> the official ones (DN-DETR keeps them on the
    # detector).
    official_prefixes = {"tgt_embed.": "tgt_embed.", "refpoint_embed.": "refpoint_embed."}

    def __init__(self, *, num_queries: int = 300, d_model: int = 256, indicator: bool = False):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
        self.num_queries, self.d_model, self.indicator = num_queries, d_model, indicator
        self.tgt_embed = nn.Embedding(num_queries, d_model - int(indicator))
        self.refpoint_embed = nn.Embedding(num_queries, 4)

    def forward(
        self,
        memory: torch.Tensor,
        levels: Levels,
        extra: Sequence[TrainingQueries] = (),
        heads=None,
    ) -> Queries:
        bs = memory.shape[0]
        tgt = self.tgt_embed.weight
        if self.indicator:
            tgt = torch.cat([tgt, tgt.new_zeros(tgt.shape[0], 1)], 1)
        reference = self.refpoint_embed.weight.sigmoid()
        return Queries(
            tgt.unsqueeze(0).expand(bs, -1, -1), None, reference.unsqueeze(0).expand(bs, -1, -1), {}
        )


class NMSTwoStageQueries(TwoStageQueries):
    """DETA's two-stage selection: per image, the top tokens of every level, NMS within each level,
    at most num_queries / L per level (best first), filled up with the best leftovers.

    Unlike the official code this works with fewer tokens than `pre_nms_per_level` (per level or in
    total).

    Args:
        num_queries, d_model, mixed_selection, pix_trans: as `TwoStageQueries`.
        pre_nms_per_level: tokens of each level that enter the NMS (1000 in DETA).
        iou_threshold: the NMS threshold (0.9 in DETA).
    """

    def __init__(
        self,
        *,
        num_queries: int = 300,
        d_model: int = 256,
        mixed_selection: bool = False,
        pix_trans: bool = False,
        pre_nms_per_level: int = 1000,
        iou_threshold: float = 0.9,
    ):
        super().__init__(
            num_queries=num_queries,
            d_model=d_model,
            mixed_selection=mixed_selection,
            pix_trans=pix_trans,
        )
        if pre_nms_per_level < 1 or not 0 <= iou_threshold <= 1:
            raise ValueError(
                f"pre_nms_per_level={pre_nms_per_level} / iou_threshold={iou_threshold}: use "
                "pre_nms_per_level >= 1 and iou_threshold in [0, 1]."
            )
        self.pre_nms_per_level = pre_nms_per_level
        self.iou_threshold = iou_threshold

    @torch.no_grad()
    def select(
        self,
        enc_class: torch.Tensor,
        enc_coord_unact: torch.Tensor,
        level_ids: torch.Tensor,
        k: int,
        shapes: Shapes | None = None,
    ) -> torch.Tensor:
        """(B, k) token indices in global score order.

        The one place of the model that waits for the device: how many boxes survive NMS depends on
        the data (one NMS per image). Everything else is read from `shapes` (the levels' (H, W) as
        Python ints; without them the level sizes are counted from `level_ids`, which are contiguous
        per level) and stays on the device. Kept in this one method so that it can be swapped out.
        """
        logits = enc_class[..., 0]
        boxes = cxcywh_to_xyxy(enc_coord_unact.sigmoid().float()).clamp(0, 1)
        sizes = (
            [h * w for h, w in shapes] if shapes is not None else torch.bincount(level_ids).tolist()
        )
        num_levels = len(sizes)
        per_level = k // num_levels
        # Every image's top tokens of each level (a level is a slice of the tokens), level by level.
        tops: list[torch.Tensor] = []
        start = 0
        for size in sizes:
            if size:
                top = logits[:, start : start + size].topk(
                    min(self.pre_nms_per_level, size), dim=1
                )[1]
                tops.append(top + start)
            start += size
        candidates = torch.cat(tops, 1)
        levels = torch.arange(num_levels, device=logits.device)[:, None]
        picks = []
        for b in range(logits.shape[0]):
            cand = candidates[b]
            keep = cand[
                batched_nms(
                    boxes[b, cand], logits[b, cand].float(), level_ids[cand], self.iou_threshold
                )
            ]
            if keep.numel() < k:  # too few survivors: plain top-k (cycling on tiny maps)
                picks.append(
                    super().select(
                        enc_class[b : b + 1], enc_coord_unact[b : b + 1], level_ids, k, shapes
                    )[0]
                )
                continue
            onehot = level_ids[keep][None] == levels
            chosen = (onehot & (onehot.cumsum(1) <= per_level)).any(0)
            # Fill up with the first (best) leftovers: exactly k chosen, taken in `keep` order.
            leftover = ~chosen
            chosen = chosen | (leftover & (leftover.cumsum(0) <= k - chosen.sum()))
            picks.append(keep[chosen.to(torch.uint8).argsort(descending=True, stable=True)[:k]])
        return torch.stack(picks)
