"""Losses: the branch-based set criterion with focal / L1 / GIoU terms."""

from .criterion import Branch, SetCriterion, world_num_boxes

__all__ = ["Branch", "SetCriterion", "world_num_boxes"]
