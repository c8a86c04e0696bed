"""The detector and its parts (docs/architecture.md): backbones, encoder, decoder, query selection,
training-only query blocks, the mask head, and the typed output."""

from .backbone import Backbone
from .decoder import MLP, DecoderLayer, DeformableDecoder
from .detector import DeformableDETR
from .encoder import DeformableEncoder, EncoderLayer, Levels
from .masks import MaskHead
from .outputs import DetectorOutput, EncoderStream, LayerStream, Prediction
from .position_encoding import PositionEmbeddingSine
from .queries import (
    AnchorQueries,
    DINOQueries,
    LearnedQueries,
    NMSTwoStageQueries,
    Queries,
    QuerySelection,
    TwoStageQueries,
)
from .swin import SwinBackbone
from .training_queries import (
    ContrastiveDenoisingQueries,
    DenoisingQueries,
    HybridQueries,
    QueryGroups,
    TrainingQueries,
)

__all__ = [
    "AnchorQueries",
    "Backbone",
    "ContrastiveDenoisingQueries",
    "DecoderLayer",
    "DeformableDETR",
    "DeformableDecoder",
    "DeformableEncoder",
    "DenoisingQueries",
    "DINOQueries",
    "DetectorOutput",
    "EncoderLayer",
    "EncoderStream",
    "HybridQueries",
    "LayerStream",
    "LearnedQueries",
    "Levels",
    "MLP",
    "MaskHead",
    "NMSTwoStageQueries",
    "PositionEmbeddingSine",
    "Prediction",
    "Queries",
    "QueryGroups",
    "QuerySelection",
    "SwinBackbone",
    "TrainingQueries",
    "TwoStageQueries",
]
