"""LightningDataModule over COCO-format folders (COCO itself, custom datasets, the synthetic set)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from .coco import CocoDetection, num_classes_of, read_coco_json
from .synthetic import write_synthetic_coco
from .transforms import COCO_TRAIN_SCALES, eval_transforms, train_transforms


def collate(batch):
    """Pad images bottom/right to the largest H and W of the batch; mask True on padding."""
    images, targets = zip(*batch)
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = images[0].new_zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
        mask[i, : im.shape[-2], : im.shape[-1]] = False
    return out, mask, list(targets)


class CocoDataModule(L.LightningDataModule):
    """Train/val loaders with the DETR recipe. With `synthetic=true`, `root` gets the shapes dataset."""

    def __init__(
        self,
        root: str | None = None,
        train_images: str | None = None,
        train_ann: str | None = None,
        val_images: str | None = None,
        val_ann: str | None = None,
        num_classes: int | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        train_scales: Sequence[int] = COCO_TRAIN_SCALES,
        max_size: int = 1333,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        eval_size: int = 800,
        synthetic: bool = False,
        synthetic_train: int = 256,
        synthetic_val: int = 32,
    ):
        super().__init__()
        if root is not None:
            base = Path(root)
            train_images = train_images or str(base / "train")
            train_ann = train_ann or str(base / "annotations" / "instances_train.json")
            val_images = val_images or str(base / "val")
            val_ann = val_ann or str(base / "annotations" / "instances_val.json")
        if not (val_images and val_ann):
            raise ValueError("the data config needs root, or val_images and val_ann (and train_* for training).")
        self.root = root
        self.paths = {"train": (train_images, train_ann), "val": (val_images, val_ann)}
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_tf = train_transforms(train_scales, max_size, crop_resize, tuple(crop_size))
        self.eval_tf = eval_transforms(eval_size, max_size)
        self.synthetic = synthetic
        self.synthetic_sizes = (synthetic_train, synthetic_val)
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None

    def prepare_data(self) -> None:
        if self.synthetic:
            if self.root is None:
                raise ValueError("synthetic=true needs data.root (where the shapes dataset is written).")
            write_synthetic_coco(self.root, *self.synthetic_sizes)

    def infer_num_classes(self) -> int:
        """max category id + 1 over the annotation files (class index = category id)."""
        self.prepare_data()
        anns = [ann for _, ann in self.paths.values() if ann]
        return max(num_classes_of(read_coco_json(ann)) for ann in anns)

    @property
    def category_names(self) -> dict[int, str]:
        dataset = self.val_dataset or self.train_dataset
        return dataset.category_names if dataset is not None else {}

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            images, ann = self.paths["train"]
            if not (images and ann):
                raise ValueError("training needs data.train_images and data.train_ann (or data.root).")
            self.train_dataset = CocoDetection(images, ann, self.train_tf, self.num_classes)
        if self.val_dataset is None:
            self.val_dataset = CocoDetection(*self.paths["val"], self.eval_tf, self.num_classes)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.persistent_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
