"""LightningDataModule over COCO-format folders: COCO itself, a custom dataset, or the synthetic
shapes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from .coco import VERIFY_IMAGES, CocoDetection, read_coco_json
from .seeding import EpochSeededDataset, epoch_generator
from .transforms import COCO_TRAIN_SCALES, eval_transforms, train_transforms


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(images, padding mask, targets): images zero-padded bottom/right to the batch's largest H and
    W, the (B, H, W) bool mask True on the padding, the targets as the dataset gives them.

    Targets are not padded. Their boxes are normalized by each image's own (unpadded) size, and
    their instance masks (with data.masks=true) are bool (N, h, w) at that size, "size" = (h, w):
    both live in the valid-region frame, where (0, 0) and (1, 1) are the corners of the image's
    valid region, not of the batch. A mask loss that samples ground-truth masks at normalized
    points p of that frame samples predictions made over the padded batch at p * (w, h) / (W, H).
    """
    images, targets = zip(*batch)
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    out = torch.zeros(len(images), images[0].shape[0], h, w, dtype=images[0].dtype)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        ih, iw = im.shape[-2:]
        out[i, :, :ih, :iw] = im.as_subclass(torch.Tensor)
        mask[i, :ih, :iw] = False
    return out, mask, list(targets)


class CocoDataModule(L.LightningDataModule):
    """Train/val loaders with the DETR recipe; class index = category id.

    `root` stands for root/{train,val}/ and root/annotations/instances_{train,val}.json; explicit
    paths override it. `num_classes` is the model's: None reads max category id + 1 from the files,
    a value is checked against them at setup(). `synthetic=True` writes the shapes dataset to
    `root` (`synthetic_train`/`synthetic_val` images, `synthetic_layout` "shapes" or "crowded": see
    msdetr.data.synthetic). `verify_images` ("header", "full", "none") and `skip_bad_images` say
    how the train and val images are checked when the datasets are built, and what happens to bad
    ones (see CocoDetection). `masks=True` gives each target the instance masks of its boxes (see
    CocoDetection for the target dict) and the validation ground truth its segmentations; a file
    without them is refused. The validation loader doubles as the test and predict loader.
    """

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
        persistent_workers: bool = True,
        train_scales: Sequence[int] = COCO_TRAIN_SCALES,
        max_size: int = 1333,
        crop_resize: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        eval_size: int = 800,
        synthetic: bool = False,
        synthetic_train: int = 256,
        synthetic_val: int = 32,
        synthetic_layout: str = "shapes",
        seed: int | None = None,
        verify_images: str = "header",
        skip_bad_images: bool = False,
        masks: bool = False,
    ):
        super().__init__()
        if verify_images not in VERIFY_IMAGES:
            raise ValueError(
                f"data.verify_images={verify_images!r} is not a check; use 'header' (default: each "
                "file's header), 'full' (decode every image) or 'none'."
            )
        # Seed of the training augmentations (the run's seed); None: torch's initial seed.
        self.seed = seed
        self._seeded_train: EpochSeededDataset | None = None
        # The loaders draw their order and base seed from these, never from torch's global
        # generator: a resumed run then gets the same order, and the random state it puts back is
        # not consumed by loaders the interrupted run never created (issue 20, item 2).
        self._train_generator: torch.Generator | None = None
        self._val_generator: torch.Generator | None = None
        if root is not None:
            base = Path(root)
            train_images = train_images or str(base / "train")
            train_ann = train_ann or str(base / "annotations" / "instances_train.json")
            val_images = val_images or str(base / "val")
            val_ann = val_ann or str(base / "annotations" / "instances_val.json")
        elif synthetic:
            raise ValueError(
                "synthetic=true needs data.root, the folder the shapes dataset is written to."
            )
        if not (val_images and val_ann):
            raise ValueError(
                "the data config needs data.root, or data.val_images and data.val_ann "
                "(plus data.train_images and data.train_ann to train)."
            )
        self.root = root
        self.train_images, self.train_ann = train_images, train_ann
        self.val_images, self.val_ann = val_images, val_ann
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.train_tf = train_transforms(train_scales, max_size, crop_resize, crop_size)
        self.eval_tf = eval_transforms(eval_size, max_size)
        self.synthetic = synthetic
        self.synthetic_sizes = (synthetic_train, synthetic_val)
        self.synthetic_layout = synthetic_layout
        self.verify_images = verify_images
        self.skip_bad_images = skip_bad_images
        self.masks = bool(masks)
        self.train_dataset: CocoDetection | None = None
        self.val_dataset: CocoDetection | None = None

    @property
    def num_classes(self) -> int:
        """The model's class count if given, else max category id + 1 over the annotation files."""
        if self._num_classes is None:
            self._num_classes = self.infer_num_classes()
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value: int | None) -> None:
        self._num_classes = value

    @property
    def category_names(self) -> dict[int, str]:
        """{category id: name}, from the validation annotation file."""
        if self.val_dataset is not None:
            return self.val_dataset.category_names
        self.prepare_data()
        return {int(c["id"]): str(c["name"]) for c in read_coco_json(self.val_ann)["categories"]}

    def infer_num_classes(self) -> int:
        """max category id + 1 over the train and val annotation files (class index = category
        id)."""
        self.prepare_data()
        ids = [
            int(c["id"])
            for ann in (self.train_ann, self.val_ann)
            if ann
            for c in read_coco_json(ann)["categories"]
        ]
        return max(ids, default=-1) + 1

    def prepare_data(self) -> None:
        # the constructor refuses synthetic without root
        if self.synthetic and self.root is not None:
            from .synthetic import write_synthetic_coco

            num_train, num_val = self.synthetic_sizes
            write_synthetic_coco(
                self.root, num_train=num_train, num_val=num_val, layout=self.synthetic_layout
            )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            if not (self.train_images and self.train_ann):
                raise ValueError(
                    "training needs data.train_images and data.train_ann (or data.root)."
                )
            self.train_dataset = self._dataset(self.train_images, self.train_ann, self.train_tf)
            if len(self.train_dataset) < self.batch_size:
                # The training loader drops the last incomplete batch (as the official recipe does).
                raise ValueError(
                    f"'{self.train_ann}' has {len(self.train_dataset)} image(s), fewer than "
                    f"data.batch_size={self.batch_size}; lower the batch size."
                )
        if self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_images, self.val_ann, self.eval_tf)

    def _dataset(self, images: str, ann: str, transforms: Callable) -> CocoDetection:
        dataset = CocoDetection(
            images,
            ann,
            transforms,
            verify_images=self.verify_images,
            skip_bad_images=self.skip_bad_images,
            masks=self.masks,
        )
        if self._num_classes is not None and dataset.num_classes > self._num_classes:
            raise ValueError(
                f"'{ann}' has category id {dataset.num_classes - 1}, but the model has num_classes="
                f"{self._num_classes} and class index = category id; set data.num_classes to at "
                f"least {dataset.num_classes} (or to null to read it from the annotation files)."
            )
        return dataset

    def _loader(
        self,
        dataset: Dataset | None,
        batch_size: int,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking the datamodule for a dataloader.")
        # Lightning swaps in a DistributedSampler under DDP (it pads with repeated images; the
        # evaluator counts each image id once). The training loader is torchdata's
        # StatefulDataLoader: Lightning saves its position in every checkpoint and a resumed run
        # continues mid-epoch with the batches the interrupted one had not seen.
        loader = StatefulDataLoader if train else DataLoader
        return loader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=generator,
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch the training augmentations are drawn for (see `EpochSeededDataset`)."""
        if self._seeded_train is None:
            return
        self._seeded_train.set_epoch(epoch)
        if self._train_generator is not None:
            epoch_generator(self._seeded_train.seed, epoch, self._train_generator)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before asking the datamodule for a dataloader.")
        # Augmentations are a function of (seed, epoch, index): exact on resume, independent of
        # workers.
        seed = self.seed if self.seed is not None else torch.initial_seed()
        trainer = getattr(self, "trainer", None)
        # The epoch this loader starts with: a run resumed after an epoch's end has not counted the
        # next one in `current_epoch` yet, the fit loop's processed epochs have.
        epoch = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
        self._seeded_train = EpochSeededDataset(self.train_dataset, seed, epoch)
        self._train_generator = epoch_generator(seed, epoch)
        return self._loader(
            self._seeded_train, self.batch_size, train=True, generator=self._train_generator
        )

    def val_dataloader(self) -> DataLoader:
        seed = self.seed if self.seed is not None else torch.initial_seed()
        if self._val_generator is None:
            self._val_generator = epoch_generator(seed, -1)
        return self._loader(
            self.val_dataset, self.val_batch_size, train=False, generator=self._val_generator
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
