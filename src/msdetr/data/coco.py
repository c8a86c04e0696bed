"""COCO-format detection dataset: validated up front, so bad input fails in one clear sentence."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .transforms import to_normalized_cxcywh


def read_coco_json(ann_file: str | Path) -> dict:
    """Load and check the structure of a COCO instances file."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file '{path}' does not exist; point the data config (train_ann / val_ann) at a "
            "COCO instances JSON."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotation file '{path}' is not valid JSON ({exc}); re-export it in COCO format.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(
            f"annotation file '{path}' is not COCO format: it needs lists 'images', 'annotations' and 'categories'."
        )
    for kind, keys in (("images", ("id", "file_name")), ("annotations", ("image_id", "bbox", "category_id")),
                       ("categories", ("id", "name"))):
        for i, entry in enumerate(data[kind]):
            missing = [k for k in keys if k not in entry]
            if missing:
                raise ValueError(f"annotation file '{path}': {kind}[{i}] lacks {missing}; every entry of "
                                 f"'{kind}' needs {list(keys)}.")
    for i, ann in enumerate(data["annotations"]):
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise ValueError(f"annotation file '{path}': annotations[{i}].bbox must be [x, y, width, height].")
    return data


def num_classes_of(data: dict) -> int:
    """Class ids are category ids (as the official code does): max id + 1 channels."""
    return max((int(c["id"]) for c in data["categories"]), default=0) + 1


class CocoDetection(Dataset):
    """(image, target) pairs; target: labels, boxes (normalized cxcywh), image_id, orig_size, size."""

    def __init__(self, img_folder: str | Path, ann_file: str | Path, transforms: Callable | None = None,
                 num_classes: int | None = None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = read_coco_json(self.ann_file)
        self.coco = COCO()
        self.coco.dataset = data
        with _quiet():
            self.coco.createIndex()
        self.category_names = {int(c["id"]): c["name"] for c in data["categories"]}
        self.num_classes = num_classes_of(data)
        self.ids = [int(img["id"]) for img in data["images"]]
        self._check_images(data["images"])
        if num_classes is not None:
            self.check_num_classes(num_classes)
        self._annotations, dropped = self._clean_annotations(data)
        if dropped:
            warnings.warn(
                f"{self.ann_file}: {dropped} box(es) have zero area or lie outside their image; they were clipped "
                "or dropped (crowd boxes are always dropped).", stacklevel=2)

    def _check_images(self, images: list[dict]) -> None:
        missing = [img["file_name"] for img in images if not (self.img_folder / img["file_name"]).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"{len(missing)} image(s) listed in '{self.ann_file}' are not in '{self.img_folder}' ({shown}); "
                "check the images folder (train_images / val_images) or remove them from the annotations."
            )

    def check_num_classes(self, num_classes: int) -> None:
        too_big = sorted(c for c in self.category_names if c >= num_classes or c < 0)
        if too_big:
            raise ValueError(
                f"'{self.ann_file}' has category id {too_big[0]}, which the model (num_classes={num_classes}) has "
                f"no class for; set num_classes to at least {max(too_big) + 1} (class index = category id)."
            )

    def _clean_annotations(self, data: dict) -> tuple[dict[int, list[tuple[int, list[float]]]], int]:
        sizes = {int(img["id"]): (img.get("width"), img.get("height")) for img in data["images"]}
        per_image: dict[int, list[tuple[int, list[float]]]] = {i: [] for i in self.ids}
        dropped = 0
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
            iw, ih = sizes.get(int(ann["image_id"]), (None, None))
            if iw is not None and ih is not None:
                box = [min(max(box[0], 0.0), iw), min(max(box[1], 0.0), ih),
                       min(max(box[2], 0.0), iw), min(max(box[3], 0.0), ih)]
            if box != [x, y, x + w, y + h] or box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            x0, y0, x1, y1 = box
            per_image.setdefault(int(ann["image_id"]), []).append((int(ann["category_id"]), [x0, y0, x1, y1]))
        return per_image, dropped

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        with Image.open(self.img_folder / info["file_name"]) as im:
            image = im.convert("RGB")
        w, h = image.size
        anns = self._annotations.get(image_id, [])
        boxes = torch.tensor([b for _, b in anns], dtype=torch.float32).reshape(-1, 4)
        # Boxes were clipped against the JSON's sizes; clip again in case the file disagrees with them.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([c for c, _ in anns], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        size = tuple(image.shape[-2:])
        return image, {
            "boxes": to_normalized_cxcywh(target["boxes"]),
            "labels": target["labels"],
            "image_id": image_id,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
        }


def _quiet():
    """pycocotools prints progress lines on every index build; keep logs readable."""
    return contextlib.redirect_stdout(io.StringIO())
