"""Small data modules for the data tests."""

from __future__ import annotations

from msdetr.data import CocoDataModule


def small_datamodule(root, **kwargs) -> CocoDataModule:
    """A COCO-format folder at `root` behind a data module with tiny image sizes (two images a
    batch, no workers); `kwargs` override any setting."""
    opts = dict(
        root=str(root),
        batch_size=2,
        num_workers=0,
        train_scales=[64, 80],
        max_size=100,
        crop_resize=[64],
        crop_size=(40, 60),
        eval_size=64,
    )
    return CocoDataModule(**{**opts, **kwargs})
