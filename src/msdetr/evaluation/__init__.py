"""COCO evaluation (pycocotools or faster-coco-eval), correct under distributed data parallel."""
from .coco_eval import STAT_NAMES, CocoEvaluator

__all__ = ["CocoEvaluator", "STAT_NAMES"]
