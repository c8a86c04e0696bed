"""The Hydra configs of conf/, composed for a test as train.py, evaluate.py and predict.py compose
them."""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from . import CONF

# For configs a test builds a module from without a Hydra run (paths.output_dir: the run's folder).
UNUSED_OUTPUT = "paths.output_dir=/tmp/msdetr-unused"


def compose(*overrides: str, name: str = "train", hydra: bool = False) -> DictConfig:
    """conf/<name>.yaml with the command-line `overrides`; `hydra`: with its `hydra` node, as a run
    sees it (return_hydra_config)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides), return_hydra_config=hydra)
