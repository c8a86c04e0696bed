"""COCO box and mask evaluation (pycocotools or faster-coco-eval) as a torchmetrics Metric,
correct under DDP."""

from .coco_eval import BACKENDS, MASK_STAT_NAMES, STAT_NAMES, CocoMetric

__all__ = ["BACKENDS", "MASK_STAT_NAMES", "STAT_NAMES", "CocoMetric"]
