"""Instance masks on the data side: reading every COCO segmentation form, the refusals, masks that
stay aligned with their boxes through every transform, collate, and the synthetic shapes' exact
masks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2

from helpers.data import small_datamodule
from msdetr.data import CocoDetection, collate, write_synthetic_coco
from msdetr.data.synthetic import SHAPES, _render, shape_mask
from msdetr.data.transforms import (
    DetrResize,
    RandomSizeCrop,
    _to_model_input,
    eval_transforms,
    finalize_target,
    train_transforms,
)


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of a (h, w) binary mask: compressed (counts a str) or uncompressed (a list)."""
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def _box_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _mask_box(mask: torch.Tensor) -> list[int]:
    """xyxy pixel-edge box of a (h, w) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _write_dataset(root, images: list[tuple[int, int, int, int]], annotations: list[dict]):
    """PNG files of (id, file width, file height) and a JSON that says (width, height) per image."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, w, h, (jw, jh) in images:
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "img" / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": jw, "height": jh})
    data = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _ann(i: int, image_id: int, bbox: list, segm, category: int = 1, crowd: int = 0) -> dict:
    return {
        "id": i,
        "image_id": image_id,
        "category_id": category,
        "bbox": bbox,
        "iscrowd": crowd,
        "area": bbox[2] * bbox[3],
        **({"segmentation": segm} if segm is not None else {}),
    }


H, W = 40, 50
TRIANGLE = [[5.0, 5.0, 30.0, 5.0, 5.0, 30.0]]
TWO_PARTS = [[35.0, 2.0, 45.0, 2.0, 45.0, 12.0, 35.0, 12.0], [36.0, 20.0, 46.0, 20.0, 41.0, 30.0]]
DISK = np.zeros((H, W), dtype=np.uint8)
DISK[np.hypot(*np.mgrid[0:H, 0:W] - np.array([25, 20])[:, None, None]) < 8] = 1


@pytest.fixture()
def mixed(tmp_path):
    """Image 1: a triangle polygon, a crowd region, a two-polygon object, an empty box; image 2: an
    uncompressed and a compressed RLE; image 3: nothing."""
    anns = [
        _ann(1, 1, [5, 5, 25, 25], TRIANGLE),
        _ann(
            2, 1, [0, 30, 20, 10], _rle(_box_mask(H, W, 0, 30, 20, 40), compressed=False), crowd=1
        ),
        _ann(3, 1, [35, 2, 11, 28], TWO_PARTS, category=2),
        _ann(4, 1, [60, 60, 5, 5], [[1.0, 1.0, 3.0, 1.0, 3.0, 3.0]]),  # outside the image: dropped
        _ann(5, 2, [12, 17, 17, 15], _rle(DISK, compressed=False), category=2),
        _ann(6, 2, [2, 3, 10, 8], _rle(_box_mask(H, W, 2, 3, 12, 11))),
    ]
    return _write_dataset(tmp_path, [(1, W, H, (W, H)), (2, W, H, (W, H)), (3, W, H, (W, H))], anns)


def _expected(path, ann_ids):
    coco = COCO(str(path))
    return torch.stack([torch.from_numpy(coco.annToMask(coco.anns[i])) for i in ann_ids]).bool()


def test_every_segmentation_form_is_read_in_box_order(mixed):
    with pytest.warns(UserWarning, match="1 box"):
        ds = CocoDetection(mixed.parent / "img", mixed, masks=True)
    _, t1 = ds[0]
    assert t1["masks"].dtype == torch.bool and t1["masks"].shape == (2, H, W)
    assert torch.equal(t1["masks"], _expected(mixed, [1, 3]))  # crowd and the empty box left out
    assert t1["labels"].tolist() == [1, 2]
    _, t2 = ds[1]
    assert torch.equal(t2["masks"], _expected(mixed, [5, 6]))
    assert torch.equal(t2["masks"][0], torch.from_numpy(DISK).bool())
    _, t3 = ds[2]
    assert t3["masks"].shape == (0, H, W) and t3["boxes"].shape == (0, 4)


