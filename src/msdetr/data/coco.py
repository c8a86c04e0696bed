"""COCO-format detection (and instance segmentation) dataset, checked when built so that bad input
fails in one clear sentence."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..files import atomic_write
from .transforms import finalize_target

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
            f"annotation file '{path}' does not exist; check data.train_ann / data.val_ann (or "
            "data.root, which expects root/annotations/instances_{train,val}.json)."
        )
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"annotation file '{path}' is not valid JSON ({exc}); re-export it as a COCO instances "
            "JSON file."
        ) from None
    lists = [
        key for key in _REQUIRED_KEYS if isinstance(data, dict) and isinstance(data.get(key), list)
    ]
    if len(lists) != len(_REQUIRED_KEYS):
        raise ValueError(
            f"annotation file '{path}' is not in COCO format: it needs top-level lists 'images', "
            f"'annotations' and 'categories' (found {lists or 'none'})."
        )
    for section, keys in _REQUIRED_KEYS.items():
        for i, entry in enumerate(data[section]):
            lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if lacking:
                raise ValueError(
                    f"annotation file '{path}': {section}[{i}] lacks {lacking}; every entry of "
                    f"'{section}' needs {list(keys)}."
                )
    _check_references(path, data)
    return data


def _check_references(path: Path, data: dict[str, Any]) -> None:
    """Ids must be unique and resolvable: pycocotools silently overwrites or drops what is not."""
    for section in _REQUIRED_KEYS:
        ids = [entry["id"] for entry in data[section]]
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"annotation file '{path}' repeats an id in '{section}'; every {section[:-1]} "
                "needs a unique id."
            )
    category_ids = {c["id"] for c in data["categories"]}
    bad = [c for c in category_ids if not isinstance(c, int) or c < 0]
    if bad:
        raise ValueError(
            f"annotation file '{path}' has category id {bad[0]!r}; category ids must be "
            "non-negative integers (they are the class indices)."
        )
    for i, img in enumerate(data["images"]):
        if not all(isinstance(img[k], (int, float)) and img[k] > 0 for k in ("width", "height")):
            raise ValueError(
                f"annotation file '{path}': images[{i}] has width {img['width']!r} and height "
                f"{img['height']!r}; both must be the image's positive size in pixels."
            )
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann["bbox"]
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            raise ValueError(
                f"annotation file '{path}': annotations[{i}].bbox is {bbox!r}; it must be four "
                "numbers [x, y, width, height]."
            )
        if ann["image_id"] not in image_ids:
            raise ValueError(
                f"annotation file '{path}': annotations[{i}] refers to image_id "
                f"{ann['image_id']!r}, which is not in 'images'; add the image or remove the "
                "annotation."
            )
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"annotation file '{path}': annotations[{i}] has category_id "
                f"{ann['category_id']!r}, which is not in 'categories'; add the category or "
                "remove the annotation."
            )


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


# How one annotation's segmentation is kept (see `_segmentation_blob`).
_RLE, _POLYGONS = 0, 1


def _segmentation_blob(segm: Any, height: int, width: int) -> tuple[int, bytes, int] | str:
    """(kind, bytes, polygons dropped) of a COCO segmentation on a `height` x `width` image, or why
    it cannot be read.

    Compressed RLE keeps its counts string (uncompressed RLE is compressed first); polygons keep
    their coordinates as float64 bytes, [k, len_1, ..., len_k, x, y, ...], and are rasterized by
    pycocotools when the image is loaded (rasterizing COCO's 860k training polygons up front would
    take about a minute). Polygons of fewer than 3 points (COCO has a few) are dropped.
    """
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "it is a dict without 'counts' and 'size' (not RLE)"
        size = segm["size"]
        if not (isinstance(size, (list, tuple)) and list(size) == [height, width]):
            return f"its RLE size is {size!r}, but its image is {height}x{width} (height, width)"
        counts = segm["counts"]
        if isinstance(counts, list):
            valid = all(isinstance(v, int) and v >= 0 for v in counts)
            if not valid or sum(counts) != height * width:
                return (
                    f"its uncompressed RLE counts do not add up to the image's "
                    f"{height * width} pixels"
                )
            return _RLE, mask_utils.frPyObjects(segm, height, width)["counts"], 0
        if isinstance(counts, str):
            return _RLE, counts.encode("ascii"), 0
        if isinstance(counts, bytes):
            return _RLE, counts, 0
        return f"its RLE counts are a {type(counts).__name__}, not a list or a string"
    if isinstance(segm, list):
        polygons = []
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2:
                return (
                    "it is a list but not of polygons [x1, y1, x2, y2, ...] (an even count of "
                    "numbers)"
                )
            try:
                polygons.append(np.asarray(poly, dtype=np.float64))
            except (TypeError, ValueError):
                return "a polygon holds something other than numbers"
        kept = [poly for poly in polygons if len(poly) >= 6]
        header = np.array([len(kept), *(len(poly) for poly in kept)], dtype=np.float64)
        return _POLYGONS, np.concatenate([header, *kept]).tobytes(), len(polygons) - len(kept)
    return f"it is a {type(segm).__name__}, neither polygons nor RLE"


def _blob_rle(kind: int, blob: bytes, height: int, width: int) -> dict[str, Any]:
    """The compressed RLE of a `_segmentation_blob` on a `height` x `width` image."""
    if kind == _RLE:
        return {"size": [height, width], "counts": blob}
    values = np.frombuffer(blob, dtype=np.float64)
    k = int(values[0])
    if k == 0:
        return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    bounds = np.cumsum([1 + k, *values[1 : 1 + k].astype(np.int64)])
    polygons = [values[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def fit_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, h, w) masks cropped or zero-padded at the bottom/right to (n, `height`, `width`): an
    image file whose size differs from its annotated one keeps its annotations' pixel coordinates
    (its boxes are clipped, not scaled), and so do its masks."""
    n, h, w = masks.shape
    if (h, w) == (height, width):
        return masks
    out = np.zeros((n, height, width), dtype=masks.dtype)
    out[:, : min(h, height), : min(w, width)] = masks[:, :height, :width]
    return out


