"""A small COCO-format dataset of coloured shapes on textured backgrounds, for demos and tests.

python -m msdetr.data.synthetic <root> writes root/{train,val}/*.png and root/annotations/*.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ["rectangle", "ellipse", "triangle", "cross"]
_VERSION = 1


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colour gradient with stripes and noise: texture the detector has to learn to ignore."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    period = rng.uniform(6, 20)
    angle = rng.uniform(0, math.pi)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    img += stripes[..., None] * rng.uniform(5, 20)
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    if cls == 1:
        draw.rectangle(box, fill=colour)
    elif cls == 2:
        draw.ellipse(box, fill=colour)
    elif cls == 3:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # a plus sign whose arms span the box
        tw, th = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + tw, y0, x1 - tw, y1), fill=colour)
        draw.rectangle((x0, y0 + th, x1, y1 - th), fill=colour)


def _image(rng: np.random.Generator, size_range: tuple[int, int], max_objects: int):
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    img = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    anns, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            bw = float(rng.uniform(0.22, 0.55)) * w
            bh = float(rng.uniform(0.22, 0.55)) * h
            x0 = float(rng.uniform(0, w - bw))
            y0 = float(rng.uniform(0, h - bh))
            box = (x0, y0, x0 + bw, y0 + bh)
            # Keep objects mostly apart so every box is visible.
            if all(_iou(box, other) < 0.1 for other in placed):
                break
        else:
            continue
        cls = int(rng.integers(1, len(CATEGORIES) + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        _draw(draw, cls, box, colour)
        placed.append(box)
        anns.append((cls, [round(box[0], 2), round(box[1], 2), round(bw, 2), round(bh, 2)]))
    return img, anns


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def write_synthetic_coco(
    root: str | Path,
    num_train: int = 256,
    num_val: int = 32,
    size_range: tuple[int, int] = (128, 192),
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write (or reuse, if already written with the same settings) the dataset under `root`."""
    root = Path(root)
    settings = {"version": _VERSION, "num_train": num_train, "num_val": num_val, "size_range": list(size_range),
                "max_objects": max_objects, "seed": seed}
    manifest = root / "synthetic.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            img, anns = _image(rng, size_range, max_objects)
            file_name = f"{image_id:06d}.png"
            img.save(root / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": img.height, "width": img.width})
            for cls, bbox in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                    "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0})
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    manifest.write_text(json.dumps(settings))  # written last: a half-written dataset is redone
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic COCO-format shapes dataset.")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write_synthetic_coco(args.root, args.num_train, args.num_val, seed=args.seed))


if __name__ == "__main__":
    main()
