"""COCO-format data: dataset, DETR transforms, LightningDataModule, synthetic shapes."""
from .coco import CocoDetection, read_coco_json
from .datamodule import CocoDataModule, collate
from .synthetic import write_synthetic_coco

__all__ = ["CocoDataModule", "CocoDetection", "collate", "read_coco_json", "write_synthetic_coco"]
