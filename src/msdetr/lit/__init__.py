"""Lightning glue: the DetectionModule, its settings and callbacks."""

from .module import CompileOptions, DetectionModule, LRSchedule, ParamGroups

__all__ = ["CompileOptions", "DetectionModule", "LRSchedule", "ParamGroups"]