def test_ground_truth_gets_every_segmentation_as_rle(mixed):
    with pytest.warns(UserWarning):
        ds = CocoDetection(mixed.parent / "img", mixed, masks=True)
    original = COCO(str(mixed))
    for ann_id in range(1, 7):  # crowd and dropped ones too: the evaluation needs them
        segm = ds.coco.anns[ann_id]["segmentation"]
        assert isinstance(segm["counts"], str) and segm["size"] == [H, W]
        assert np.array_equal(mask_utils.decode(segm), original.annToMask(original.anns[ann_id]))


def test_without_masks_nothing_changes(mixed, tmp_path):
    with pytest.warns(UserWarning):
        ds = CocoDetection(mixed.parent / "img", mixed)
    _, target = ds[0]
    assert "masks" not in target and "segmentation" not in ds.coco.anns[1]
    # a file without segmentations trains boxes as before
    data = json.loads(mixed.read_text())
    for ann in data["annotations"]:
        ann.pop("segmentation")
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        _, again = CocoDetection(mixed.parent / "img", boxes_only)[0]
    assert torch.equal(again["boxes"], target["boxes"])


def test_masks_refused_on_annotations_without_segmentation(mixed, tmp_path):
    data = json.loads(mixed.read_text())
    data["annotations"][2].pop("segmentation")
    data["annotations"][4]["segmentation"] = []
    path = tmp_path / "lacking.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError,
        match=r"lacking.json' annotations\[2\] \(id 3\) \(and 1 more of the 6\) has "
        r"none.*data.masks=false to train boxes only",
    ):
        CocoDetection(mixed.parent / "img", path, masks=True)


@pytest.mark.parametrize(
    "segm, why",
    [
        ({"size": [H + 1, W], "counts": "abc"}, r"RLE size is \[41, 50\], but its image is 40x50"),
        ({"size": [H, W], "counts": [5, 7]}, "do not add up to the image's 2000 pixels"),
        ([[1.0, 2.0, 3.0]], "even count of numbers"),
        ([["a", "b", "c", "d", "e", "f"]], "other than numbers"),
        ("polygon", "neither polygons nor RLE"),
    ],
)
def test_unreadable_segmentation_is_refused(tmp_path, segm, why):
    path = _write_dataset(tmp_path, [(1, W, H, (W, H))], [_ann(1, 1, [1, 1, 5, 5], segm)])
    with pytest.raises(
        ValueError,
        match=r"annotations\[0\] \(id 1\) has a segmentation that cannot be read \(.*"
        + why
        + ".*data.masks=false",
    ):
        CocoDetection(tmp_path / "img", path, masks=True)


def test_degenerate_polygons_are_dropped_with_one_warning(tmp_path):
    anns = [
        _ann(1, 1, [5, 5, 25, 25], TRIANGLE + [[1.0, 1.0, 2.0, 2.0]]),
        _ann(2, 1, [30, 5, 2, 2], [[30.0, 5.0, 32.0, 7.0]]),
    ]
    path = _write_dataset(tmp_path, [(1, W, H, (W, H))], anns)
    with pytest.warns(
        UserWarning, match="2 polygon.*fewer than 3 points.*1 annotation.*empty mask"
    ):
        ds = CocoDetection(tmp_path / "img", path, masks=True)
    _, target = ds[0]
    assert torch.equal(target["masks"][0], _expected(path, [1])[0]) and not target["masks"][1].any()


def test_image_file_size_differs_from_the_json(tmp_path):
    """Masks keep their pixel coordinates, as boxes do: cropped at the bottom/right of a smaller
    file, zero-padded on a larger one."""
    box = _box_mask(H, W, 10, 20, 45, 38)
    anns = [_ann(1, 1, [10, 20, 35, 18], _rle(box)), _ann(2, 2, [10, 20, 35, 18], _rle(box))]
    path = _write_dataset(tmp_path, [(1, 30, 25, (W, H)), (2, 60, 48, (W, H))], anns)
    with pytest.warns(UserWarning, match="differ in size"):
        ds = CocoDetection(tmp_path / "img", path, masks=True)
    image, small = ds[0]
    assert small["masks"].shape == (1, 25, 30) == (1, *image.shape[-2:])
    assert torch.equal(small["masks"][0], torch.from_numpy(box[:25, :30]).bool())
    assert _mask_box(small["masks"][0]) == [10, 20, 30, 25]
    assert torch.allclose(
        small["boxes"][0] * torch.tensor([30, 25, 30, 25]), torch.tensor([20.0, 22.5, 20, 5])
    )
    _, large = ds[1]
    assert large["masks"].shape == (1, 48, 60) and _mask_box(large["masks"][0]) == [10, 20, 45, 38]
    assert large["masks"][0].sum() == box.sum()


