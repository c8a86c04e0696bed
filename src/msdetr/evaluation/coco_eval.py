"""COCO box evaluation that counts every image once, also under DDP (where samplers pad with repeats)."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _cocoeval_class(backend: str):
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval.core.faster_eval_api import COCOeval_faster
        except ImportError:
            raise ImportError("the faster_coco_eval backend is not installed; pip install 'msdetr[fast-eval]'.") from None
        return COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r}; use 'pycocotools' or 'faster_coco_eval'.")


class CocoEvaluator:
    """Collects detections {image_id: {'scores','labels','boxes' xyxy in original pixels}} and scores them."""

    def __init__(self, coco_gt: COCO, backend: str = "pycocotools"):
        self.coco_gt = coco_gt
        self.backend = backend
        self._cocoeval = _cocoeval_class(backend)
        self.reset()

    def reset(self) -> None:
        self.results: dict[int, dict[str, torch.Tensor]] = {}

    def update(self, predictions: dict[int, dict[str, torch.Tensor]]) -> None:
        for image_id, det in predictions.items():
            # A repeated id (distributed sampler padding) is the same image: keep one copy.
            self.results[int(image_id)] = {k: v.detach().cpu() for k, v in det.items()}

    def synchronize(self) -> None:
        """Gather every rank's detections, deduplicated by image id, onto every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, self.results)
        merged: dict[int, dict] = {}
        for part in gathered:
            merged.update(part)
        self.results = merged

    def _detections(self) -> list[dict]:
        out = []
        for image_id, det in self.results.items():
            boxes = det["boxes"].float()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
                out.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
        return out

    def summarize(self, verbose: bool = True) -> dict[str, float]:
        image_ids = sorted(self.results)
        detections = self._detections()
        if not image_ids or not detections:
            return {name: 0.0 for name in STAT_NAMES}
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            coco_dt = self._load_results(detections)
            ev = self._cocoeval(self.coco_gt, coco_dt, "bbox")
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print("\n".join(line for line in stdout.getvalue().splitlines() if "Average" in line))
        stats = np.asarray(ev.stats, dtype=np.float64)
        # COCO reports -1 where a size range has no GT; keep metrics in [0, 1].
        return {name: float(max(v, 0.0)) for name, v in zip(STAT_NAMES, stats)}

    def _load_results(self, detections: list[dict]) -> COCO:
        coco_dt = COCO()
        coco_dt.dataset = {"images": copy.deepcopy(self.coco_gt.dataset["images"]),
                           "categories": copy.deepcopy(self.coco_gt.dataset["categories"])}
        for i, d in enumerate(detections):
            x, y, w, h = d["bbox"]
            d.update(id=i + 1, area=w * h, iscrowd=0)
        coco_dt.dataset["annotations"] = detections
        coco_dt.createIndex()
        return coco_dt
