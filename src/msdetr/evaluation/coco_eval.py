"""COCO box (and instance mask) evaluation as a torchmetrics Metric: torchmetrics gathers the
detections of every rank, pycocotools (or faster-coco-eval) scores them against the original
annotations, each image once."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# The order of COCOeval.stats for boxes.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# The same statistics for instance masks (COCOeval iouType='segm'), logged as val/mask_AP, ...
MASK_STAT_NAMES = tuple(f"mask_{name}" for name in STAT_NAMES)
BACKENDS = ("pycocotools", "faster_coco_eval")


def _backend_classes(backend: str) -> tuple[type, type, dict[str, Any]]:
    """(the backend's COCO class, its COCOeval class, COCOeval keyword arguments)."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, {}
    if backend == "faster_coco_eval":
        try:
            import faster_coco_eval
        except ImportError:
            raise ImportError(
                "eval backend 'faster_coco_eval' is not installed; pip install msdetr[fast-eval] "
                "or use the 'pycocotools' backend."
            ) from None
        # Its summary goes to a logger by default; print() puts the table where pycocotools puts it.
        return faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, {"print_function": print}
    raise ValueError(
        f"unknown COCO evaluation backend {backend!r}; choose one of {list(BACKENDS)}."
    )


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CocoMetric(Metric):
    """COCO box AP/AR (and mask AP/AR) of the detections given to `update`, scored on exactly the
    images seen.

    `update` takes {image_id: {'scores' (n,), 'labels' (n,) category ids, 'boxes' (n, 4) xyxy in
    original-image pixels, and optionally 'masks'}}. 'masks' is either a tensor (n, H, W) at the
    original image size (the image file's, the target's "orig_size"; bool, integer nonzero = in,
    or float probabilities, in where > 0.5), cropped or zero-padded at the bottom/right to the
    ground truth's height x width if that differs, or a list of n COCO compressed RLE dicts
    ({'size': [height, width] of the ground truth, 'counts': bytes or str}). Masks are encoded to
    RLE in `update`, so only their counts are kept.

    The states (image ids, detections per image, detection rows; with masks, whether each image
    gave masks, each detection's RLE length and all RLE counts as one uint8 tensor) are
    torchmetrics list states reduced by concatenation, so `compute` sees every rank's images in the
    same order in every state; an image seen more than once (a distributed sampler pads its last
    batch with repeats) counts with its first detections, in rank order. Rank 0 runs COCOeval on
    the original annotations (`coco_gt`, a pycocotools COCO) and every rank gets its numbers.

    `compute` returns the 12 COCO box metrics in [0, 1] (STAT_NAMES), and, when the detections
    carried masks, the 12 mask metrics too (MASK_STAT_NAMES: mask_AP, mask_AP50, ...); a metric
    COCO marks -1 (no ground truth in its size range, e.g. APl without large objects; all of them
    without annotations) is NaN. Mask evaluation needs a ground truth with segmentations (data.masks
    =true); either backend scores masks.

    Args:
        coco_gt: the ground truth; may be given later with `set_ground_truth`.
        backend: "pycocotools" or "faster_coco_eval" (the same numbers, faster).
        source: what to call the ground truth in messages (its annotation file).
        verbose: print the COCO table on rank 0 in `compute`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # The metric states (`add_state`): one tensor per `update` call, concatenated across processes.
    image_ids: list[torch.Tensor]
    num_detections: list[torch.Tensor]
    detections: list[torch.Tensor]
    mask_given: list[torch.Tensor]
    mask_lengths: list[torch.Tensor]
    mask_bytes: list[torch.Tensor]

    def __init__(
        self,
        coco_gt: COCO | None = None,
        backend: str = "pycocotools",
        source: str | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown COCO evaluation backend {backend!r}; choose one of {list(BACKENDS)}."
            )
        # The backend is imported with the ground truth: a module that only predicts never needs it.
        self.backend = backend
        self.verbose = verbose
        self.coco_gt: COCO | None = None
        # Per update: the image ids, their detection counts, and the detections as (n, 6) rows
        # [x, y, w, h, score, category_id] in float64, the precision COCOeval reads them in.
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("num_detections", default=[], dist_reduce_fx="cat")
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        # Per update: 1/0 per image (masks given), per detection the byte length of its RLE counts,
        # and the counts of all its detections back to back (uint8). Bytes as tensors: torchmetrics
        # gathers them across processes like the other states.
        self.add_state("mask_given", default=[], dist_reduce_fx="cat")
        self.add_state("mask_lengths", default=[], dist_reduce_fx="cat")
        self.add_state("mask_bytes", default=[], dist_reduce_fx="cat")
        # Whether this process's updates so far carried masks (None: no update yet).
        self._masks_given: bool | None = None
        if coco_gt is not None:
            self.set_ground_truth(coco_gt, source)

    def set_ground_truth(self, coco_gt: COCO, source: str | None = None) -> None:
        """Score against `coco_gt` from now on (a no-op when it already is); warns once if it has no
        annotations."""
        if coco_gt is self.coco_gt:
            return
        self._coco_class, self._cocoeval, self._eval_kwargs = _backend_classes(self.backend)
        self.coco_gt = coco_gt
        self.source = source or "the ground truth"
        if self._coco_class is COCO:
            self._gt = coco_gt
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                self._gt = self._coco_class(coco_gt.dataset)
        self._known_ids = set(coco_gt.getImgIds())
        self._gt_has_masks = all(ann.get("segmentation") for ann in coco_gt.anns.values())
        if not coco_gt.getAnnIds() and _is_rank_zero():
            warnings.warn(
                f"'{self.source}' has no annotations, so COCO AP and AR are undefined: they are "
                "NaN and not logged, and a checkpoint callback that monitors val/AP stops the run "
                "once validation has run; leave such a callback out.",
                stacklevel=2,
            )

    def reset(self) -> None:
        super().reset()
        self._masks_given = None

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        if self.coco_gt is None:
            raise RuntimeError(
                "CocoMetric has no ground truth; pass coco_gt or call set_ground_truth first."
            )
        ids, counts, rows, given, rles = [], [], [], [], []
        for image_id, det in predictions.items():
            image_id = int(image_id)
            if image_id not in self._known_ids:
                raise ValueError(
                    f"image id {image_id} is not in the ground-truth annotations ({self.source}); "
                    "evaluate against the annotation file of the images being predicted "
                    "(data.val_ann)."
                )
            boxes = det["boxes"].detach().to(self.device, torch.float64).reshape(-1, 4)
            scores = det["scores"].detach().to(self.device, torch.float64).reshape(-1, 1)
            labels = det["labels"].detach().to(self.device, torch.float64).reshape(-1, 1)
            ids.append(image_id)
            counts.append(len(boxes))
            rows.append(
                torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores, labels], dim=1)
            )
            masks = det.get("masks")
            self._check_mask_mode(masks is not None)
            given.append(int(masks is not None))
            if masks is not None:
                rles.extend(self._encode_masks(image_id, masks, len(boxes)))
        self.image_ids.append(torch.tensor(ids, dtype=torch.int64, device=self.device))
        self.num_detections.append(torch.tensor(counts, dtype=torch.int64, device=self.device))
        self.detections.append(
            torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64, device=self.device)
        )
        device = self.device
        self.mask_given.append(torch.tensor(given, dtype=torch.int64, device=device))
        lengths = [len(r) for r in rles]
        self.mask_lengths.append(torch.tensor(lengths, dtype=torch.int64, device=device))
        packed = torch.frombuffer(bytearray(b"".join(rles)), dtype=torch.uint8) if rles else None
        self.mask_bytes.append(
            packed.to(device)
            if packed is not None
            else torch.zeros(0, dtype=torch.uint8, device=device)
        )

    def _check_mask_mode(self, given: bool) -> None:
        if given and not self._gt_has_masks:
            raise ValueError(
                f"the detections carry masks, but the ground truth ({self.source}) "
                "has annotations without a segmentation; set data.masks=true (which "
                "refuses a file lacking them) so that its segmentations are read, or "
                "predict boxes only."
            )
        if self._masks_given is not None and self._masks_given != given:
            raise ValueError(
                "some detections given to CocoMetric.update carry 'masks' and some do "
                "not; give masks for every image (an image without detections: an "
                "empty (0, H, W) tensor) or none."
            )
        self._masks_given = given

    def _encode_masks(self, image_id: int, masks: Any, count: int) -> list[bytes]:
        """The compressed RLE counts of `count` masks of image `image_id`, at the ground truth's
        size."""
        if self.coco_gt is None:
            raise RuntimeError("CocoMetric has no ground truth; call set_ground_truth first.")
        image = self.coco_gt.imgs[image_id]
        height, width = int(image["height"]), int(image["width"])
        if isinstance(masks, (list, tuple)):
            if len(masks) != count or any(list(r["size"]) != [height, width] for r in masks):
                raise ValueError(
                    f"image {image_id}: 'masks' as RLE must be {count} dicts of "
                    f"size [{height}, {width}] (one per box, at the ground truth's "
                    "height and width)."
                )
            return [
                r["counts"].encode("ascii") if isinstance(r["counts"], str) else bytes(r["counts"])
                for r in masks
            ]
        masks = masks.detach()
        if masks.dim() != 3 or len(masks) != count:
            raise ValueError(
                f"image {image_id}: 'masks' has shape {tuple(masks.shape)}; it must "
                f"be ({count}, height, width), one mask per box at the original "
                "image size."
            )
        inside = masks > 0.5 if masks.is_floating_point() else masks != 0
        fitted = torch.zeros(count, height, width, dtype=torch.bool, device=inside.device)
        h, w = min(height, inside.shape[1]), min(width, inside.shape[2])
        fitted[:, :h, :w] = inside[:, :h, :w]
        if count == 0:
            return []
        # pycocotools encodes (height, width, n) Fortran-ordered uint8: the memory layout of
        # (n, width, height) C-ordered.
        columns = fitted.transpose(1, 2).contiguous().to("cpu", torch.uint8).numpy()
        return [r["counts"] for r in mask_utils.encode(columns.transpose(2, 1, 0))]

    def compute(self) -> dict[str, float]:
        distributed = self.sync_on_compute and dist.is_available() and dist.is_initialized()
        stats: list[dict[str, float] | None] = [None]
        if not distributed or dist.get_rank(self.process_group) == 0:
            stats[0] = self._evaluate()
        if distributed:
            dist.broadcast_object_list(stats, group=self.process_group, group_src=0)
        result = stats[0]
        assert result is not None, "rank 0 broadcasts the evaluated statistics"
        return result

    def _per_image(self) -> dict[int, tuple[np.ndarray, list[bytes] | None]]:
        """{image id: (its (n, 6) detection rows, its n RLE counts or None without masks)}, the
        first occurrence of each image id."""

        # a list before the sync (or in one process), a tensor after
        def cat(state, dtype=torch.int64):
            return dim_zero_cat(state).cpu() if len(state) else torch.zeros(0, dtype=dtype)

        ids = cat(self.image_ids).tolist()
        counts = cat(self.num_detections).to(torch.int64)
        rows = cat(self.detections).to(torch.float64).reshape(-1, 6).numpy()
        given = cat(self.mask_given).to(torch.bool).tolist()
        lengths = cat(self.mask_lengths).to(torch.int64)
        # .to(uint8): torchmetrics stands in a float32 empty tensor for a rank without updates, and
        # concatenating it promotes the bytes to float (the values stay exact).
        data = cat(self.mask_bytes, torch.uint8).to(torch.uint8).numpy().tobytes()
        ends = lengths.cumsum(0).tolist()
        rles = [data[end - n : end] for end, n in zip(ends, lengths.tolist())]
        per_image: dict[int, tuple[np.ndarray, list[bytes] | None]] = {}
        taken = 0
        chunks = np.split(rows, counts.cumsum(0)[:-1].numpy())
        for image_id, chunk, has_masks in zip(ids, chunks, given):
            masks = rles[taken : taken + len(chunk)] if has_masks else None
            taken += len(chunk) if has_masks else 0
            per_image.setdefault(int(image_id), (chunk, masks))
        return per_image

    def _evaluate(self) -> dict[str, float]:
        if self.coco_gt is None:
            raise RuntimeError(
                "CocoMetric has no ground truth; pass coco_gt or call set_ground_truth first."
            )
        per_image = self._per_image()
        image_ids = sorted(per_image)
        rows = [
            np.concatenate([np.full((len(r), 1), image_id, dtype=np.float64), r], axis=1)
            for image_id, (r, _) in per_image.items()
            if len(r)
        ]
        with_masks = [m is not None for _, m in per_image.values()]
        if any(with_masks) and not all(with_masks):
            raise ValueError(
                "some images were given to CocoMetric with masks and some without; "
                "give masks for every image or none."
            )
        boxes = np.concatenate(rows) if rows else np.zeros((0, 7))
        result = self._run("bbox", boxes, image_ids, STAT_NAMES)
        if with_masks and all(with_masks):
            segments = []
            for image_id, (r, masks) in per_image.items():
                image = self._gt.imgs[image_id]
                size = [int(image["height"]), int(image["width"])]
                segments += [
                    {
                        "image_id": image_id,
                        "category_id": int(row[5]),
                        "score": float(row[4]),
                        "segmentation": {"size": size, "counts": counts},
                    }
                    for row, counts in zip(r, masks or [])
                ]
            result.update(self._run("segm", segments, image_ids, MASK_STAT_NAMES))
        return result

    def _run(
        self,
        iou_type: str,
        results: np.ndarray | list[dict],
        image_ids: Sequence[int],
        names: Sequence[str],
    ) -> dict[str, float]:
        """COCOeval of one kind ("bbox": rows, "segm": result dicts) on `image_ids`, as
        {name: value}."""
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            coco_dt = self._load_results(results)
            evaluator = self._cocoeval(self._gt, coco_dt, iou_type, **self._eval_kwargs)
            evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if self.verbose:
            lines = [
                line for line in log.getvalue().splitlines() if line.lstrip().startswith("Average")
            ]
            print("\n".join(([f"COCO {iou_type}:"] if iou_type != "bbox" else []) + lines))
        # COCO writes -1 where a size range has no ground truth: undefined, not zero.
        return {name: float(v) if v >= 0 else math.nan for name, v in zip(names, evaluator.stats)}

    def _load_results(self, rows: np.ndarray | list[dict]) -> Any:
        """The detections as the backend's COCO result set: box rows [image_id, x, y, w, h, score,
        category_id], or result dicts with a 'segmentation'."""
        if len(rows):
            return self._gt.loadRes(rows)
        # pycocotools' loadRes fails on no detections: build the empty result set the way loadRes
        # does.
        empty = self._coco_class()
        empty.dataset = {
            "images": list(self._gt.dataset["images"]),
            "categories": list(self._gt.dataset["categories"]),
            "annotations": [],
        }
        empty.createIndex()
        return empty
