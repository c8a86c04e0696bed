"""COCO box evaluation (pycocotools or faster-coco-eval) that counts every image once, also under DDP."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO

# The order of COCOeval.stats for boxes.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _backend(coco_gt: COCO, backend: str) -> tuple[Any, type, dict[str, Any]]:
    """(ground truth in the backend's COCO class, its COCOeval class, COCOeval keyword arguments)."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return coco_gt, COCOeval, {}
    if backend == "faster_coco_eval":
        try:
            import faster_coco_eval
        except ImportError:
            raise ImportError("eval backend 'faster_coco_eval' is not installed; pip install msdetr[fast-eval] "
                              "or use the 'pycocotools' backend.") from None
        with contextlib.redirect_stdout(io.StringIO()):
            gt = faster_coco_eval.COCO(coco_gt.dataset)
        # Its summary goes to a logger by default; print() puts the table where pycocotools puts it.
        return gt, faster_coco_eval.COCOeval_faster, {"print_function": print}
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {list(BACKENDS)}.")


class CocoEvaluator:
    """Collects detections per image and scores them with COCO box AP on exactly the images seen.

    Detections: {image_id: {'scores' (n,), 'labels' (n,) category ids, 'boxes' (n, 4) xyxy in
    original-image pixels}}. An image id seen twice (distributed samplers pad with repeats) is
    counted once.
    """

    def __init__(self, coco_gt: COCO, backend: str = "pycocotools"):
        self.coco_gt = coco_gt
        self.backend = backend
        self._gt, self._cocoeval, self._eval_kwargs = _backend(coco_gt, backend)
        self._known_ids = set(coco_gt.getImgIds())
        self.reset()

    def reset(self) -> None:
        # image id -> (n, 6) rows [x, y, w, h, score, label]: small to pickle across ranks.
        self.results: dict[int, np.ndarray] = {}

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        for image_id, det in predictions.items():
            image_id = int(image_id)
            if image_id not in self._known_ids:
                raise ValueError(f"image id {image_id} is not in the ground-truth annotations; evaluate against the "
                                 "annotation file of the images being predicted (data.val_ann).")
            if image_id in self.results:
                continue
            boxes = det["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            scores = det["scores"].detach().to("cpu", torch.float64).reshape(-1, 1)
            labels = det["labels"].detach().to("cpu", torch.float64).reshape(-1, 1)
            self.results[image_id] = torch.cat([xywh, scores, labels], dim=1).numpy()

    def synchronize(self) -> None:
        """Merge every rank's detections onto every rank, one entry per image id."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict[int, np.ndarray] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.results)
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            for image_id, rows in part.items():
                merged.setdefault(image_id, rows)
        self.results = merged

    def summarize(self, verbose: bool = True) -> dict[str, float]:
        """COCO box metrics in [0, 1] over the images updated so far; prints the COCO table if verbose."""
        image_ids = sorted(self.results)
        rows = [np.concatenate([np.full((len(r), 1), image_id, dtype=np.float64), r], axis=1)
                for image_id, r in self.results.items() if len(r)]
        if not rows:
            if verbose:
                print(f"COCO evaluation: no detections on {len(image_ids)} image(s); every metric is 0.")
            return dict.fromkeys(STAT_NAMES, 0.0)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            # Rows [image_id, x, y, w, h, score, category_id]: the array form both loadRes accept.
            coco_dt = self._gt.loadRes(np.concatenate(rows))
            evaluator = self._cocoeval(self._gt, coco_dt, "bbox", **self._eval_kwargs)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if verbose:
            print("\n".join(line for line in log.getvalue().splitlines() if line.lstrip().startswith("Average")))
        # COCO writes -1 where a size range has no ground truth; report 0 there to stay in [0, 1].
        return {name: max(float(v), 0.0) for name, v in zip(STAT_NAMES, evaluator.stats)}
