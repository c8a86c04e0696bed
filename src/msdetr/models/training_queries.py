"""Training-only query blocks: queries that exist only in training, each supervised through an
output stream of its own and kept apart from the other queries by the decoder's self-attention mask.

Two kinds, by where a block's queries come from (`needs_targets`):

- from the query selection: H-DETR's one-to-many queries (`HybridQueries`), Group DETR's groups
  (`QueryGroups`). The detector hands these blocks to the selection (its `extra`), which takes
  proposals for them (`proposals`: "ranked" or "shared") and appends their learned rows (`embed`,
  made by `bind`).
- from the batch's targets: DN-DETR's denoising (`DenoisingQueries`) and DINO's contrastive
  denoising (`ContrastiveDenoisingQueries`), with their noise. The detector calls
  `build(targets, selection)` and appends the `Queries` it returns; the detector's forward then
  needs the targets (`DeformableDETR.needs_targets`; `DetectionModule` passes them in training).

What `DeformableDETR` does with every block, of either kind: `bind(name=, selection=,
num_classes=)` once when it is built (the block refuses, in one sentence, a selection it cannot
serve); its `stream` must be a key `DetectorOutput` declares (models/outputs.py), one block per
stream. In a training forward the selection's blocks come first, then the target blocks, each kind
in config order; `sizes(q, targets)` gives each block's self-attention groups (a group sees itself,
and with `sees_one_to_one` the one-to-one queries too, which never see it); the decoder's
predictions for a block's queries become `out[stream]`. So a new block of one of these two kinds
is a subclass, its stream and its config, and the detector's forward does not change; a new kind
(queries from anywhere else, another attention pattern) changes `DeformableDETR.forward` and
`self_attn_mask`. Blocks with a generator of their own (`generator`, `seed_rank`) are seeded per
rank and saved with the checkpoint's random state by `DetectionModule`, as the assigners are.
See docs/architecture.md, "Adding a training-query block".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ..box_ops import inverse_sigmoid
from ..seeded import Seeded
from .queries import Queries, QuerySelection


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
            raise ValueError(
                f"training_queries.{name} ({type(self).__name__}) takes its queries from the query "
                f"selection, and {type(selection).__name__} has no anchors for them; use a "
                "two-stage model (e.g. model=deformable_detr_pp)."
            )
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
            raise ValueError(
                f"QueryGroups needs groups >= 2 (group 0 is the one-to-one queries), got {groups}."
            )
        self.groups = groups

    def sizes(self, num_queries: int, targets=None) -> list[int]:
        return [num_queries] * (self.groups - 1)

    def bind(self, *, name: str, selection: QuerySelection, num_classes: int) -> None:
        if selection.embedding_dim is None:
            raise ValueError(
                f"training_queries.{name} (Group DETR) shares the two-stage proposals across its "
                "groups, so the groups need learned content: set "
                "model.detector.queries.mixed_selection=true (the ++ models have it)."
            )
        super().bind(name=name, selection=selection, num_classes=num_classes)


class DenoisingQueries(TrainingQueries, Seeded):
    """DN-DETR's denoising queries: `groups` noised copies of every ground-truth box and label,
    whose predictions are supervised with their own GT (no matching). Each group sees the
    one-to-one queries but no other group, and the one-to-one queries see none of them.

    A group holds as many queries as the batch's largest GT count (images with fewer GTs pad with
    empty queries). A query's content is its (noised) label's embedding, its reference its noised
    box,
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
            eps (its inverse_sigmoid, 1e-3 in DN-DETR and DINO), so a coordinate within eps of 0 or
            1 starts at eps or 1 - eps; None: the boxes as they are.
        indicator: DN-DETR's indicator feature: the label embedding is d_model - 1 wide and every
            denoising query gets a constant 1 as its last feature (the selection's queries a 0:
            `AnchorQueries(indicator=true)`); padding queries are all zeros.
    """

    stream = "dn_outputs"
    needs_targets = True
    sees_one_to_one = True
    parts_per_group: ClassVar[int] = 1  # positives only

    def __init__(
        self,
        *,
        groups: int = 5,
        label_noise: float = 0.2,
        box_noise: float = 0.4,
        seed: int | None = None,
        label_book: int | None = None,
        logit_eps: float | None = None,
        indicator: bool = False,
    ):
        super().__init__()
        if groups < 1 or not 0 <= label_noise <= 1 or box_noise < 0:
            raise ValueError(
                f"groups={groups} / label_noise={label_noise} / box_noise={box_noise}: use groups "
                ">= 1, label_noise in [0, 1] and box_noise >= 0."
            )
        if logit_eps is not None and not 0 < logit_eps < 0.5:
            raise ValueError(f"logit_eps must be in (0, 0.5) or null, got {logit_eps}.")
        self.groups, self.label_noise, self.box_noise = groups, label_noise, box_noise
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.label_book = label_book
        self.logit_eps = logit_eps
        self.indicator = indicator

    def bind(self, *, name: str, selection: QuerySelection, num_classes: int) -> None:
        if not selection.box_positions:
            raise ValueError(
                f"training_queries.{name} (denoising) starts queries from noised GT boxes, which "
                "needs box references: use a two-stage model (e.g. model=deformable_detr_pp) or "
                "learned anchor boxes (model=dab_deformable_detr)."
            )
        if self.label_book is not None and self.label_book < num_classes:
            raise ValueError(
                f"training_queries.{name}: label_book={self.label_book} is smaller than the "
                f"{num_classes} classes; use at least the class count."
            )
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
        flip = (self._uniform(labels.shape[0]) < self.flip_rate).to(
            labels.device, non_blocking=True
        )
        other = torch.randint(0, self.num_classes, labels.shape, generator=self.generator)
        return torch.where(flip, other.to(labels.device, non_blocking=True), labels)

    def noised_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """DN-DETR: centre +- box_noise * (w/2, h/2), size +- box_noise * (w, h), clamped to [0, 1]
        (`negative` rows: none here)."""
        shift = (self._uniform(*boxes.shape) * 2 - 1).to(boxes.device, non_blocking=True)
        scale = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
        return (boxes + shift * scale * self.box_noise).clamp(0.0, 1.0)

    def as_reference(self, boxes: torch.Tensor) -> torch.Tensor:
        """The decoder's reference boxes of the noised boxes: through the clamped logits of
        `logit_eps`."""
        return boxes if self.logit_eps is None else inverse_sigmoid(boxes, self.logit_eps).sigmoid()

    def build(self, targets, selection: QuerySelection) -> Queries:
        """The block's queries for this batch, (B, groups * parts * largest GT count, ...): per
        group the positives (and, contrastive, then the negatives), each padded to the largest GT
        count."""
        sizes = self.sizes(selection.num_queries, targets)
        copies = len(sizes) * self.parts_per_group  # noised copies of every GT
        largest = sizes[0] // self.parts_per_group if sizes else 0
        width = selection.d_model
        contents, references = [], []
        for t in targets:
            n = len(t["labels"])
            # Copy c of GT j is row c * n + j; copies alternate positive / negative when
            # contrastive.
            negative = (
                torch.arange(copies * n, device=t["boxes"].device) // max(n, 1)
            ) % self.parts_per_group == 1
            labels = self.noised_labels(t["labels"].repeat(copies))
            boxes = self.noised_boxes(
                t["boxes"].to(self.label_embed.weight.dtype).repeat(copies, 1), negative
            )
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
            i.e. about dn_number positives; below that groups = d itself (dn_number 10 -> 20
            groups).
        label_noise: DINO's dn_label_noise_ratio (0.5): a label changes with half this probability.
        box_noise: DINO's dn_box_noise_scale (0.4).
        seed: seed of the noise generator.
        label_book: DINO's dn_labelbook_size (see `DenoisingQueries`).
        logit_eps: DINO's inverse_sigmoid clamp of the noised boxes, 1e-3 (see `DenoisingQueries`).
    """

    parts_per_group = 2

    def __init__(
        self,
        *,
        max_positives: int = 100,
        label_noise: float = 0.5,
        box_noise: float = 0.4,
        seed: int | None = None,
        label_book: int | None = None,
        logit_eps: float | None = None,
    ):
        super().__init__(
            groups=1,
            label_noise=label_noise,
            box_noise=box_noise,
            seed=seed,
            label_book=label_book,
            logit_eps=logit_eps,
        )
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
        sign = (torch.randint(0, 2, boxes.shape, generator=self.generator) * 2 - 1).to(
            boxes.device, non_blocking=True
        )
        u = self._uniform(*boxes.shape).to(boxes.device, non_blocking=True) + negative[:, None].to(
            boxes.dtype
        )
        half = boxes[:, 2:] / 2
        corners = torch.cat([boxes[:, :2] - half, boxes[:, :2] + half], 1)
        corners = (corners + sign * u * half.repeat(1, 2) * self.box_noise).clamp(0.0, 1.0)
        return torch.cat(
            [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1
        )


def block_ids(sizes: Sequence[int], device) -> torch.Tensor:
    """(T,) the attention block of every query, for sizes [one-to-one, block, block, ...]."""
    # Built on the device from Python ints: no host-to-device copy, no size read back.
    return torch.cat(
        [torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(sizes)]
    )
