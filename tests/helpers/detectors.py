"""Tiny detectors for tests, built as a run builds its detector: conf/ composed with a command line
(a model, a matcher or an experiment, then overrides of their parts), `model.detector` instantiated
(runner.build_module), at the sizes of TINY."""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from msdetr.models import DeformableDETR

from .config import compose

# The sizes every tiny detector starts from (a test's overrides come after them): 5 classes, 7
# queries, width 64 in 4 heads, FFN 64, no dropout, 1 encoder and 2 decoder layers, a random
# ResNet-18; the training query blocks' random generators seeded with 0. The levels and sampling
# points are the model config's.
TINY = (
    "data.num_classes=5",
    "model.num_queries=7",
    "model.hidden_dim=64",
    "model.nheads=4",
    "model.dim_feedforward=64",
    "model.dropout=0.0",
    "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=2",
    "model.detector.backbone.name=resnet18",
    "model.detector.backbone.pretrained=false",
    "seed=0",
)


def tiny_detector(*overrides: str) -> DeformableDETR:
    """The detector of a run with the command line `overrides` (conf/train.yaml composed, then
    `model.detector` instantiated), at the TINY sizes: e.g. tiny_detector("model=dino",
    "matcher=ms_detr") (the matcher adds what its supervision needs: the decoder's o2m tap, a
    training query block), tiny_detector("experiment=dn_deformable_detr_50ep"), and any config key
    after them ("model.detector.queries.mixed_selection=true", "model.num_feature_levels=5").

    Unless the overrides pick an experiment: model=deformable_detr (one-stage, learned queries) and
    none of train.yaml's default experiment. A part that refuses its options raises its own error
    (as when it is built directly), not Hydra's InstantiationException around it.
    """
    experiment = any(override.startswith("experiment=") for override in overrides)
    base = () if experiment else ("~experiment", "model=deformable_detr")
    cfg = compose(*base, *TINY, *overrides)
    try:
        return instantiate(cfg.model.detector)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise


def batch(h: int = 64, w: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images of h x w, the second padded on its bottom and right halves."""
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, h // 2 :, :] = True
    mask[1, :, w // 2 :] = True
    return images, mask
