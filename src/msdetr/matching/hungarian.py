"""One-to-one Hungarian assignment with the focal / L1 / GIoU cost of Deformable-DETR, and
optionally Mask DINO's mask costs (sigmoid BCE and dice on uniform points)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..box_ops import at_least_float32, cxcywh_to_xyxy, generalized_box_iou
from ..losses.masks import NUM_POINTS, map_points, mask_match_costs, uniform_points
from ..models.masks import embed_point_logits
from .base import Assigner, Indices


def focal_class_cost(
    prob: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """(Q, C) probabilities, (n,) labels -> (Q, n) focal cost of predicting each label."""
    prob = prob[:, labels]
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(Assigner):
    """Per image, the minimum-cost one-to-one matching of queries to ground truths.

    `box_key` chooses the boxes that are matched: `pred_boxes` (Deformable-DETR) or `anchors`
    (MS-DETR's encoder loss, with cost_class=0). `group_size` splits the queries into consecutive
    blocks of that many, each matched to all GTs on its own (Group DETR's extra groups). Costs are
    built in the outputs' precision (fp32 at least) on their device; `assign_many` copies those of
    all its calls to the host in one transfer. `giou_eps`: see `box_ops.generalized_box_iou`
    (DINO: 1e-6).

    `cost_mask`, `cost_dice` (0: off; Mask DINO: 5.0 each): the mask BCE and dice costs of every
    (query, GT) pair, on `num_points` uniform points of each image's valid region shared by all its
    queries and GTs (`losses.masks.mask_match_costs`' rule). They apply where the layer carries
    mask embeddings (`mask_embed`, a detector with a mask head): never on the encoder stream,
    which is matched on boxes alone. The query's logits at the points come from its embedding and
    the pixel embedding sampled there (`embed_point_logits`: no mask map is made); the GTs'
    values from the bool masks (`sample_gt_masks`). The points are drawn from torch's generator
    on the outputs' device (seeded per process, saved with every checkpoint).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_key: str = "pred_boxes",
        group_size: int | None = None,
        giou_eps: float = 0.0,
        cost_mask: float = 0.0,
        cost_dice: float = 0.0,
        num_points: int = NUM_POINTS,
    ):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError(
                "all Hungarian matcher costs are 0; set at least one of "
                "cost_class/cost_bbox/cost_giou."
            )
        if cost_mask < 0 or cost_dice < 0 or num_points < 1:
            raise ValueError(
                f"Hungarian matcher cost_mask={cost_mask}, cost_dice={cost_dice}, num_points="
                f"{num_points}: use costs >= 0 (0: off) and at least one point."
            )
        if group_size is not None and group_size < 1:
            raise ValueError(
                f"Hungarian matcher group_size={group_size}; use a positive query count or null."
            )
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.box_key = box_key
        self.group_size = group_size
        self.giou_eps = giou_eps
        self.cost_mask, self.cost_dice, self.num_points = cost_mask, cost_dice, num_points

    def cost_matrices(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor]:
        """Per image, per query group, the (group_size, n) cost matrix."""
        # In the outputs' own precision (fp32, or fp64 as the official code in float64), never half:
        # near-ties in the cost resolve as the official code resolves them.
        logits = at_least_float32(outputs["pred_logits"])
        boxes = at_least_float32(outputs[self.box_key])
        groups = self._groups(logits.shape[1])
        masks = self.mask_costs(outputs, targets)
        costs: list[torch.Tensor] = []
        for b, tgt in enumerate(targets):
            tgt_boxes = tgt["boxes"].to(boxes.dtype)
            if len(tgt_boxes) == 0:
                c = logits.new_zeros(logits.shape[1], 0)
            else:
                c = self.cost_bbox * torch.cdist(boxes[b], tgt_boxes, p=1)
                c = c - self.cost_giou * generalized_box_iou(
                    cxcywh_to_xyxy(boxes[b]), cxcywh_to_xyxy(tgt_boxes), self.giou_eps
                )
                if self.cost_class:
                    c = c + self.cost_class * focal_class_cost(
                        logits[b].sigmoid(), tgt["labels"], self.alpha, self.gamma
                    )
                if masks is not None:
                    c = c + masks[b].to(c.dtype)
            costs.extend(c.chunk(groups))
        return costs

    @property
    def uses_masks(self) -> bool:
        return bool(self.cost_mask or self.cost_dice)

    def mask_costs(self, outputs: dict, targets: list[dict]) -> list[torch.Tensor] | None:
        """Per image the (Q, n) weighted mask costs, or None where they are off or the layer has
        no mask embeddings. A target whose boxes repeat its masks k times (H-DETR's one-to-many
        branch: GT j is mask j % G) gets the (Q, G) costs repeated k times."""
        if not self.uses_masks or "mask_embed" not in outputs:
            return None
        embed = at_least_float32(outputs["mask_embed"])
        pixel, ratio = outputs["mask_features"], outputs["mask_valid_ratio"]
        b = embed.shape[0]
        coords = uniform_points(b, self.num_points, device=embed.device)  # (B, P, 2) valid region
        points = embed_point_logits(embed, pixel, map_points(coords, ratio))  # (B, Q, P)
        out = []
        for i, tgt in enumerate(targets):
            if "masks" not in tgt:
                raise ValueError(
                    "the Hungarian matcher has mask costs (cost_mask / cost_dice), but the targets "
                    "have no masks; set data.masks=true or matcher.cost.mask=0 and "
                    "matcher.cost.dice=0."
                )
            gt_masks, n = tgt["masks"], len(tgt["boxes"])
            g = gt_masks.shape[0]
            if n == 0 or g == 0:
                out.append(points.new_zeros(points.shape[1], n))
                continue
            bce, dice = mask_match_costs(
                None, gt_masks, None, pred_points=points[i], coords=coords[i : i + 1]
            )
            cost = self.cost_mask * bce + self.cost_dice * dice
            out.append(cost.repeat(1, n // g) if n != g else cost)
        return out

    def _groups(self, num_queries: int) -> int:
        if self.group_size is None:
            return 1
        if num_queries % self.group_size:
            raise ValueError(
                f"{num_queries} queries do not split into groups of {self.group_size}; group_size "
                "must divide the stream's query count."
            )
        return num_queries // self.group_size

    def indices(self, solved: Indices, num_queries: int) -> Indices:
        """The solutions of `cost_matrices`' blocks -> per image (query, GT) pairs over all
        queries."""
        groups = self._groups(num_queries)
        if groups == 1:
            return list(solved)
        out = []
        for i in range(0, len(solved), groups):
            rows, cols, offset = [], [], 0
            for block_rows, block_cols in solved[i : i + groups]:
                rows.append(block_rows + offset)
                cols.append(block_cols)
                offset += self.group_size or 0  # None: one group, no offset
            out.append((torch.cat(rows), torch.cat(cols)))
        return out

    @classmethod
    @torch.no_grad()
    def assign_many(cls, calls) -> list[Indices]:
        """The cost matrices of every call and image (whatever matchers made them) solved with
        scipy after a single device-to-host copy; the solutions go back in a single (non-blocking)
        host-to-device copy."""
        costs = [assigner.cost_matrices(outputs, targets) for assigner, outputs, targets in calls]
        flat_costs = [c for per_call in costs for c in per_call]
        if not flat_costs:
            return [[] for _ in calls]
        device = flat_costs[0].device
        flat = torch.cat([c.flatten() for c in flat_costs]).cpu()
        solved = cls.solve_on_host(flat, [(c.shape[0], c.shape[1]) for c in flat_costs])
        sizes = [len(rows) for rows, _ in solved]
        pairs = np.concatenate(
            [
                np.stack([np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)])
                for rows, cols in solved
            ],
            axis=1,
        )
        moved = torch.as_tensor(pairs, dtype=torch.int64).to(device, non_blocking=True)
        blocks = list(zip(moved[0].split(sizes), moved[1].split(sizes)))
        out = []
        for (assigner, outputs, _), per_call in zip(calls, costs):
            out.append(assigner.indices(blocks[: len(per_call)], outputs["pred_logits"].shape[1]))
            blocks = blocks[len(per_call) :]
        return out

    @staticmethod
    def solve_on_host(
        flat: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The host part of `assign_many`: the cost matrices, concatenated flat in a CPU tensor,
        -> per matrix the (rows, cols) of its minimum-cost matching."""
        if not torch.isfinite(flat).all():
            raise FloatingPointError(
                "the matching cost has NaN/inf entries (predictions diverged, or boxes are "
                "degenerate); lower the learning rate, check the annotations' boxes, or train in "
                "fp32."
            )
        values = flat.numpy()
        out, start = [], 0
        for rows, cols in shapes:
            out.append(
                linear_sum_assignment(values[start : start + rows * cols].reshape(rows, cols))
            )
            start += rows * cols
        return out
