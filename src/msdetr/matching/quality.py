"""One-to-many assigners built on a match-quality matrix: MS-DETR's mixed score, DETA's IoU stages.

Both follow the same steps (per image, no gradient): quality (G, N) -> each candidate's best GT,
positive / negative by thresholds, low-quality rescue -> a random cap on the positives -> for each
GT with c positives its top-min(c, k) candidates by quality over *all* candidates.

Shared code, not shared rules: a candidate may sit in the top-k of two GTs, and the criterion gives
such a query the class of its *last* pair (the official `target_classes[idx] = labels`, last write
wins), so the order in which an assigner lists its pairs is part of its rule. Each assigner keeps
its own official order (`pair_order`):
- "quality" (MS-DETR's `sample_topk_per_gt`, which ends with a sort): every pair of the image by
  ascending quality, so a query claimed twice ends with its best GT;
- "gt" (DETA's `sample_topk_per_gt`, no final sort): GT by GT in ascending GT index, each GT's
  candidates by descending quality as top-k returns them, so a query claimed twice ends with the GT
  of the larger index, whichever is better.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..box_ops import at_least_float32, box_iou, cxcywh_to_xyxy
from .base import Assigner, Indices

LOW_QUALITY = ("none", "best", "ties")
PAIR_ORDERS = ("quality", "gt")


def quality_assign(
    quality: torch.Tensor,
    threshold: float,
    low_quality: str = "best",
    ignore_below: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, N) quality -> per candidate its best GT, a positive mask and a negative mask.

    Positive: best quality >= `threshold`; negative: below `ignore_below` (default the threshold),
    ignored in between. Low-quality rescue makes every GT's best candidate positive, keeping its own
    best GT: "best" one per GT (MS-DETR's `topk(1)`), "ties" all tied ones (DETA, the RPN rule).
    """
    if low_quality not in LOW_QUALITY:
        raise ValueError(f"unknown low_quality {low_quality!r}; use one of {LOW_QUALITY}.")
    best_val, best_gt = quality.max(dim=0)
    positive = best_val >= threshold
    negative = best_val < (threshold if ignore_below is None else ignore_below)
    if low_quality == "best" and quality.shape[1]:
        positive[quality.argmax(dim=1)] = True
    elif low_quality == "ties":
        positive |= (quality == quality.max(dim=1, keepdim=True).values).any(dim=0)
    return best_gt, positive, negative & ~positive


