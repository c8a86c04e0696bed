"""Assigners: which query is supervised by which ground truth."""
from .denoising import DenoisingAssigner
from .hungarian import HungarianMatcher, focal_class_cost, solve_assignments
from .quality import (IoUTopKAssigner, MixedScoreTopKAssigner, QualityTopKAssigner, cap_positives, quality_assign,
                      assign_quality_batch, topk_per_gt)

__all__ = ["DenoisingAssigner", "HungarianMatcher", "IoUTopKAssigner", "MixedScoreTopKAssigner", "QualityTopKAssigner", "cap_positives",
           "assign_quality_batch", "focal_class_cost", "quality_assign", "solve_assignments", "topk_per_gt"]
