"""COCO box evaluation (pycocotools or faster-coco-eval), correct under distributed data parallel."""
from .coco_eval import BACKENDS, STAT_NAMES, CocoEvaluator

__all__ = ["BACKENDS", "STAT_NAMES", "CocoEvaluator"]
