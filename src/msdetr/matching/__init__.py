"""Assigners: which query is supervised by which ground truth (the contract: `Assigner`)."""

from .base import Assigner, Indices
from .denoising import DenoisingAssigner
from .hungarian import HungarianMatcher, focal_class_cost
from .quality import IoUTopKAssigner, MixedScoreTopKAssigner, QualityTopKAssigner, quality_assign

__all__ = [
    "Assigner",
    "DenoisingAssigner",
    "HungarianMatcher",
    "Indices",
    "IoUTopKAssigner",
    "MixedScoreTopKAssigner",
    "QualityTopKAssigner",
    "focal_class_cost",
    "quality_assign",
]
