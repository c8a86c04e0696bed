"""COCO-format data: the dataset, DETR transforms, the LightningDataModule and the synthetic shapes
set."""

from typing import Any

from .coco import CocoDetection, read_coco_json
from .datamodule import CocoDataModule, collate

__all__ = ["CocoDataModule", "CocoDetection", "collate", "read_coco_json", "write_synthetic_coco"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `python -m msdetr.data.synthetic` does not load the module
    # twice.
    if name == "write_synthetic_coco":
        from .synthetic import write_synthetic_coco

        return write_synthetic_coco
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