VERIFY_IMAGES = ("header", "full", "none")
# Pixel modes that PIL's convert("RGB") maps faithfully. 16- and 32-bit integer and float modes
# ('I;16', 'I', 'F') would come out clipped to 0..255, mostly white: refused rather than trained on.
_RGB_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_SHOWN = 10  # files named in one message; the rest are counted


class UnreadableImageError(OSError):
    """An image file that is missing, not an image, in an unsupported pixel mode, or that fails to
    decode."""


def _mode_problem(mode: str) -> str | None:
    if mode in _RGB_MODES:
        return None
    return (
        f"pixel mode '{mode}' (16/32-bit or float) is not supported; save it as an 8-bit RGB or "
        "grayscale image"
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def probe_image(
    path: str | os.PathLike, decode: bool = False
) -> tuple[str | None, tuple[int, int] | None]:
    """(why `path` cannot be used as an image or None, its (width, height) or None).

    The header (PIL `Image.open`: format, mode, size) is always read; `decode=True` also decodes
    every pixel, which is what finds a truncated file (its header is intact)."""
    try:
        with Image.open(path) as im:
            problem = _mode_problem(im.mode)
            if problem is None and min(im.size) < 1:
                problem = f"it is {im.size[0]}x{im.size[1]} pixels"
            if problem is None and decode:
                im.load()
            width, height = im.size
            return problem, (width, height)
    # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
    except Exception as exc:
        return _why(exc), None


def verdict_cache_file(img_folder: str | os.PathLike) -> Path:
    """Where `verify_images=full` keeps the files of `img_folder` that decoded completely, each with
    its size and modification time: $MSDETR_CACHE_DIR, else $XDG_CACHE_HOME/msdetr, else
    ~/.cache/msdetr, under verified_images/ (one file per image folder)."""
    base = os.environ.get("MSDETR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "msdetr",
    )
    key = hashlib.sha1(str(Path(img_folder).resolve()).encode()).hexdigest()[:16]
    return Path(base) / "verified_images" / f"{key}.json"


def _read_verdicts(path: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as 8-bit RGB, fully decoded; anything that prevents it raises
    UnreadableImageError naming the file and the reason."""
    try:
        with Image.open(path) as im:
            problem = _mode_problem(im.mode)
            if problem is None:
                return im.convert("RGB")
    except Exception as exc:
        problem = _why(exc)
    raise UnreadableImageError(f"image '{path}' cannot be read ({problem})")


def _name_files(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


class CocoDetection(Dataset):
    """(image, target) pairs. The target dict:

    - "labels": int64 (N,), class index = category id.
    - "boxes": float32 (N, 4) cxcywh divided by (w, h) = "size": the transformed image's own
      (unpadded) extent, so [0, 1] spans the valid region, not the padded batch.
    - "masks" (only with `masks=True`): bool (N, h, w), (h, w) = "size", row i the instance of box
      i. Pixel [y, x] covers [x, x + 1) x [y, y + 1) of the transformed image, so its normalized
      centre is ((x + 0.5) / w, (y + 0.5) / h), the frame of "boxes". Not padded by `collate`.
    - "image_id": int; "orig_size": int64 (2,) (h, w) of the image file; "size": int64 (2,) (h, w)
      after the transforms.

    Crowd annotations are dropped (with their masks); boxes are clipped to their image and empty
    ones dropped with their masks (one warning per dataset); images without boxes are kept.

    `masks=True` reads every annotation's `segmentation` (polygons, uncompressed or compressed
    RLE, through pycocotools at the image's annotated height x width) and refuses, in one sentence,
    a file in which some annotation has none. Segmentations are kept compactly in flat arrays
    (compressed RLE bytes or polygon coordinates) and rasterized per image in __getitem__. An image
    file whose size differs from the annotated one gets its masks cropped or zero-padded at the
    bottom/right to the file's size (its boxes are clipped the same way). `coco`, the ground truth
    for evaluation, then carries every annotation's segmentation (crowd ones included) as
    compressed RLE, attached the first time it is read.

    Image files are checked when the dataset is built: `verify_images="header"` (default) opens
    each file's header (format, pixel mode, size; a truncated file passes), `"full"` decodes every
    image, `"none"` only checks that the files exist. Bad files are an error that names them, or,
    with `skip_bad_images=True`, are left out (with their annotations) with one warning naming
    them. A file that still fails to decode while loading raises an error naming it, or, with
    `skip_bad_images=True`, is replaced by the next readable image with a warning naming it.
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        verify_images: str = "header",
        skip_bad_images: bool = False,
        masks: bool = False,
    ):
        if verify_images not in VERIFY_IMAGES:
            raise ValueError(
                f"data.verify_images={verify_images!r} is not a check; use 'header' (default: each "
                "file's header), 'full' (decode every image) or 'none'."
            )
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.verify_images = verify_images
        self.skip_bad_images = bool(skip_bad_images)
        self.masks = bool(masks)
        data = read_coco_json(self.ann_file)
        data = self._check_images(data)
        self.ids = [int(img["id"]) for img in data["images"]]
        self._files = [str(img["file_name"]) for img in data["images"]]
        # The annotated (height, width) of each image: segmentations are rasterized at this size.
        self._image_sizes = np.array(
            [[img["height"], img["width"]] for img in data["images"]], dtype=np.int64
        ).reshape(-1, 2)
        # indices found undecodable while loading (skip_bad_images)
        self._unreadable: set[int] = set()
        self.category_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        if self.masks:
            self._segm_kinds, self._segm_bytes, self._segm_starts = self._index_segmentations(data)
        self._boxes, self._labels, self._starts, self._mask_rows = self._index_boxes(data)
        self._coco = build_coco(data)
        self._segm_pending = self.masks  # the ground truth's segmentations, attached on first use

    @property
    def coco(self) -> COCO:
        """The pycocotools ground truth of the images kept; with `masks=True` every annotation
        carries its segmentation as compressed RLE (counts a str), as COCOeval(iouType='segm')
        reads it. A training set, which is never evaluated, never builds them."""
        if self._segm_pending:
            for row, ann in enumerate(self._coco.dataset["annotations"]):
                image = self._coco.imgs[ann["image_id"]]
                rle = self._rle(row, int(image["height"]), int(image["width"]))
                counts = rle["counts"]
                if isinstance(counts, bytes):
                    counts = counts.decode("ascii")
                ann["segmentation"] = {
                    "size": [int(image["height"]), int(image["width"])],
                    "counts": counts,
                }
            self._segm_pending = False
        return self._coco

    @property
    def num_classes(self) -> int:
        """Class channels this file needs: max category id + 1."""
        return max(self.category_names, default=-1) + 1

    def _check_images(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` without the images that cannot be used (skip_bad_images), or an error naming
        them."""
        files = [str(img["file_name"]) for img in data["images"]]
        bad = {
            i: "the file does not exist"
            for i, f in enumerate(files)
            if not os.path.isfile(self.img_folder / f)
        }
        if bad and not self.skip_bad_images:
            missing = [files[i] for i in bad]
            shown = ", ".join(f"'{f}'" for f in missing[:3])
            if len(missing) > 3:
                shown += f" and {len(missing) - 3} more"
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in '{self.ann_file}' are missing from "
                f"'{self.img_folder}' ({shown}); point data.train_images / data.val_images (or "
                "data.root) at this annotation file's images, or remove those images from it "
                "(data.skip_bad_images=true leaves them out)."
            )
        if self.verify_images != "none":
            todo = [i for i in range(len(files)) if i not in bad]
            decode = self.verify_images == "full"
            # Full decoding is the slow check (COCO: 118k JPEGs): the threads decode in parallel
            # (PIL releases the GIL while decoding), and a file that decoded before, with the same
            # size and modification time, is not decoded again.
            cache = verdict_cache_file(self.img_folder) if decode else None
            known = _read_verdicts(cache) if cache else {}

            def probe(i: int):
                path = self.img_folder / files[i]
                stamp = _stamp(path) if decode else None
                entry = known.get(files[i])
                if stamp and entry and entry[:2] == stamp:
                    return None, (entry[2], entry[3]), stamp
                return (*probe_image(path, decode), stamp)

            verified = {}
            with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
                probes = pool.map(probe, todo)
                mismatched = []
                for i, (problem, size, stamp) in zip(todo, probes):
                    if problem is not None:
                        bad[i] = problem
                        continue
                    if stamp:
                        verified[files[i]] = [*stamp, *size]
                    if size != (data["images"][i]["width"], data["images"][i]["height"]):
                        mismatched.append(
                            f"'{self.img_folder / files[i]}' is {size[0]}x{size[1]}, the "
                            "annotation file says "
                            f"{data['images'][i]['width']}x{data['images'][i]['height']}"
                        )
            if cache and verified and verified != {k: known.get(k) for k in verified}:
                # a read-only cache only costs the next run the decoding
                with contextlib.suppress(OSError):
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    merged = {**known, **verified}
                    atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(merged)))
            if mismatched:
                warnings.warn(
                    f"'{self.ann_file}': {len(mismatched)} image(s) differ in size from their "
                    f"width/height there ({_name_files(mismatched)}); their boxes are clipped to "
                    "the image file's size.",
                    UserWarning,
                    stacklevel=3,
                )
        if not bad:
            return data
        listed = [f"'{self.img_folder / files[i]}' ({why})" for i, why in sorted(bad.items())]
        if not self.skip_bad_images:
            raise ValueError(
                f"{len(bad)} image file(s) listed in '{self.ann_file}' cannot be used: "
                f"{_name_files(listed)}; fix or remove these files (or their entries in the "
                "annotation file), or set data.skip_bad_images=true to leave them out with a "
                "warning."
            )
        if len(bad) == len(files):
            raise ValueError(
                f"none of the {len(files)} image file(s) listed in '{self.ann_file}' can be used "
                f"({_name_files(listed)}); check data.train_images / data.val_images (or "
                "data.root)."
            )
        warnings.warn(
            f"data.skip_bad_images=true: leaving out {len(bad)} of the {len(files)} image(s) "
            f"listed in '{self.ann_file}', and their annotations, because they cannot be used: "
            f"{_name_files(listed)}.",
            UserWarning,
            stacklevel=3,
        )
        dropped = {data["images"][i]["id"] for i in bad}
        return {
            **data,
            "images": [img for img in data["images"] if img["id"] not in dropped],
            "annotations": [a for a in data["annotations"] if a["image_id"] not in dropped],
        }

    def _index_segmentations(
        self, data: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every annotation's segmentation (crowd ones too: the evaluation needs them) as one flat
        byte buffer: (kinds (n,) int8, bytes (total,) uint8, starts (n + 1,) int64), in the order
        of data["annotations"]. Refuses a file in which an annotation has none or an unreadable
        one."""
        sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in data["images"]}
        annotations = data["annotations"]
        lacking = [i for i, a in enumerate(annotations) if not a.get("segmentation")]
        if lacking:
            first = lacking[0]
            more = (
                f" (and {len(lacking) - 1} more of the {len(annotations)})"
                if len(lacking) > 1
                else ""
            )
            raise ValueError(
                f"data.masks=true needs a segmentation on every annotation, but in "
                f"'{self.ann_file}' annotations[{first}] (id {annotations[first]['id']}){more} has "
                "none; add polygons or RLE to them, or set data.masks=false to train boxes only."
            )
        kinds = np.zeros(len(annotations), dtype=np.int8)
        blobs: list[bytes] = []
        dropped = emptied = 0
        for i, ann in enumerate(annotations):
            found = _segmentation_blob(ann["segmentation"], *sizes[ann["image_id"]])
            if isinstance(found, str):
                raise ValueError(
                    f"annotation file '{self.ann_file}': annotations[{i}] (id "
                    f"{ann['id']}) has a segmentation that cannot be read ({found}); "
                    "fix it, or set data.masks=false to train boxes only."
                )
            kinds[i], blob, lost = found
            blobs.append(blob)
            dropped += lost
            # all of its polygons dropped: the blob's polygon count (its first float64) is 0
            emptied += lost > 0 and np.frombuffer(blob[:8], np.float64)[0] == 0
        if dropped:
            warnings.warn(
                f"'{self.ann_file}': {dropped} polygon(s) with fewer than 3 points were "
                f"dropped from their segmentation; {emptied} annotation(s) are left with "
                "an empty mask.",
                UserWarning,
                stacklevel=3,
            )
        starts = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=starts[1:])
        return kinds, np.frombuffer(b"".join(blobs), dtype=np.uint8), starts

    def _rle(self, row: int, height: int, width: int) -> dict[str, Any]:
        """Compressed RLE of annotation `row` (of the file's kept images) at `height` x `width`."""
        blob = self._segm_bytes[self._segm_starts[row] : self._segm_starts[row + 1]].tobytes()
        return _blob_rle(int(self._segm_kinds[row]), blob, height, width)

    def _index_boxes(
        self, data: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Clean boxes into flat arrays with per-image offsets, and the annotation row of each box.

        Flat numpy arrays rather than per-image Python lists: DataLoader workers then share the
        pages instead of copying them as reference counts change.
        """
        row = {image_id: i for i, image_id in enumerate(self.ids)}
        rows = np.array(
            [i for i, a in enumerate(data["annotations"]) if not a.get("iscrowd", 0)],
            dtype=np.int64,
        )
        anns = [data["annotations"][i] for i in rows]
        image_index = np.array([row[a["image_id"]] for a in anns], dtype=np.int64)
        labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        sizes = np.array(
            [[img["width"], img["height"]] for img in data["images"]], dtype=np.float64
        ).reshape(-1, 2)
        boxes = np.clip(raw, 0.0, np.tile(sizes[image_index], 2))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        dropped = int((~keep).sum())
        clipped = int((keep & (boxes != raw).any(axis=1)).sum())
        if dropped or clipped:
            warnings.warn(
                f"'{self.ann_file}': {clipped} box(es) extend outside their image and were "
                f"clipped to it, and {dropped} box(es) are empty (zero or negative area after "
                "clipping) and were dropped.",
                UserWarning,
                stacklevel=3,
            )
        image_index, boxes, labels, rows = image_index[keep], boxes[keep], labels[keep], rows[keep]
        order = np.argsort(image_index, kind="stable")
        starts = np.searchsorted(image_index[order], np.arange(len(self.ids) + 1))
        return boxes[order].astype(np.float32), labels[order], starts, rows[order]

    def _masks(self, index: int, height: int, width: int) -> np.ndarray:
        """uint8 (N, `height`, `width`) masks of image `index`'s boxes, rasterized at its annotated
        size and fitted to the file's (see `fit_masks`)."""
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        h0, w0 = (int(v) for v in self._image_sizes[index])
        if hi == lo:
            return np.zeros((0, height, width), dtype=np.uint8)
        dense = mask_utils.decode([self._rle(int(r), h0, w0) for r in self._mask_rows[lo:hi]])
        return fit_masks(np.ascontiguousarray(dense.transpose(2, 0, 1)), height, width)

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, index: int) -> tuple[int, Image.Image]:
        """(index, RGB image) of `index`, or, with skip_bad_images, of the next readable image after
        it."""
        for step in range(len(self.ids)):
            i = (index + step) % len(self.ids)
            if i in self._unreadable:
                continue
            try:
                return i, load_rgb(self.img_folder / self._files[i])
            except UnreadableImageError as exc:
                if not self.skip_bad_images:
                    found = (
                        ""
                        if self.verify_images == "full"
                        else f" (data.verify_images={self.verify_images} did not decode it when "
                        "the dataset was built; data.verify_images=full finds every such file "
                        "before training)"
                    )
                    raise UnreadableImageError(
                        f"{exc}{found}; fix or remove it, or set data.skip_bad_images=true to "
                        "skip unreadable images with a warning."
                    ) from None
                self._unreadable.add(i)
                warnings.warn(
                    f"{exc}; data.skip_bad_images=true: skipping it, the next readable image of "
                    f"'{self.ann_file}' takes its place.",
                    UserWarning,
                    stacklevel=3,
                )
        raise UnreadableImageError(
            f"none of the {len(self.ids)} image(s) listed in '{self.ann_file}' can be read; "
            "see the warnings above for each file."
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        asked = index
        index, image = self._read(index)
        w, h = image.size
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(self._boxes[lo:hi].copy()), format="XYXY", canvas_size=(h, w)
        )
        # The file, not the JSON, says how big the image is: clip again in case they disagree.
        target = {
            "boxes": TF.clamp_bounding_boxes(boxes),
            "labels": torch.from_numpy(self._labels[lo:hi].copy()),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(self._masks(index, h, w)))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        else:
            image = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        size = tuple(int(v) for v in image.shape[-2:])
        boxes, labels, masks = finalize_target(
            target["boxes"], target["labels"], size, target.get("masks")
        )
        return image, {
            "labels": labels,
            "boxes": boxes,
            **({"masks": masks} if masks is not None else {}),
            "image_id": self.ids[index],
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor(size, dtype=torch.int64),
            # skip_bad_images: the file that could not be read and that this image stands in for
            **({"replaced": str(self.img_folder / self._files[asked])} if index != asked else {}),
        }
