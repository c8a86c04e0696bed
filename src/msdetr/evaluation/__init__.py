"""COCO box evaluation (pycocotools or faster-coco-eval) as a torchmetrics Metric, correct under DDP."""
from .coco_eval import BACKENDS, STAT_NAMES, CocoMetric

__all__ = ["BACKENDS", "STAT_NAMES", "CocoMetric"]