# -- transforms ---------------------------------------------------------------------------------
def _sample(h=90, w=120, boxes=((20, 30, 70, 80), (90, 5, 118, 40), (3, 60, 15, 88))):
    """An image with boxes whose masks fill them exactly."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    masks = torch.stack([torch.from_numpy(_box_mask(h, w, *b)) for b in boxes])
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.arange(1, len(boxes) + 1),
        "masks": tv_tensors.Mask(masks),
    }
    return image, target


def _assert_aligned(image, target, min_kept=1):
    """Each kept mask is binary, at the image's size, and its bounding box is its box within a
    pixel."""
    size = tuple(image.shape[-2:])
    assert target["masks"].shape[-2:] == size
    assert set(torch.unique(target["masks"]).tolist()) <= {0, 1}
    boxes, labels, masks = finalize_target(target["boxes"], target["labels"], size, target["masks"])
    assert masks.dtype == torch.bool and len(masks) == len(boxes) == len(labels) >= min_kept
    h, w = size
    xyxy = torch.cat(
        [boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1
    ) * torch.tensor([w, h, w, h])
    for box, mask in zip(xyxy, masks):
        assert mask.any(), "a kept box lost its whole mask"
        assert torch.allclose(torch.tensor(_mask_box(mask), dtype=torch.float32), box, atol=1.0), (
            box,
            _mask_box(mask),
        )
    return labels


def test_flip_keeps_masks_aligned():
    image, target = _sample()
    out_image, out = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(out["masks"], target["masks"].flip(-1))
    assert _assert_aligned(out_image, out).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "size, max_size", [(37, None), (64, None), (200, None), (150, 160), (91, 1000)]
)
def test_detr_resize_keeps_masks_aligned_and_binary(size, max_size):
    image, target = _sample()
    out_image, out = DetrResize([size], max_size)(image, target)
    assert out["masks"].dtype == torch.uint8  # nearest: no blending, no antialias
    assert _assert_aligned(out_image, out).tolist() == [1, 2, 3]


def test_resize_uses_nearest_for_masks_and_bilinear_for_images():
    image = tv_tensors.Image(torch.tensor([[[0, 255] * 4] * 8], dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.tensor([[[0, 1] * 4] * 8], dtype=torch.uint8))
    out_image, out_mask = DetrResize([5])(image, mask)
    assert out_mask.shape == (1, 5, 5) and set(out_mask.unique().tolist()) == {0, 1}
    assert len(out_image.unique()) > 2  # the image is blended


def test_random_size_crop_keeps_masks_aligned_and_drops_those_of_cropped_out_boxes():
    dropped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = _sample()
        out_image, out = RandomSizeCrop(30, 80)(image, target)
        labels = _assert_aligned(out_image, out, min_kept=0)
        dropped += len(labels) < 3
    assert dropped  # some crops removed a box and its mask


@pytest.mark.parametrize("seed", range(6))
def test_train_and_eval_recipes_keep_masks_aligned(seed):
    torch.manual_seed(seed)
    image, target = _sample()
    out_image, out = train_transforms((64, 80, 96), 160, (80,), (40, 70))(image, target)
    assert out_image.dtype == torch.float32 and out["masks"].dtype == torch.uint8
    _assert_aligned(out_image, out, min_kept=0)
    out_image, out = eval_transforms(72, 120)(image, target)
    assert _assert_aligned(out_image, out).tolist() == [1, 2, 3]


def test_dtype_and_normalize_leave_masks_alone():
    image, target = _sample()
    out_image, out = v2.Compose(_to_model_input())(image, target)
    assert out_image.dtype == torch.float32
    assert out["masks"].dtype == torch.uint8 and torch.equal(out["masks"], target["masks"])


def test_finalize_target_drops_the_masks_of_empty_boxes():
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[1.0, 1, 4, 4], [3, 3, 3, 6], [0, 0, 8, 2]]),
        format="XYXY",
        canvas_size=(6, 8),
    )
    masks = torch.stack([torch.full((6, 8), i, dtype=torch.uint8) for i in (1, 2, 3)])
    out_boxes, labels, out_masks = finalize_target(boxes, torch.tensor([7, 8, 9]), (6, 8), masks)
    assert labels.tolist() == [7, 9] and out_masks.dtype == torch.bool and len(out_boxes) == 2
    assert finalize_target(boxes, torch.tensor([7, 8, 9]), (6, 8))[2] is None
    with pytest.raises(ValueError, match="moved the image without its masks"):
        finalize_target(boxes, torch.tensor([7, 8, 9]), (6, 8), masks[:, :5])


# -- collate and the datamodule -----------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(
        tmp_path_factory.mktemp("synth"), num_train=4, num_val=2, num_classes=8
    )


def test_datamodule_masks_reach_the_batch_unpadded(synth):
    dm = small_datamodule(synth, masks=True)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, padding, targets = next(iter(loader))
        for i, target in enumerate(targets):
            h, w = target["size"].tolist()
            assert (
                target["masks"].shape == (len(target["boxes"]), h, w)
                and target["masks"].dtype == torch.bool
            )
            assert (
                not padding[i, :h, :w].any()
                and padding[i].sum() == padding.shape[1] * padding.shape[2] - h * w
            )
            for box, mask in zip(
                target["boxes"], target["masks"]
            ):  # the valid-region frame of the boxes
                cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
                x0, y0, x1, y1 = _mask_box(mask)
                # Inside its box (a pixel of slack); nearest downscaling may miss a curved shape's
                # thin extremes, so its extent can fall short of the box by a little more.
                assert (
                    cx - bw / 2 - 1 <= x0 <= cx - bw / 2 + 2.5
                    and cx + bw / 2 - 2.5 <= x1 <= cx + bw / 2 + 1
                )
                assert (
                    cy - bh / 2 - 1 <= y0 <= cy - bh / 2 + 2.5
                    and cy + bh / 2 - 2.5 <= y1 <= cy + bh / 2 + 1
                )
    boxes_only = CocoDetection(synth / "val", synth / "annotations" / "instances_val.json")
    assert "masks" not in collate([boxes_only[0]])[2][0]


# -- synthetic shapes ---------------------------------------------------------------------------
def test_synthetic_masks_are_the_drawn_pixels_for_every_shape():
    """Without pixel noise each shape is one colour: its mask is exactly where that colour is in
    its box."""
    seen = set()
    names = list(SHAPES)
    for seed in range(40):
        rng = np.random.default_rng([7, seed])
        image, objects = _render(rng, (48, 80), len(SHAPES), 3, noise=0.0)
        pixels = np.asarray(image)
        for category, (x0, y0, x1, y1), colour in objects:
            mask = shape_mask(names[category - 1], (x0, y0, x1, y1), image.height, image.width)
            painted = np.zeros_like(mask)
            painted[y0:y1, x0:x1] = (pixels[y0:y1, x0:x1] == colour).all(-1)
            assert np.array_equal(mask, painted), names[category - 1]
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [
                x0,
                y0,
                x1,
                y1,
            ]  # boxes stay tight
            seen.add(names[category - 1])
    assert seen == set(SHAPES)


def test_synthetic_annotations_carry_the_masks(synth):
    data = json.loads((synth / "annotations" / "instances_train.json").read_text())
    assert json.loads((synth / "synthetic.json").read_text())["format"] == 4
    for ann in data["annotations"]:
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        x, y, w, h = ann["bbox"]
        name = data["categories"][ann["category_id"] - 1]["name"]
        mask = mask_utils.decode(ann["segmentation"])
        assert np.array_equal(
            mask, shape_mask(name, (x, y, x + w, y + h), image["height"], image["width"])
        )
        assert ann["area"] == w * h
    ds = CocoDetection(synth / "train", synth / "annotations" / "instances_train.json", masks=True)
    _, target = ds[0]
    first = [a for a in data["annotations"] if a["image_id"] == ds.ids[0]]
    assert torch.equal(
        target["masks"],
        torch.stack([torch.from_numpy(mask_utils.decode(a["segmentation"])) for a in first]).bool(),
    )
