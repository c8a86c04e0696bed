"""Lightning glue: the DetectionModule and callbacks."""

from .module import DetectionModule

__all__ = ["DetectionModule"]
