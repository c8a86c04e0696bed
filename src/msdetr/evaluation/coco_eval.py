"""COCO box evaluation as a torchmetrics Metric: torchmetrics gathers the detections of every rank,
pycocotools (or faster-coco-eval) scores them against the original annotations, each image once."""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# The order of COCOeval.stats for boxes.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
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
            raise ImportError("eval backend 'faster_coco_eval' is not installed; pip install msdetr[fast-eval] "
                              "or use the 'pycocotools' backend.") from None
        # Its summary goes to a logger by default; print() puts the table where pycocotools puts it.
        return faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, {"print_function": print}
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {list(BACKENDS)}.")


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CocoMetric(Metric):
    """COCO box AP/AR of the detections given to `update`, scored on exactly the images seen.

    `update` takes {image_id: {'scores' (n,), 'labels' (n,) category ids, 'boxes' (n, 4) xyxy in
    original-image pixels}}. The states (image ids, detections per image, detection rows) are
    torchmetrics list states reduced by concatenation, so `compute` sees every rank's images; an
    image seen more than once (a distributed sampler pads its last batch with repeats) counts with
    its first detections, in rank order. Rank 0 runs COCOeval on the original annotations
    (`coco_gt`, a pycocotools COCO) and every rank gets its numbers.

    `compute` returns the 12 COCO box metrics in [0, 1]; a metric COCO marks -1 (no ground truth in
    its size range, e.g. APl without large objects; all of them without annotations) is NaN.

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

    def __init__(self, coco_gt: COCO | None = None, backend: str = "pycocotools", source: str | None = None,
                 verbose: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {list(BACKENDS)}.")
        # The backend is imported with the ground truth: a module that only predicts never needs it.
        self.backend = backend
        self.verbose = verbose
        self.coco_gt: COCO | None = None
        # Per update: the image ids, their detection counts, and the detections as (n, 6) rows
        # [x, y, w, h, score, category_id] in float64, the precision COCOeval reads them in.
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("num_detections", default=[], dist_reduce_fx="cat")
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        if coco_gt is not None:
            self.set_ground_truth(coco_gt, source)

    def set_ground_truth(self, coco_gt: COCO, source: str | None = None) -> None:
        """Score against `coco_gt` from now on (a no-op when it already is); warns once if it has no annotations."""
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
        if not coco_gt.getAnnIds() and _is_rank_zero():
            warnings.warn(f"'{self.source}' has no annotations, so COCO AP and AR are undefined: they are NaN and "
                          "not logged, and a checkpoint callback that monitors val/AP stops the run once validation "
                          "has run; leave such a callback out.", stacklevel=2)

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        if self.coco_gt is None:
            raise RuntimeError("CocoMetric has no ground truth; pass coco_gt or call set_ground_truth first.")
        ids, counts, rows = [], [], []
        for image_id, det in predictions.items():
            image_id = int(image_id)
            if image_id not in self._known_ids:
                raise ValueError(f"image id {image_id} is not in the ground-truth annotations ({self.source}); "
                                 "evaluate against the annotation file of the images being predicted (data.val_ann).")
            boxes = det["boxes"].detach().to(self.device, torch.float64).reshape(-1, 4)
            scores = det["scores"].detach().to(self.device, torch.float64).reshape(-1, 1)
            labels = det["labels"].detach().to(self.device, torch.float64).reshape(-1, 1)
            ids.append(image_id)
            counts.append(len(boxes))
            rows.append(torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores, labels], dim=1))
        self.image_ids.append(torch.tensor(ids, dtype=torch.int64, device=self.device))
        self.num_detections.append(torch.tensor(counts, dtype=torch.int64, device=self.device))
        self.detections.append(torch.cat(rows) if rows else torch.zeros(0, 6, dtype=torch.float64, device=self.device))

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

    def _per_image(self) -> dict[int, np.ndarray]:
        """{image id: its (n, 6) detection rows}, the first occurrence of each image id."""
        def cat(state):  # a list before the sync (or in one process), a tensor after
            return dim_zero_cat(state).cpu() if len(state) else torch.zeros(0)

        ids = cat(self.image_ids).tolist()
        counts = cat(self.num_detections).to(torch.int64)
        rows = cat(self.detections).to(torch.float64).reshape(-1, 6).numpy()
        per_image: dict[int, np.ndarray] = {}
        for image_id, chunk in zip(ids, np.split(rows, counts.cumsum(0)[:-1].numpy())):
            per_image.setdefault(int(image_id), chunk)
        return per_image

    def _evaluate(self) -> dict[str, float]:
        if self.coco_gt is None:
            raise RuntimeError("CocoMetric has no ground truth; pass coco_gt or call set_ground_truth first.")
        per_image = self._per_image()
        rows = [np.concatenate([np.full((len(r), 1), image_id, dtype=np.float64), r], axis=1)
                for image_id, r in per_image.items() if len(r)]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            coco_dt = self._load_results(np.concatenate(rows) if rows else np.zeros((0, 7)))
            evaluator = self._cocoeval(self._gt, coco_dt, "bbox", **self._eval_kwargs)
            evaluator.params.imgIds = sorted(per_image)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if self.verbose:
            print("\n".join(line for line in log.getvalue().splitlines() if line.lstrip().startswith("Average")))
        # COCO writes -1 where a size range has no ground truth: undefined, not zero.
        return {name: float(v) if v >= 0 else math.nan for name, v in zip(STAT_NAMES, evaluator.stats)}

    def _load_results(self, rows: np.ndarray) -> Any:
        """The detections as the backend's COCO result set; rows are [image_id, x, y, w, h, score, category_id]."""
        if len(rows):
            return self._gt.loadRes(rows)
        # pycocotools' loadRes fails on no detections: build the empty result set the way loadRes does.
        empty = self._coco_class()
        empty.dataset = {"images": list(self._gt.dataset["images"]),
                         "categories": list(self._gt.dataset["categories"]), "annotations": []}
        empty.createIndex()
        return empty
