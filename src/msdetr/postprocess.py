"""Turning raw outputs into detections: top-k over (query, class) pairs (or DETA's NMS), with
instance masks where the detector has a mask head."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import batched_nms, nms

from .box_ops import cxcywh_to_xyxy
from .postprocess_masks import detection_masks


class PostProcess(nn.Module):
    """What the post-processes share: the masks of the kept detections.

    Where the outputs carry mask embeddings (`mask_embed`, a detector with a mask head), each
    detection gets "masks": its query's mask logits (its embedding against the image's pixel
    embedding, made for the kept queries only, at 1/4 of the padded input), resampled onto the
    original image and thresholded at probability 0.5: (N, H, W) bool at `orig_sizes`
    (`postprocess_masks.paste_masks`). The paste needs the sizes as Python ints: one host read per
    batch (`sizes_on_host`), at inference only."""

    @staticmethod
    def sizes_on_host(orig_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """The one host read of the mask paste: the (B, 2) original (H, W) as ints."""
        return [(int(h), int(w)) for h, w in orig_sizes.tolist()]

    def kept_masks(
        self, outputs: dict, queries: list[torch.Tensor], orig_sizes: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per image the (N_b, H_b, W_b) bool masks of its kept detections, `queries[b]` (N_b,)
        their query indices (a query kept for two classes is pasted twice)."""
        embed, pixel = outputs["mask_embed"], outputs["mask_features"]
        logits = [
            torch.einsum("nd,dhw->nhw", embed[b, q].float(), pixel[b].float())
            for b, q in enumerate(queries)
        ]
        return detection_masks(
            logits, outputs["mask_valid_ratio"].float(), self.sizes_on_host(orig_sizes)
        )


class TopKPostProcess(PostProcess):
    """sigmoid, flatten (query, class), keep the top-k; boxes in absolute xyxy of the original
    image (and, with a mask head, "masks": see `PostProcess`)."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, c = logits.shape
        prob = logits.float().sigmoid().view(b, -1)
        scores, idx = torch.topk(prob, min(self.num_select, q * c), dim=1)
        query = torch.div(idx, c, rounding_mode="floor")
        labels = idx % c
        boxes = torch.gather(
            cxcywh_to_xyxy(boxes.float()), 1, query.unsqueeze(-1).expand(-1, -1, 4)
        )
        h, w = orig_sizes.to(boxes.dtype).unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None, :]
        out = [{"scores": s, "labels": c, "boxes": bx} for s, c, bx in zip(scores, labels, boxes)]
        if "mask_embed" in outputs:
            for det, masks in zip(out, self.kept_masks(outputs, list(query), orig_sizes)):
                det["masks"] = masks
        return out


class NMSPostProcess(PostProcess):
    """DETA's class-aware NMS: every (query, class) pair, at most `pre_topk` by score, batched NMS
        by
    label at `iou_threshold`, the best `num_select` kept; no score threshold. With a mask head,
    "masks" as well (see `PostProcess`).

    `whole_batch`: one NMS over the whole batch (every (image, class) its own group) and one read
    of the device to split it by image, instead of NMS image by image (torchvision's batched_nms,
    which on large inputs loops over the classes, a sync each). None (default): on accelerators
    only; on the CPU there is nothing to wait for, and one NMS over many boxes costs more there
    than the class-by-class loop. Both ways give the same detections: NMS runs on a strict order
    (equal scores ranked by candidate index) and in float64, so neither torchvision's choice of
    algorithm nor the offsets that keep the groups apart can change which box suppresses which.
    """

    def __init__(
        self,
        num_select: int = 100,
        iou_threshold: float = 0.7,
        pre_topk: int = 10000,
        whole_batch: bool | None = None,
    ):
        super().__init__()
        self.num_select, self.iou_threshold, self.pre_topk = num_select, iou_threshold, pre_topk
        self.whole_batch = whole_batch

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, c = logits.shape
        scores = logits.float().sigmoid().view(b, -1)
        h, w = orig_sizes.to(torch.float32).unbind(1)
        boxes = cxcywh_to_xyxy(boxes.float()) * torch.stack([w, h, w, h], 1)[:, None, :]
        n = min(q * c, self.pre_topk)  # candidates per image
        if q * c > self.pre_topk:
            idx = scores.topk(self.pre_topk, dim=1).indices
        else:
            idx = torch.arange(q * c, device=scores.device).expand(b, -1)
        label = idx % c
        query = torch.div(idx, c, rounding_mode="floor")
        box = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        score = torch.gather(scores, 1, idx)
        if b * n == 0:
            return self._with_masks(
                [{"scores": score[i], "labels": label[i], "boxes": box[i]} for i in range(b)],
                outputs,
                [query[i] for i in range(b)],
                orig_sizes,
            )
        # NMS only uses the order of the scores: a strict one, highest first, ties by position.
        order = score.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n, device=order.device).expand(b, -1)
        )
        key = (n - rank).double()
        whole_batch = self.whole_batch if self.whole_batch is not None else box.device.type != "cpu"
        if whole_batch:
            kept = self._split_by_image(self.batch_nms(box, key, label, c), n, b)
        else:
            kept = [
                batched_nms(box[i].double(), key[i], label[i], self.iou_threshold) for i in range(b)
            ]
        kept = [k[: self.num_select] for k in kept]
        return self._with_masks(
            [
                {"scores": score[i, k], "labels": label[i, k], "boxes": box[i, k]}
                for i, k in enumerate(kept)
            ],
            outputs,
            [query[i, k] for i, k in enumerate(kept)],
            orig_sizes,
        )

    def _with_masks(
        self,
        detections: list[dict[str, torch.Tensor]],
        outputs: dict,
        queries: list[torch.Tensor],
        orig_sizes: torch.Tensor,
    ) -> list[dict[str, torch.Tensor]]:
        if "mask_embed" in outputs:
            for det, masks in zip(detections, self.kept_masks(outputs, queries, orig_sizes)):
                det["masks"] = masks
        return detections

    def batch_nms(
        self, box: torch.Tensor, key: torch.Tensor, label: torch.Tensor, num_classes: int
    ) -> torch.Tensor:
        """One class-aware NMS over the whole batch: (B, n, 4) boxes -> kept positions in the
            flattened
        (B * n) candidates, by decreasing key. Every (image, class) is its own group, shifted by an
        integer offset wider than all boxes; in float64 the shifted float32 coordinates stay exact,
        so each group sees exactly the IoUs of its own boxes."""
        b, n, _ = box.shape
        group = (torch.arange(b, device=box.device)[:, None] * num_classes + label).flatten()
        flat = box.reshape(-1, 4).double()
        span = (flat.max() - flat.min()).floor() + 1
        return nms(flat + (group.double() * span)[:, None], key.reshape(-1), self.iou_threshold)

    @staticmethod
    def _split_by_image(keep: torch.Tensor, n: int, b: int) -> list[torch.Tensor]:
        """Kept flattened positions (decreasing key) -> per image its positions, still by decreasing
        key; one read of the device (the per-image counts)."""
        image = torch.div(keep, n, rounding_mode="floor")
        sorted_image, perm = image.sort(stable=True)
        grouped = keep[perm] - sorted_image * n
        # bincount would read the largest id from the device to size its output; scatter_add does
        # not.
        counts = image.new_zeros(b).scatter_add_(0, image, torch.ones_like(image)).cpu().tolist()
        return list(grouped.split(counts))
