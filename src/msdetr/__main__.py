"""LightningCLI for users who prefer it to Hydra: python -m msdetr fit --config configs/cli/synthetic.yaml

The same DetectionModule and CocoDataModule classes as train.py; the model, criterion and
post-processing are given as class_path / init_args (see configs/cli/). `fit`, `validate`, `test`
and `predict` are Lightning's subcommands; `--print_config` shows everything that can be set.
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import CocoDataModule
from .lit import DetectionModule
from .lit.callbacks import AtomicCheckpointIO


def main(args=None) -> LightningCLI:
    return LightningCLI(
        DetectionModule, CocoDataModule, args=args,
        trainer_defaults={"plugins": [AtomicCheckpointIO()], "gradient_clip_val": 0.1},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
