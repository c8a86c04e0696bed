"""A small COCO-format dataset of coloured shapes on textured backgrounds, learnable on a CPU in
minutes.

python -m msdetr.data.synthetic <root> writes root/{train,val}/*.png and
root/annotations/instances_{train,val}.json.
Every annotation has an exact instance mask: the pixels its shape was drawn on, as compressed RLE.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ..files import atomic_write


def _fit_unit_box(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Stretch a polygon so that it touches all four sides of the unit box (tight ground-truth
    boxes)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [
        ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
        for x, y in points
    ]


def _regular_polygon(corners: int) -> list[tuple[float, float]]:
    """A regular polygon with a vertex at the top."""
    return [
        (math.sin(2 * math.pi * k / corners), -math.cos(2 * math.pi * k / corners))
        for k in range(corners)
    ]


_STAR = _fit_unit_box(
    [
        (r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
        for k, r in zip(range(10), [1.0, 0.42] * 5)
    ]
)
# Shape outlines in a unit box, (x, y) from the top-left; None = drawn by a PIL primitive.
# Category id k is the k-th shape, and a dataset with num_classes uses the first num_classes.
SHAPES: dict[str, list[tuple[float, float]] | None] = {
    "rectangle": None,
    "ellipse": None,
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "cross": [
        (0.33, 0.0),
        (0.67, 0.0),
        (0.67, 0.33),
        (1.0, 0.33),
        (1.0, 0.67),
        (0.67, 0.67),
        (0.67, 1.0),
        (0.33, 1.0),
        (0.33, 0.67),
        (0.0, 0.67),
        (0.0, 0.33),
        (0.33, 0.33),
    ],
    "ring": None,
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": _STAR,
    "hourglass": [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)],
    "pentagon": _fit_unit_box(_regular_polygon(5)),
    "hexagon": _fit_unit_box(_regular_polygon(6)),
    "arrow": [
        (0.0, 0.3),
        (0.55, 0.3),
        (0.55, 0.0),
        (1.0, 0.5),
        (0.55, 1.0),
        (0.55, 0.7),
        (0.0, 0.7),
    ],
    "trapezoid": [(0.25, 0.0), (0.75, 0.0), (1.0, 1.0), (0.0, 1.0)],
}
SHAPES_BY_ID = dict(enumerate(SHAPES, start=1))  # category id -> shape name


# The layouts write_synthetic_coco draws (see its docstring), with their defaults.
@dataclass(frozen=True)
class Layout:
    image_size: tuple[int, int]
    num_classes: int
    max_objects: int


LAYOUTS = {
    "shapes": Layout(image_size=(96, 192), num_classes=4, max_objects=3),
    "crowded": Layout(image_size=(160, 224), num_classes=len(SHAPES), max_objects=40),
}
# crowded: annotated objects per image from CROWDED_MIN_OBJECTS to max_objects; each object's side
# a log-uniform fraction (CROWDED_SCALE) of the image's shorter side; an object covered by later
# ones until less than CROWDED_MIN_VISIBLE of its pixels (or under CROWDED_MIN_PIXELS) show is not
# annotated.
CROWDED_MIN_OBJECTS = 10
CROWDED_SCALE = (0.06, 0.4)
CROWDED_MIN_VISIBLE = 0.35
CROWDED_MIN_PIXELS = 12
# Bump when the drawing or the annotations change, so old copies are rewritten (3: masks; 4: the
# crowded layout, in the manifest).
_FORMAT_VERSION = 4


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colour gradient plus oriented stripes: texture the detector must learn to ignore."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = rng.uniform(-50, 50, size=(2, 3))
    img = (
        rng.uniform(50, 200, size=3) + (yy / h)[..., None] * ramp[0] + (xx / w)[..., None] * ramp[1]
    )
    angle, period = rng.uniform(0, math.pi), rng.uniform(5, 24)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    img += np.sin(phase)[..., None] * rng.uniform(4, 24, size=3)
    return img


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background under the object to be seen."""
    colour = rng.integers(0, 256, size=3)
    for _ in range(20):
        if np.abs(colour - under).mean() >= 70:
            break
        colour = rng.integers(0, 256, size=3)
    r, g, b = (int(c) for c in colour)
    return r, g, b


Box = tuple[int, int, int, int]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: Box, colour: int | tuple) -> None:
    # PIL fills both end pixels, so the shape spans [x0, x1) exactly when drawn up to x1 - 1.
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if name == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif name == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif name == "ring":
        draw.ellipse(
            (x0, y0, x1, y1), outline=colour, width=max(2, round(0.2 * min(x1 - x0, y1 - y0)))
        )
    else:
        corners = SHAPES[name]
        assert corners is not None, f"{name} is drawn by PIL, not as a polygon"
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in corners], fill=colour)


