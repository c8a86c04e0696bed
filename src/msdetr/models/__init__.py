"""Model components: backbone, position encodings, deformable attention, transformer, detector."""
from .backbone import Backbone
from .detector import MLP, DeformableDETR
from .swin import SwinBackbone

__all__ = ["Backbone", "DeformableDETR", "MLP", "SwinBackbone"]
