"""Where the decoder's queries come from, and the training-only query blocks.

A `QuerySelection` turns the encoded tokens into the decoder's initial queries: learned embeddings
(`LearnedQueries`), the encoder's best proposals (`TwoStageQueries`), or DETA's per-level NMS over
them (`NMSTwoStageQueries`). A `TrainingQueries` block adds queries that exist only in training, see
none of the others in self-attention and are supervised through a stream of their own: H-DETR's
one-to-many queries (`HybridQueries`), Group DETR's groups (`QueryGroups`). A new scheme is a new
subclass and a config; the detector's forward does not change. See docs/architecture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn
from torchvision.ops import batched_nms

from ..box_ops import cxcywh_to_xyxy, inverse_sigmoid
from ..kernels import Shapes, level_shapes
from ..seeded import Seeded
from .decoder import MLP
from .encoder import Levels
from .position_encoding import box_sine_embedding


class TrainingQueries(nn.Module):
    """A block of training-only queries (the base class).

    Subclasses set `stream` (the `DetectorOutput` key their predictions go to) and say how many
    queries they add (`sizes`: one entry per group that sees only itself in self-attention, and,
    with `sees_one_to_one`, the one-to-one queries too). Their queries come either from the query
    selection (`proposals`: "ranked" continues the one-to-one ranking of two-stage proposals,
    "shared" repeats the one-to-one proposals; learned rows come from `bind`) or, with
    `needs_targets`, from the batch's targets (`build`). `bind` is called once by the detector.
    """

    stream: ClassVar[str]
    proposals: ClassVar[str] = "ranked"
    needs_targets: ClassVar[bool] = False
    sees_one_to_one: ClassVar[bool] = False

    def sizes(self, num_queries: int, targets=None) -> list[int]:
        """The sizes of the block's groups, for `num_queries` one-to-one queries (and this batch's
        `targets`, for blocks that build from them)."""
        raise NotImplementedError

    def bind(self, *, name: str, selection: QuerySelection, num_classes: int) -> None:
        """Creates the block's learned query rows (if the selection learns any)."""
        if not selection.serves_selection_blocks:
            raise ValueError(f"training_queries.{name} ({type(self).__name__}) takes its queries from the query "
                             f"selection, and {type(selection).__name__} has no anchors for them; use a two-stage "
                             "model (e.g. model=deformable_detr_pp).")
        dim = selection.embedding_dim
        self.embed = nn.Embedding(sum(self.sizes(selection.num_queries)), dim) if dim else None

    def build(self, targets, selection: QuerySelection) -> Queries:
        """The block's queries for this batch (blocks with `needs_targets`)."""
        raise NotImplementedError


class HybridQueries(TrainingQueries):
    """H-DETR's one-to-many queries: `num_queries` more queries, one block, ranked after the
    one-to-one ones in two-stage selection.

    Args:
        num_queries: how many (1500 in H-DETR).
    """

    stream = "hybrid_outputs"
    proposals = "ranked"

    def __init__(self, *, num_queries: int = 1500):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"HybridQueries needs num_queries >= 1, got {num_queries}.")
        self.num_queries = num_queries

    def sizes(self, num_queries: int, targets=None) -> list[int]:
        return [self.num_queries]


class QueryGroups(TrainingQueries):
    """Group DETR: `groups - 1` more copies of the one-to-one queries, each a group of its own;
    in two-stage selection they share the one-to-one proposals, so they need learned content
    (mixed query selection).

    Args:
        groups: query groups including the one-to-one queries (11 in Group DETR).
    """

    stream = "group_outputs"
    proposals = "shared"

    def __init__(self, *, groups: int = 11):
        super().__init__()
        if groups < 2:
            raise ValueError(f"QueryGroups needs groups >= 2 (group 0 is the one-to-one queries), got {groups}.")
        self.groups = groups

    def sizes(self, num_queries: int, targets=None) -> list[int]:
        return [num_queries] * (self.groups - 1)

    def bind(self, *, name: str, selection: QuerySelection, num_classes: int) -> None:
        if selection.embedding_dim is None:
            raise ValueError(
                f"training_queries.{name} (Group DETR) shares the two-stage proposals across its groups, so the "
                "groups need learned content: set model.detector.queries.mixed_selection=true (the ++ models have it).")
        super().bind(name=name, selection=selection, num_classes=num_classes)