def shape_mask(name: str, box: Box, height: int, width: int) -> np.ndarray:
    """uint8 (height, width) mask of the pixels that `_draw_shape` fills for `name` in `box`: the
    same PIL call on a one-channel canvas (PIL rasterizes a shape the same in every mode)."""
    canvas = Image.new("L", (width, height), 0)
    _draw_shape(ImageDraw.Draw(canvas), name, box, 1)
    return np.asarray(canvas, dtype=np.uint8)


def mask_rle(mask: np.ndarray) -> dict:
    """A (h, w) binary mask as COCO compressed RLE with a str counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _render(
    rng: np.random.Generator,
    size_range: Sequence[int],
    num_classes: int,
    max_objects: int,
    noise: float = 6.0,
) -> tuple[Image.Image, list[tuple[int, Box, tuple[int, int, int]]]]:
    """(image, [(category, xyxy box, colour)]); every shape is filled with its one colour before the
    Gaussian pixel noise of standard deviation `noise` is added."""
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    background = _background(rng, h, w)
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    names = list(SHAPES)[:num_classes]
    objects: list[tuple[int, Box, tuple[int, int, int]]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            bw = max(8, round(rng.uniform(0.2, 0.6) * w))
            bh = max(8, round(rng.uniform(0.2, 0.6) * h))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            # Disjoint boxes with a small gap: every object stays fully visible.
            if all(
                box[0] >= o[2] + 2 or o[0] >= box[2] + 2 or box[1] >= o[3] + 2 or o[1] >= box[3] + 2
                for _, o, _ in objects
            ):
                break
        else:
            continue
        category = int(rng.integers(1, num_classes + 1))
        colour = _contrasting_colour(rng, background[y0 : y0 + bh, x0 : x0 + bw].mean(axis=(0, 1)))
        _draw_shape(draw, names[category - 1], box, colour)
        objects.append((category, box, colour))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), objects


def _render_crowded(
    rng: np.random.Generator,
    size_range: Sequence[int],
    num_classes: int,
    max_objects: int,
    noise: float = 6.0,
) -> tuple[Image.Image, list[tuple[int, Box, np.ndarray]]]:
    """(image, [(category, xyxy box, visible mask)]) of a crowded scene: shapes drawn one over
    another, each over what is already there, so a later shape occludes the earlier ones, until
    the image holds n annotated objects, n drawn uniformly from CROWDED_MIN_OBJECTS to
    `max_objects`. Each object's mask is the pixels of it that stay visible and its box that mask's
    tight box (as COCO's boxes are). An object covered until less than CROWDED_MIN_VISIBLE of its
    drawn pixels, or fewer than CROWDED_MIN_PIXELS, show is not annotated: it stays in the image as
    clutter, as unlabelled fragments do in real data."""
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    img = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    names = list(SHAPES)[:num_classes]
    owner = np.full((h, w), -1, dtype=np.int32)  # which drawn object each pixel shows
    drawn: list[tuple[int, int]] = []  # (category, pixels drawn) per drawn object
    low, high = (math.log(f * min(h, w)) for f in CROWDED_SCALE)
    wanted = int(rng.integers(min(CROWDED_MIN_OBJECTS, max_objects), max_objects + 1))

    def annotated() -> list[int]:
        shown = np.bincount(owner.ravel() + 1, minlength=len(drawn) + 1)[1:]
        return [
            i
            for i, (_, pixels) in enumerate(drawn)
            if shown[i] >= CROWDED_MIN_PIXELS and shown[i] >= CROWDED_MIN_VISIBLE * pixels
        ]

    visible = []
    for _attempt in range(3 * wanted):  # a few tries more: a new shape can hide older ones
        side = math.exp(rng.uniform(low, high))
        aspect = math.exp(rng.uniform(-0.5, 0.5))  # width / height from about 0.6 to 1.65
        bw = min(w, max(4, round(side * math.sqrt(aspect))))
        bh = min(h, max(4, round(side / math.sqrt(aspect))))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        category = int(rng.integers(1, num_classes + 1))
        under = np.asarray(img, dtype=np.float32)[y0 : y0 + bh, x0 : x0 + bw].mean(axis=(0, 1))
        _draw_shape(draw, names[category - 1], box, _contrasting_colour(rng, under))
        mask = shape_mask(names[category - 1], box, h, w).astype(bool)
        owner[mask] = len(drawn)
        drawn.append((category, int(mask.sum())))
        visible = annotated()
        if len(visible) >= wanted:
            break
    objects: list[tuple[int, Box, np.ndarray]] = []
    for index in visible:
        ys, xs = np.nonzero(owner == index)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append((drawn[index][0], box, (owner == index).astype(np.uint8)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), objects


def write_synthetic_coco(
    root: str | Path,
    num_train: int = 256,
    num_val: int = 32,
    image_size: Sequence[int] | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    max_objects: int | None = None,
    layout: str = "shapes",
) -> Path:
    """Write the shapes dataset under `root`; a no-op if `root` already holds it with these
    settings. `image_size`, `num_classes` and `max_objects` default to the layout's (LAYOUTS).

    Each image side is uniform in `image_size` (min, max); category ids are 1..num_classes (at most
    len(SHAPES)). Deterministic in `seed`; image i of a split does not depend on how many images are
    written. Each annotation's segmentation is the exact mask of its shape as compressed RLE.

    - layout "shapes" (the default run's data): 1..max_objects shapes that never overlap, each
      20-60% of the image side, fully visible; the mask is the drawn shape (`shape_mask`) and the
      area stays the box's, as before masks, so box metrics stay comparable.
    - layout "crowded": CROWDED_MIN_OBJECTS..max_objects annotated shapes over a wide range of
      scales that overlap and occlude each other (`_render_crowded`); the mask is the visible part,
      the box its tight box and the area its pixel count, as in COCO.
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"data.synthetic_layout={layout!r} is not a layout; use one of {sorted(LAYOUTS)}."
        )
    defaults = LAYOUTS[layout]
    size = [int(v) for v in (defaults.image_size if image_size is None else image_size)]
    num_classes = defaults.num_classes if num_classes is None else int(num_classes)
    max_objects = defaults.max_objects if max_objects is None else int(max_objects)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"num_classes={num_classes}: the synthetic set has 1 to {len(SHAPES)} shape classes."
        )
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects}: an image needs at least one object.")
    root = Path(root)
    settings = {
        "format": _FORMAT_VERSION,
        "layout": layout,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": size,
        "seed": seed,
        "num_classes": num_classes,
        "max_objects": max_objects,
    }
    manifest = root / "synthetic.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return root
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(list(SHAPES)[:num_classes])
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (root / split).mkdir(parents=True, exist_ok=True)
        images: list[dict] = []
        annotations: list[dict] = []
        for image_id in range(1, count + 1):
            rng = np.random.default_rng([seed, split_index, image_id])
            if layout == "crowded":
                img, objects = _render_crowded(rng, size, num_classes, max_objects)
            else:
                img, shapes = _render(rng, size, num_classes, max_objects)
                objects = [
                    (c, box, shape_mask(SHAPES_BY_ID[c], box, img.height, img.width))
                    for c, box, _ in shapes
                ]
            file_name = f"{image_id:06d}.png"
            atomic_write(root / split / file_name, partial(img.save, format="PNG"))
            images.append(
                {"id": image_id, "file_name": file_name, "width": img.width, "height": img.height}
            )
            for category, (x0, y0, x1, y1), mask in objects:
                box_area = (x1 - x0) * (y1 - y0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(mask.sum()) if layout == "crowded" else box_area,
                        "segmentation": mask_rle(mask),
                        "iscrowd": 0,
                    }
                )
        coco = {"images": images, "annotations": annotations, "categories": categories}
        atomic_write(
            root / "annotations" / f"instances_{split}.json",
            partial(Path.write_text, data=json.dumps(coco)),
        )
    # Last, so an interrupted write is redone on the next call.
    atomic_write(manifest, lambda p: p.write_text(json.dumps(settings)))
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic COCO-format shapes dataset.")
    parser.add_argument("root", help="output folder (gets train/, val/ and annotations/)")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="shapes",
        help="shapes: 1-3 separate shapes of 4 classes; crowded: 10-40 overlapping shapes of "
        f"{len(SHAPES)} classes (the defaults below follow the layout)",
    )
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="range of each image side in pixels",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help=f"shape classes, 1 to {len(SHAPES)}"
    )
    parser.add_argument("--max-objects", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_synthetic_coco(
        args.root,
        args.num_train,
        args.num_val,
        args.image_size,
        args.seed,
        args.num_classes,
        args.max_objects,
        args.layout,
    )
    print(f"synthetic COCO dataset in {root}")


if __name__ == "__main__":
    main()