def order_pairs(
    values: torch.Tensor, cand: torch.Tensor, gt: torch.Tensor, pair_order: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept (candidate, GT) pairs, given GT by GT in top-k order (each GT's candidates by
    descending quality `values`), listed in `pair_order`: as they are ("gt"), or all sorted by
    ascending quality ("quality")."""
    if pair_order == "quality":
        order = values.argsort()
        cand, gt = cand[order], gt[order]
    return cand, gt


class QualityTopKAssigner(Assigner):
    """The shared procedure; subclasses define the quality matrix and their official `pair_order`
    (a class attribute; the `pair_order` argument overrides it, e.g. for a hybrid of two papers).
    `assign_many` assigns the calls of all of them at once."""

    pair_order: str  # one of PAIR_ORDERS, set by each subclass

    def __init__(
        self,
        threshold: float,
        k: int,
        positive_fraction: float,
        low_quality: str,
        sample_size: int | None = None,
        ignore_below: float | None = None,
        seed: int | None = None,
        pair_order: str | None = None,
    ):
        if k < 1:
            raise ValueError(f"the assigner's k must be >= 1, got {k}.")
        if not 0 < positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}.")
        if low_quality not in LOW_QUALITY:
            raise ValueError(f"unknown low_quality {low_quality!r}; use one of {LOW_QUALITY}.")
        if pair_order is not None:
            if pair_order not in PAIR_ORDERS:
                raise ValueError(f"unknown pair_order {pair_order!r}; use one of {PAIR_ORDERS}.")
            self.pair_order = pair_order
        self.threshold, self.k, self.positive_fraction = threshold, k, positive_fraction
        self.low_quality, self.sample_size, self.ignore_below = (
            low_quality,
            sample_size,
            ignore_below,
        )
        # A generator of the run's seed keeps the random cap reproducible; None uses torch's global
        # RNG.
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def quality(self, outputs: dict, b: int, target: dict) -> torch.Tensor:
        raise NotImplementedError

    def cap(self, num_candidates: int) -> int:
        """The most positives an image keeps before the top-k step."""
        return int(self.positive_fraction * (self.sample_size or num_candidates))

    @classmethod
    @torch.no_grad()
    def assign_many(cls, calls) -> list[Indices]:
        """Several calls (e.g. every decoder layer of a step, of MS-DETR's and DETA's assigners
        alike) at once: per call what `assigner(outputs, targets)` returns, with one device-to-host
        copy and one host-to-device copy in all, whatever the number of calls and images.

        Per image: the quality and `quality_assign` on the device; on the host the random cap
        (`select_on_host`), drawn call by call and image by image in the given order; then the
        per-GT top-k and, for the "quality" pair order, the final sort on the device.
        """
        # (call, image, quality, per candidate: best GT if positive, -2 negative, -1 ignored)
        jobs = []
        out: list[list] = []
        for c, (assigner, outputs, targets) in enumerate(calls):
            device = outputs["pred_logits"].device
            out.append([None] * len(targets))
            for b, tgt in enumerate(targets):
                if len(tgt["labels"]) == 0:
                    empty = torch.zeros(0, dtype=torch.int64, device=device)
                    out[c][b] = (empty, empty)
                    continue
                q = assigner.quality(outputs, b, tgt)
                best_gt, positive, negative = quality_assign(
                    q, assigner.threshold, assigner.low_quality, assigner.ignore_below
                )
                jobs.append((c, b, q, best_gt.masked_fill(~positive, -1).masked_fill(negative, -2)))
        if not jobs:
            return out
        # The one device-to-host copy: per candidate its best GT where positive, -2 negative, -1
        # ignored.
        device = jobs[0][2].device
        host = torch.cat([encoded for *_, encoded in jobs]).cpu()
        specs = []
        for c, _, q, _ in jobs:
            assigner = calls[c][0]
            cap = assigner.cap(calls[c][1]["pred_logits"].shape[1])
            specs.append(
                HostSpec(
                    q.shape[0], q.shape[1], cap, min(assigner.k, q.shape[1]), assigner.generator
                )
            )
        positions = cls.select_on_host(host, specs)
        sizes = [len(p) for p in positions]
        # The one host-to-device copy (non-blocking: the host does not wait for it).
        flat_positions = torch.as_tensor(np.concatenate(positions), dtype=torch.int64)
        flat_positions = flat_positions.to(device, non_blocking=True)
        for (c, b, q, _), pos in zip(jobs, flat_positions.split(sizes)):
            assigner = calls[c][0]
            k = min(assigner.k, q.shape[1])
            values, cand = q.topk(k, dim=1)
            # `pos` is row-major over the (G, k) top-k: GT ascending, each GT's candidates
            # descending.
            gt = torch.div(pos, max(k, 1), rounding_mode="floor")
            out[c][b] = order_pairs(
                values.flatten()[pos], cand.flatten()[pos], gt, assigner.pair_order
            )
        return out

    @staticmethod
    def select_on_host(host: torch.Tensor, specs: list[HostSpec]) -> list[np.ndarray]:
        """The host part of `assign_many`. `host`: a CPU tensor, per image (concatenated) per
        candidate its best GT where positive, -2 where negative, -1 where ignored. Per image: the
        random cap, drawn as the official `subsample_labels` draws (a permutation of the positives,
        then one of the negatives, whether or not the cap binds: so the random stream moves on as
        the official code's does), then which entries of the (G, k) top-k matrix are kept, as flat
        positions in row-major order (GT g: its first min(c_g, k) entries, c_g its capped
        positives)."""
        values = host.numpy()
        positions, start = [], 0
        for spec in specs:
            enc = values[start : start + spec.num_candidates]
            start += spec.num_candidates
            kept = np.flatnonzero(enc >= 0)  # the positives, ascending (as `nonzero` lists them)
            perm = torch.randperm(kept.size, device="cpu", generator=spec.generator)
            torch.randperm(int((enc == -2).sum()), device="cpu", generator=spec.generator)
            kept = kept[perm[: spec.cap].numpy()]
            counts = np.minimum(np.bincount(enc[kept], minlength=spec.num_gt), spec.k)
            positions.append(
                np.concatenate(
                    [
                        np.arange(spec.k * g, spec.k * g + n, dtype=np.int64)
                        for g, n in enumerate(counts)
                    ]
                )
            )
        return positions


class HostSpec(NamedTuple):
    """One image of one assigner call, as `QualityTopKAssigner.select_on_host` needs it."""

    num_gt: int
    num_candidates: int
    cap: int  # the most positives kept
    k: int  # top-k per GT, at most num_candidates
    generator: torch.Generator | None


class MixedScoreTopKAssigner(QualityTopKAssigner):
    """MS-DETR's one-to-many assigner: quality = box_weight * IoU + class_weight * p[label].

    The released models used threshold 0.4, k 6, weights 0.7 / 0.3, positive fraction 0.25 of the
    queries and the single-best low-quality rescue. Pairs by ascending quality ("quality"), as the
    official code sorts them: a query in the top-k of two GTs takes the class of the better one.
    """

    pair_order = "quality"

    def __init__(
        self,
        threshold: float = 0.4,
        k: int = 6,
        box_weight: float = 0.7,
        class_weight: float = 0.3,
        positive_fraction: float = 0.25,
        low_quality: str = "best",
        seed: int | None = None,
        pair_order: str | None = None,
    ):
        super().__init__(
            threshold, k, positive_fraction, low_quality, seed=seed, pair_order=pair_order
        )
        self.box_weight, self.class_weight = box_weight, class_weight

    def quality(self, outputs: dict, b: int, target: dict) -> torch.Tensor:
        boxes = at_least_float32(outputs["pred_boxes"][b].detach())
        iou = box_iou(cxcywh_to_xyxy(target["boxes"].to(boxes.dtype)), cxcywh_to_xyxy(boxes))
        prob = at_least_float32(outputs["pred_logits"][b].detach()).sigmoid()[:, target["labels"]].T
        return self.box_weight * iou + self.class_weight * prob


class IoUTopKAssigner(QualityTopKAssigner):
    """DETA's IoU assigners: quality = IoU(GT, outputs[box_key]).

    Stage 1 (encoder): box_key="anchors", threshold 0.7, ignore_below 0.3, sample_size 256,
    positive_fraction 0.5, k 4. Stage 2 (decoder): box_key="init_reference" (the decoder's input
    proposals), threshold 0.6, positive_fraction 0.25 of the queries, k 4. Both rescue ties.
    Pairs GT by GT ("gt"), as DETA returns them unsorted: a proposal in the top-k of two GTs takes
    the class of the GT with the larger index (only stage 2 shows it; stage 1 is class-agnostic).
    """

    pair_order = "gt"

    def __init__(
        self,
        box_key: str = "init_reference",
        threshold: float = 0.6,
        k: int = 4,
        positive_fraction: float = 0.25,
        sample_size: int | None = None,
        ignore_below: float | None = None,
        low_quality: str = "ties",
        seed: int | None = None,
        pair_order: str | None = None,
    ):
        super().__init__(
            threshold,
            k,
            positive_fraction,
            low_quality,
            sample_size,
            ignore_below,
            seed,
            pair_order,
        )
        self.box_key = box_key

    def quality(self, outputs: dict, b: int, target: dict) -> torch.Tensor:
        if self.box_key not in outputs:
            raise KeyError(
                f"the IoU assigner matches against outputs[{self.box_key!r}], which this stream "
                "lacks; use a two-stage model."
            )
        boxes = at_least_float32(outputs[self.box_key][b].detach())
        return box_iou(cxcywh_to_xyxy(target["boxes"].to(boxes.dtype)), cxcywh_to_xyxy(boxes))