@dataclass
class Queries:
    """The decoder's initial queries: content `tgt` (B, T, C), position `pos` (B, T, C; None where the
    decoder computes every layer's positions from the boxes, DINO) and `reference` (B, T, 2) points
    or (B, T, 4) boxes in [0, 1]; `outputs`: streams the selection adds to the detector's output
    (two-stage: `enc_outputs`)."""

    tgt: torch.Tensor
    pos: torch.Tensor | None
    reference: torch.Tensor
    outputs: dict


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
    training blocks that take their queries from the selection can bind to it).
    """

    uses_encoder_heads: ClassVar[bool] = False
    proposal_references: ClassVar[bool] = False
    streams: ClassVar[dict[str, set[str]]] = {}
    gives_positions: ClassVar[bool] = True
    content_embed: ClassVar[str] = "query_embed"
    official_prefixes: ClassVar[dict[str, str]] = {}
    serves_selection_blocks: ClassVar[bool] = True

    num_queries: int
    d_model: int

    @property
    def embedding_dim(self) -> int | None:
        """Width of one learned query row (what training-only blocks must learn per query)."""
        embed = getattr(self, self.content_embed, None)
        return embed.embedding_dim if embed is not None else None

    def learned_rows(self, extra: Sequence[TrainingQueries]) -> torch.Tensor:
        rows = getattr(self, self.content_embed).weight
        return torch.cat([rows] + [b.embed.weight for b in extra]) if extra else rows


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

    def forward(self, memory: torch.Tensor, levels: Levels, extra: Sequence[TrainingQueries] = (),
                heads=None) -> Queries:
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
    streams = {"enc_outputs": {"pred_boxes", "anchors"}}

    def __init__(self, *, num_queries: int = 300, d_model: int = 256, mixed_selection: bool = False,
                 pix_trans: bool = False):
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
        """(B, T, 4) boxes in logit space -> (B, T, C) query positions, as the proposals get them."""
        c = self.d_model
        return self.pos_trans_norm(self.pos_trans(box_sine_embedding(boxes_unact, c // 2)))[..., :c]

    @staticmethod
    def encoder_proposals(memory, padding_mask, spatial_shapes: torch.Tensor | Shapes):
        """Per token a box (centre of its pixel, size 0.05 * 2^level) in logit space, +inf where invalid.

        `spatial_shapes`: the levels' (H, W), best as Python ints (see `level_shapes`)."""
        n = memory.shape[0]
        shapes = level_shapes(spatial_shapes)
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            mask = padding_mask[:, start:start + h * w].view(n, h, w)
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
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        level_ids = torch.cat([torch.full((h * w,), lvl, dtype=torch.long, device=memory.device)
                               for lvl, (h, w) in enumerate(shapes)])
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), proposals, level_ids

    def select(self, enc_class: torch.Tensor, enc_coord_unact: torch.Tensor, level_ids: torch.Tensor, k: int,
               shapes: Shapes) -> torch.Tensor:
        """(B, k) token indices, best first: top-k by the channel-0 encoder logit; on maps smaller
        than k they repeat."""
        num_tokens = enc_class.shape[1]
        topk = torch.topk(enc_class[..., 0], min(k, num_tokens), dim=1)[1]
        if num_tokens < k:  # tiny images: cycle the ranked tokens instead of failing in topk
            topk = topk[:, torch.arange(k, device=topk.device) % num_tokens]
        return topk

    def forward(self, memory: torch.Tensor, levels: Levels, extra: Sequence[TrainingQueries] = (),
                heads=None) -> Queries:
        """`heads`: the (class, box) heads that score and regress the encoder tokens."""
        class_head, box_head = heads
        bs, _, c = memory.shape
        output_memory, proposals, level_ids = self.encoder_proposals(memory, levels.mask, levels.shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = class_head(output_memory)
        enc_coord_unact = box_head(output_memory) + proposals
        topk = proposal_order(self, enc_class, enc_coord_unact, level_ids, extra, levels.shapes)
        topk_coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(box_sine_embedding(topk_coords_unact, c // 2)))
        query_pos = pos_trans_out[..., :c]
        if self.mixed_selection:
            tgt = self.learned_rows(extra).unsqueeze(0).expand(bs, -1, -1)
        else:
            tgt = pos_trans_out[..., c:]
        if self.pix_trans_enabled:
            # DETA: the selected tokens' own (detached) features join the query content.
            feats = torch.gather(output_memory, 1, topk.unsqueeze(-1).expand(-1, -1, c)).detach()
            tgt = tgt + self.pix_trans_norm(self.pix_trans(feats))
        enc = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid(), "anchors": proposals.sigmoid()}
        return Queries(tgt, query_pos, topk_coords_unact.sigmoid(), {"enc_outputs": enc})


def proposal_order(selection, enc_class, enc_coord_unact, level_ids, extra: Sequence[TrainingQueries],
                   shapes: Shapes) -> torch.Tensor:
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
            parts.append(best[:, start:start + size])
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
    content_embed = "tgt_embed"

    def __init__(self, *, num_queries: int = 900, d_model: int = 256, num_classes: int = 91):
        super().__init__()
        if num_queries < 1 or num_classes < 1:
            raise ValueError(f"num_queries={num_queries} / num_classes={num_classes}: both must be >= 1.")
        self.num_queries, self.d_model, self.num_classes = num_queries, d_model, num_classes
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        # As DINO's transformer: Xavier on its matrices (the content rows too); the heads as the detector's.
        nn.init.xavier_uniform_(self.enc_output.weight)
        nn.init.xavier_uniform_(self.tgt_embed.weight)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        nn.init.constant_(self.enc_out_class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(self.enc_out_bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.enc_out_bbox_embed.layers[-1].bias)

    def positions(self, boxes_unact: torch.Tensor) -> None:
        """None: the decoder computes every query's position from its box (training blocks ask this)."""
        return None

    def select(self, enc_class: torch.Tensor, enc_coord_unact: torch.Tensor, level_ids: torch.Tensor, k: int,
               shapes: Shapes) -> torch.Tensor:
        """(B, k) token indices, best first by the largest class logit; on maps smaller than k they repeat."""
        num_tokens = enc_class.shape[1]
        topk = torch.topk(enc_class.max(-1)[0], min(k, num_tokens), dim=1)[1]
        if num_tokens < k:
            topk = topk[:, torch.arange(k, device=topk.device) % num_tokens]
        return topk

    def forward(self, memory: torch.Tensor, levels: Levels, extra: Sequence[TrainingQueries] = (),
                heads=None) -> Queries:
        bs, _, c = memory.shape
        output_memory, proposals, level_ids = TwoStageQueries.encoder_proposals(memory, levels.mask, levels.shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = self.enc_out_class_embed(output_memory)
        enc_coord_unact = self.enc_out_bbox_embed(output_memory) + proposals
        topk = proposal_order(self, enc_class, enc_coord_unact, level_ids, extra, levels.shapes)
        coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
        tgt = self.learned_rows(extra).unsqueeze(0).expand(bs, -1, -1)
        # The encoder stream: the one-to-one tokens' own predictions, boxes not detached.
        q = topk[:, :self.num_queries]
        selected = torch.gather(output_memory, 1, q.unsqueeze(-1).expand(-1, -1, c))
        anchors = torch.gather(proposals, 1, q.unsqueeze(-1).expand(-1, -1, 4))
        enc = {"pred_logits": self.enc_out_class_embed(selected),
               "pred_boxes": coords_unact[:, :self.num_queries].sigmoid(), "anchors": anchors.sigmoid()}
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
    content_embed = "tgt_embed"
    serves_selection_blocks = False  # anchors for the one-to-one queries only
    # This project's names under `queries.` -> the official ones (DN-DETR keeps them on the detector).
    official_prefixes = {"tgt_embed.": "tgt_embed.", "refpoint_embed.": "refpoint_embed."}

    def __init__(self, *, num_queries: int = 300, d_model: int = 256, indicator: bool = False):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
        self.num_queries, self.d_model, self.indicator = num_queries, d_model, indicator
        self.tgt_embed = nn.Embedding(num_queries, d_model - int(indicator))
        self.refpoint_embed = nn.Embedding(num_queries, 4)

    def positions(self, boxes_unact: torch.Tensor) -> None:
        """None: the decoder computes every query's position from its box (training blocks ask this)."""
        return None

    def forward(self, memory: torch.Tensor, levels: Levels, extra: Sequence[TrainingQueries] = (),
                heads=None) -> Queries:
        bs = memory.shape[0]
        tgt = self.tgt_embed.weight
        if self.indicator:
            tgt = torch.cat([tgt, tgt.new_zeros(tgt.shape[0], 1)], 1)
        reference = self.refpoint_embed.weight.sigmoid()
        return Queries(tgt.unsqueeze(0).expand(bs, -1, -1), None, reference.unsqueeze(0).expand(bs, -1, -1), {})


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

    def __init__(self, *, num_queries: int = 300, d_model: int = 256, mixed_selection: bool = False,
                 pix_trans: bool = False, pre_nms_per_level: int = 1000, iou_threshold: float = 0.9):
        super().__init__(num_queries=num_queries, d_model=d_model, mixed_selection=mixed_selection,
                         pix_trans=pix_trans)
        if pre_nms_per_level < 1 or not 0 <= iou_threshold <= 1:
            raise ValueError(f"pre_nms_per_level={pre_nms_per_level} / iou_threshold={iou_threshold}: use "
                             "pre_nms_per_level >= 1 and iou_threshold in [0, 1].")
        self.pre_nms_per_level = pre_nms_per_level
        self.iou_threshold = iou_threshold

    @torch.no_grad()
    def select(self, enc_class: torch.Tensor, enc_coord_unact: torch.Tensor, level_ids: torch.Tensor, k: int,
               shapes: Shapes | None = None) -> torch.Tensor:
        """(B, k) token indices in global score order.

        The one place of the model that waits for the device: how many boxes survive NMS depends on
        the data (one NMS per image). Everything else is read from `shapes` (the levels' (H, W) as
        Python ints; without them the level sizes are counted from `level_ids`, which are contiguous
        per level) and stays on the device. Kept in this one method so that it can be swapped out.
        """
        logits = enc_class[..., 0]
        boxes = cxcywh_to_xyxy(enc_coord_unact.sigmoid().float()).clamp(0, 1)
        sizes = [h * w for h, w in shapes] if shapes is not None else torch.bincount(level_ids).tolist()
        num_levels = len(sizes)
        per_level = k // num_levels
        # Every image's top tokens of each level (a level is a slice of the tokens), level by level.
        candidates, start = [], 0
        for size in sizes:
            if size:
                top = logits[:, start:start + size].topk(min(self.pre_nms_per_level, size), dim=1)[1]
                candidates.append(top + start)
            start += size
        candidates = torch.cat(candidates, 1)
        levels = torch.arange(num_levels, device=logits.device)[:, None]
        picks = []
        for b in range(logits.shape[0]):
            cand = candidates[b]
            keep = cand[batched_nms(boxes[b, cand], logits[b, cand].float(), level_ids[cand], self.iou_threshold)]
            if keep.numel() < k:  # too few survivors: plain top-k (cycling on tiny maps)
                picks.append(super().select(enc_class[b:b + 1], enc_coord_unact[b:b + 1], level_ids, k, shapes)[0])
                continue
            onehot = level_ids[keep][None] == levels
            chosen = (onehot & (onehot.cumsum(1) <= per_level)).any(0)
            # Fill up with the first (best) leftovers: exactly k chosen, taken in `keep` order.
            leftover = ~chosen
            chosen = chosen | (leftover & (leftover.cumsum(0) <= k - chosen.sum()))
            picks.append(keep[chosen.to(torch.uint8).argsort(descending=True, stable=True)[:k]])
        return torch.stack(picks)


class DenoisingQueries(TrainingQueries, Seeded):
    """DN-DETR's denoising queries: `groups` noised copies of every ground-truth box and label,
    whose predictions are supervised with their own GT (no matching). Each group sees the
    one-to-one queries but no other group, and the one-to-one queries see none of them.

    A group holds as many queries as the batch's largest GT count (images with fewer GTs pad with
    empty queries). A query's content is its (noised) label's embedding, its reference its noised box,
    its position the query selection's embedding of that box: the selection must make box
    references (a two-stage model, or AnchorQueries). Noise is drawn on the CPU from the block's own
    generator, so a run is reproducible and resumes bit for bit.

    Args:
        groups: noised copies of the GTs (DN-DETR's --scalar, 5).
        label_noise: probability of replacing a label by a random class (DN-DETR: 0.2).
        box_noise: scale of the box noise (DN-DETR: 0.4): the centre moves by up to
            box_noise * (w/2, h/2), the size by up to box_noise * (w, h).
        seed: seed of the noise generator (None: torch's global generator).
        label_book: the label embedding has label_book + 1 rows (DN-DETR's and DINO's label_enc;
            rows past the class count are never looked up); None: one row per class.
        logit_eps: the official code hands its noised boxes to the decoder as logits clamped at this
            eps (its inverse_sigmoid, 1e-3 in DN-DETR and DINO), so a coordinate within eps of 0 or 1
            starts at eps or 1 - eps; None: the boxes as they are.
        indicator: DN-DETR's indicator feature: the label embedding is d_model - 1 wide and every
            denoising query gets a constant 1 as its last feature (the selection's queries a 0:
            `AnchorQueries(indicator=true)`); padding queries are all zeros.
    """

    stream = "dn_outputs"
    needs_targets = True
    sees_one_to_one = True
    parts_per_group: ClassVar[int] = 1  # positives only

    def __init__(self, *, groups: int = 5, label_noise: float = 0.2, box_noise: float = 0.4,
                 seed: int | None = None, label_book: int | None = None, logit_eps: float | None = None,
                 indicator: bool = False):
        super().__init__()
        if groups < 1 or not 0 <= label_noise <= 1 or box_noise < 0:
            raise ValueError(f"groups={groups} / label_noise={label_noise} / box_noise={box_noise}: use groups >= 1, "
                             "label_noise in [0, 1] and box_noise >= 0.")
        if logit_eps is not None and not 0 < logit_eps < 0.5:
            raise ValueError(f"logit_eps must be in (0, 0.5) or null, got {logit_eps}.")
        self.groups, self.label_noise, self.box_noise = groups, label_noise, box_noise
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.label_book = label_book
        self.logit_eps = logit_eps
        self.indicator = indicator

    def seed_rank(self, rank: int) -> None:
        """Process `rank` draws its own noise (seed + rank), as the assigners do."""
        if self.generator is not None:
            self.generator.manual_seed(self.seed + rank)

    def bind(self, *, name: str, selection: QuerySelection, num_classes: int) -> None:
        if not hasattr(selection, "positions"):
            raise ValueError(f"training_queries.{name} (denoising) starts queries from noised GT boxes, which needs "
                             "box references: use a two-stage model (e.g. model=deformable_detr_pp) or learned "
                             "anchor boxes (model=dab_deformable_detr).")
        if self.label_book is not None and self.label_book < num_classes:
            raise ValueError(f"training_queries.{name}: label_book={self.label_book} is smaller than the "
                             f"{num_classes} classes; use at least the class count.")
        self.num_classes = num_classes
        rows = num_classes if self.label_book is None else self.label_book + 1
        self.label_embed = nn.Embedding(rows, selection.d_model - int(self.indicator))

    def num_groups(self, largest: int) -> int:
        return self.groups

    def sizes(self, num_queries: int, targets=None) -> list[int]:
        largest = max((len(t["labels"]) for t in targets), default=0) if targets is not None else 0
        if not largest:
            return []
        return [largest * self.parts_per_group] * self.num_groups(largest)

    def _uniform(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    @property
    def flip_rate(self) -> float:
        """The probability that a label is replaced by a random class."""
        return self.label_noise

    def noised_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label replaced by a random class with probability `flip_rate`."""
        flip = (self._uniform(labels.shape[0]) < self.flip_rate).to(labels.device, non_blocking=True)
        other = torch.randint(0, self.num_classes, labels.shape, generator=self.generator)
        return torch.where(flip, other.to(labels.device, non_blocking=True), labels)

    def noised_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """DN-DETR: centre +- box_noise * (w/2, h/2), size +- box_noise * (w, h), clamped to [0, 1]
        (`negative` rows: none here)."""
        shift = (self._uniform(*boxes.shape) * 2 - 1).to(boxes.device, non_blocking=True)
        scale = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
        return (boxes + shift * scale * self.box_noise).clamp(0.0, 1.0)

    def as_reference(self, boxes: torch.Tensor) -> torch.Tensor:
        """The decoder's reference boxes of the noised boxes: through the clamped logits of `logit_eps`."""
        return boxes if self.logit_eps is None else inverse_sigmoid(boxes, self.logit_eps).sigmoid()

    def build(self, targets, selection: QuerySelection) -> Queries:
        """The block's queries for this batch, (B, groups * parts * largest GT count, ...): per group
        the positives (and, contrastive, then the negatives), each padded to the largest GT count."""
        sizes = self.sizes(selection.num_queries, targets)
        copies = len(sizes) * self.parts_per_group  # noised copies of every GT
        largest = sizes[0] // self.parts_per_group if sizes else 0
        width = selection.d_model
        contents, references = [], []
        for t in targets:
            n = len(t["labels"])
            # Copy c of GT j is row c * n + j; copies alternate positive / negative when contrastive.
            negative = (torch.arange(copies * n, device=t["boxes"].device) // max(n, 1)) % self.parts_per_group == 1
            labels = self.noised_labels(t["labels"].repeat(copies))
            boxes = self.noised_boxes(t["boxes"].to(self.label_embed.weight.dtype).repeat(copies, 1), negative)
            content = self.label_embed(labels)
            if self.indicator:  # DN-DETR: a denoising query's last feature is 1
                content = torch.cat([content, content.new_ones(content.shape[0], 1)], 1)
            content = content.view(copies, n, width)
            boxes = boxes.view(copies, n, 4)
            # Padding queries: no content, the box of logit 0 (centre and size 0.5), as officially.
            content = torch.cat([content, content.new_zeros(copies, largest - n, width)], 1)
            boxes = torch.cat([boxes, boxes.new_full((copies, largest - n, 4), 0.5)], 1)
            contents.append(content.reshape(copies * largest, width))
            references.append(boxes.reshape(copies * largest, 4))
        reference = self.as_reference(torch.stack(references))
        tgt = torch.stack(contents)
        return Queries(tgt, selection.positions(inverse_sigmoid(reference)), reference, {})


class ContrastiveDenoisingQueries(DenoisingQueries):
    """DINO's contrastive denoising (CDN): every group has a positive and a negative noised copy of
    each GT. Positives move by less than `box_noise` (relative to half the box size, per corner) and
    learn to reconstruct their GT; negatives move by between one and two times that and learn "no
    object" (supervised as background).

    Args:
        max_positives: DINO's dn_number (100). The group count follows DINO's `prepare_for_cdn`,
            which doubles it first (a positive and a negative per GT): d = 2 * dn_number; from
            d >= 100 (dn_number >= 50) groups = d // (2 * the batch's largest GT count), at least 1,
            i.e. about dn_number positives; below that groups = d itself (dn_number 10 -> 20 groups).
        label_noise: DINO's dn_label_noise_ratio (0.5): a label changes with half this probability.
        box_noise: DINO's dn_box_noise_scale (0.4).
        seed: seed of the noise generator.
        label_book: DINO's dn_labelbook_size (see `DenoisingQueries`).
        logit_eps: DINO's inverse_sigmoid clamp of the noised boxes, 1e-3 (see `DenoisingQueries`).
    """

    parts_per_group = 2

    def __init__(self, *, max_positives: int = 100, label_noise: float = 0.5, box_noise: float = 0.4,
                 seed: int | None = None, label_book: int | None = None, logit_eps: float | None = None):
        super().__init__(groups=1, label_noise=label_noise, box_noise=box_noise, seed=seed, label_book=label_book,
                         logit_eps=logit_eps)
        if max_positives < 1:
            raise ValueError(f"max_positives must be >= 1, got {max_positives}.")
        self.max_positives = max_positives

    def num_groups(self, largest: int) -> int:
        doubled = 2 * self.max_positives
        if doubled >= 100:
            return max(1, doubled // (2 * largest))
        return doubled

    @property
    def flip_rate(self) -> float:
        return self.label_noise * 0.5  # DINO flips half as many labels as its ratio says

    def noised_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Corners (x0, y0, x1, y1) move by sign * u * box_noise * (w/2, h/2), u in [0, 1) for
        positives and [1, 2) for negatives; clamped to [0, 1]."""
        sign = (torch.randint(0, 2, boxes.shape, generator=self.generator) * 2 - 1).to(boxes.device, non_blocking=True)
        u = self._uniform(*boxes.shape).to(boxes.device, non_blocking=True) + negative[:, None].to(boxes.dtype)
        half = boxes[:, 2:] / 2
        corners = torch.cat([boxes[:, :2] - half, boxes[:, :2] + half], 1)
        corners = (corners + sign * u * half.repeat(1, 2) * self.box_noise).clamp(0.0, 1.0)
        return torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1)


def block_ids(sizes: Sequence[int], device) -> torch.Tensor:
    """(T,) the attention block of every query, for sizes [one-to-one, block, block, ...]."""
    # Built on the device from Python ints: no host-to-device copy, no size read back.
    return torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(sizes)])

