"""The detector and its parts (docs/architecture.md): backbones, encoder, decoder, query selection,
training-only query blocks, and the typed output."""
from .backbone import Backbone
from .decoder import DecoderLayer, DeformableDecoder
from .detector import MLP, DeformableDETR
from .encoder import DeformableEncoder, EncoderLayer, Levels
from .outputs import DetectorOutput, EncoderStream, LayerStream, Prediction
from .queries import (ContrastiveDenoisingQueries, DenoisingQueries, HybridQueries, LearnedQueries, NMSTwoStageQueries, Queries, QueryGroups, QuerySelection,
                      TrainingQueries, TwoStageQueries)
from .swin import SwinBackbone

__all__ = [
    "Backbone", "ContrastiveDenoisingQueries", "DecoderLayer", "DeformableDETR", "DeformableDecoder", "DeformableEncoder", "DenoisingQueries", "DetectorOutput",
    "EncoderLayer", "EncoderStream", "HybridQueries", "LayerStream", "LearnedQueries", "Levels", "MLP",
    "NMSTwoStageQueries", "Prediction", "Queries", "QueryGroups", "QuerySelection", "SwinBackbone",
    "TrainingQueries", "TwoStageQueries",
]
