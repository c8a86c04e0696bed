"""Assigners: which query is supervised by which ground truth."""
from .hungarian import HungarianMatcher, focal_class_cost, solve_assignments

__all__ = ["HungarianMatcher", "focal_class_cost", "solve_assignments"]
