"""LightningCLI for users who prefer it to Hydra: python -m msdetr fit --config
    configs/cli/synthetic.yaml

The same DetectionModule and CocoDataModule classes as train.py; the model, criterion,
post-processing, optimizer and LR scheduler are given as class_path / init_args (see configs/cli/:
each config there builds the module its Hydra experiment builds, tests/test_configs.py checks).
`fit`, `validate`, `test` and `predict` are Lightning's subcommands; `--print_config` shows
everything that can be set.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import CocoDataModule
from .lit import DetectionModule
from .lit.callbacks import AtomicCheckpointIO


def _run_seed(seed_everything):
    """model.seed follows seed_everything (an int; True/False/None leave per-rank reseeding off)."""
    return (
        seed_everything
        if isinstance(seed_everything, int) and not isinstance(seed_everything, bool)
        else None
    )


class MsdetrCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_run_seed)


def main(args=None, run: bool = True) -> LightningCLI:
    """`run`=False: the trainer, module and datamodule are built, and nothing runs (no subcommand
    in `args` then)."""
    return MsdetrCLI(
        DetectionModule,
        CocoDataModule,
        args=args,
        run=run,
        trainer_defaults={"plugins": [AtomicCheckpointIO()], "gradient_clip_val": 0.1},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
