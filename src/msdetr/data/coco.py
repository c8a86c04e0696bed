"""COCO-format detection dataset, checked when built so that bad input fails in one clear sentence."""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .transforms import finalize_boxes

_REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def read_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Load a COCO instances file and check everything later code relies on."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file '{path}' does not exist; check data.train_ann / data.val_ann (or data.root, "
            "which expects root/annotations/instances_{train,val}.json)."
        )
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotation file '{path}' is not valid JSON ({exc}); re-export it as a COCO instances "
                         "JSON file.") from None
    lists = [key for key in _REQUIRED_KEYS if isinstance(data, dict) and isinstance(data.get(key), list)]
    if len(lists) != len(_REQUIRED_KEYS):
        raise ValueError(
            f"annotation file '{path}' is not in COCO format: it needs top-level lists 'images', 'annotations' "
            f"and 'categories' (found {lists or 'none'})."
        )
    for section, keys in _REQUIRED_KEYS.items():
        for i, entry in enumerate(data[section]):
            lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if lacking:
                raise ValueError(f"annotation file '{path}': {section}[{i}] lacks {lacking}; every entry of "
                                 f"'{section}' needs {list(keys)}.")
    _check_references(path, data)
    return data


def _check_references(path: Path, data: dict[str, Any]) -> None:
    """Ids must be unique and resolvable: pycocotools silently overwrites or drops what is not."""
    for section in _REQUIRED_KEYS:
        ids = [entry["id"] for entry in data[section]]
        if len(set(ids)) != len(ids):
            raise ValueError(f"annotation file '{path}' repeats an id in '{section}'; every {section[:-1]} needs a "
                             "unique id.")
    category_ids = {c["id"] for c in data["categories"]}
    bad = [c for c in category_ids if not isinstance(c, int) or c < 0]
    if bad:
        raise ValueError(f"annotation file '{path}' has category id {bad[0]!r}; category ids must be non-negative "
                         "integers (they are the class indices).")
    for i, img in enumerate(data["images"]):
        if not all(isinstance(img[k], (int, float)) and img[k] > 0 for k in ("width", "height")):
            raise ValueError(f"annotation file '{path}': images[{i}] has width {img['width']!r} and height "
                             f"{img['height']!r}; both must be the image's positive size in pixels.")
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"annotation file '{path}': annotations[{i}].bbox is {bbox!r}; it must be four numbers "
                             "[x, y, width, height].")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"annotation file '{path}': annotations[{i}] refers to image_id {ann['image_id']!r}, "
                             "which is not in 'images'; add the image or remove the annotation.")
        if ann["category_id"] not in category_ids:
            raise ValueError(f"annotation file '{path}': annotations[{i}] has category_id {ann['category_id']!r}, "
                             "which is not in 'categories'; add the category or remove the annotation.")


def build_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO index over already-checked data (box-only, so it stays small)."""
    for ann in data["annotations"]:
        # Polygons are most of COCO's memory and box evaluation never reads them.
        ann.pop("segmentation", None)
        # Exports without these fields are common; COCOeval needs them.
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """(image, target) pairs; target = labels, boxes (cxcywh normalized by the image), image_id, orig_size, size.

    Class index = category id. Crowd boxes are dropped; boxes are clipped to their image and empty
    ones dropped (one warning per dataset); images without boxes are kept.
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path, transforms: Callable | None = None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = read_coco_json(self.ann_file)
        self.ids = [int(img["id"]) for img in data["images"]]
        self._files = [str(img["file_name"]) for img in data["images"]]
        self._check_image_files()
        self.category_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self._boxes, self._labels, self._starts = self._index_boxes(data)
        self.coco = build_coco(data)

    @property
    def num_classes(self) -> int:
        """Class channels this file needs: max category id + 1."""
        return max(self.category_names, default=-1) + 1

    def _check_image_files(self) -> None:
        missing = [f for f in self._files if not os.path.isfile(self.img_folder / f)]
        if missing:
            shown = ", ".join(f"'{f}'" for f in missing[:3])
            if len(missing) > 3:
                shown += f" and {len(missing) - 3} more"
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in '{self.ann_file}' are missing from '{self.img_folder}' "
                f"({shown}); point data.train_images / data.val_images (or data.root) at this annotation file's "
                "images, or remove those images from it."
            )

    def _index_boxes(self, data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clean boxes into flat arrays with per-image offsets.

        Flat numpy arrays rather than per-image Python lists: DataLoader workers then share the
        pages instead of copying them as reference counts change.
        """
        row = {image_id: i for i, image_id in enumerate(self.ids)}
        anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
        image_index = np.array([row[a["image_id"]] for a in anns], dtype=np.int64)
        labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        sizes = np.array([[img["width"], img["height"]] for img in data["images"]], dtype=np.float64).reshape(-1, 2)
        boxes = np.clip(raw, 0.0, np.tile(sizes[image_index], 2))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        dropped = int((~keep).sum())
        clipped = int((keep & (boxes != raw).any(axis=1)).sum())
        if dropped or clipped:
            warnings.warn(
                f"'{self.ann_file}': {clipped} box(es) extend outside their image and were clipped to it, and "
                f"{dropped} box(es) are empty (zero or negative area after clipping) and were dropped.",
                UserWarning, stacklevel=3,
            )
        image_index, boxes, labels = image_index[keep], boxes[keep], labels[keep]
        order = np.argsort(image_index, kind="stable")
        starts = np.searchsorted(image_index[order], np.arange(len(self.ids) + 1))
        return boxes[order].astype(np.float32), labels[order], starts

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        with Image.open(self.img_folder / self._files[index]) as im:
            image = im.convert("RGB")
        w, h = image.size
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(self._boxes[lo:hi].copy()), format="XYXY",
                                         canvas_size=(h, w))
        # The file, not the JSON, says how big the image is: clip again in case they disagree.
        target = {"boxes": TF.clamp_bounding_boxes(boxes), "labels": torch.from_numpy(self._labels[lo:hi].copy())}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        size = tuple(int(v) for v in image.shape[-2:])
        boxes, labels = finalize_boxes(target["boxes"], target["labels"], size)
        return image, {
            "labels": labels,
            "boxes": boxes,
            "image_id": self.ids[index],
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
        }
