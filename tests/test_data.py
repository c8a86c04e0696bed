"""COCO-format data: synthetic writer, target format, transforms, collate, datamodule and every bad
input."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2

from helpers.data import small_datamodule
from msdetr.data import CocoDataModule, CocoDetection, collate, write_synthetic_coco
from msdetr.data.synthetic import SHAPES, main
from msdetr.data.transforms import (
    COCO_TRAIN_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetrResize,
    RandomSizeCrop,
    detr_resize_size,
    eval_transforms,
    finalize_boxes,
    multi_scale_resize,
    train_transforms,
)

SMALL = dict(num_train=6, num_val=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), **SMALL)


@pytest.fixture()
def editable(synth, tmp_path):
    """A private copy of the synthetic set that a test may break."""
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    return root


def ann_path(root, split="train"):
    return root / "annotations" / f"instances_{split}.json"


def edit_ann(root, change, split="train"):
    data = json.loads(ann_path(root, split).read_text())
    change(data)
    ann_path(root, split).write_text(json.dumps(data))
    return data


# -- synthetic data ------------------------------------------------------------------------------
def test_synthetic_is_deterministic_valid_coco(synth, tmp_path):
    again = write_synthetic_coco(tmp_path / "again", **SMALL)
    for split in ("train", "val"):
        assert ann_path(synth, split).read_bytes() == ann_path(again, split).read_bytes()
    assert (synth / "train" / "000003.png").read_bytes() == (
        again / "train" / "000003.png"
    ).read_bytes()
    coco = COCO(str(ann_path(synth)))
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4] and len(coco.getImgIds()) == 6
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert (
            w > 0
            and h > 0
            and x >= 0
            and y >= 0
            and x + w <= img["width"]
            and y + h <= img["height"]
        )
        # Shapes are large enough to learn quickly: at least a fifth of the image side.
        assert w >= 0.19 * img["width"] and h >= 0.19 * img["height"]
        assert ann["area"] == w * h and ann["iscrowd"] == 0
    for img in coco.dataset["images"]:
        assert 96 <= img["width"] <= 192 and 96 <= img["height"] <= 192
        assert Image.open(synth / "train" / img["file_name"]).size == (img["width"], img["height"])


def test_synthetic_is_idempotent_and_rewrites_on_new_settings(tmp_path):
    root = write_synthetic_coco(tmp_path / "s", **SMALL)
    stamp = ann_path(root).stat().st_mtime_ns
    write_synthetic_coco(root, **SMALL)
    assert ann_path(root).stat().st_mtime_ns == stamp
    write_synthetic_coco(root, num_train=4, num_val=3)
    assert len(json.loads(ann_path(root).read_text())["images"]) == 4


def test_synthetic_more_classes_and_cli(tmp_path, capsys):
    main(
        [
            str(tmp_path / "cli"),
            "--num-train",
            "2",
            "--num-val",
            "1",
            "--num-classes",
            "8",
            "--image-size",
            "64",
            "80",
        ]
    )
    data = json.loads(ann_path(tmp_path / "cli").read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)[:8]
    assert all(64 <= img["width"] <= 80 for img in data["images"])
    assert "synthetic COCO dataset in" in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"1 to {len(SHAPES)} shape classes"):
        write_synthetic_coco(tmp_path / "bad", num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="synthetic_layout='dense' is not a layout"):
        write_synthetic_coco(tmp_path / "bad", layout="dense")


def test_crowded_layout_overlaps_occludes_and_masks_the_visible_part(tmp_path):
    root = write_synthetic_coco(tmp_path / "crowded", num_train=6, num_val=2, layout="crowded")
    again = write_synthetic_coco(tmp_path / "again", num_train=6, num_val=2, layout="crowded")
    assert ann_path(root).read_bytes() == ann_path(again).read_bytes()  # seeded
    data = json.loads(ann_path(root).read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES) and len(SHAPES) >= 10
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    assert len(per_image) == 6 and all(10 <= len(a) <= 40 for a in per_image.values())
    overlapping, sides = 0, []
    for image in data["images"]:
        assert 160 <= image["width"] <= 224 and 160 <= image["height"] <= 224
        anns = per_image[image["id"]]
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in anns]).astype(bool)
        # visible parts: each pixel shows one object at most
        assert masks.sum(0).max() <= 1
        for ann, mask in zip(anns, masks):
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert ann["area"] == mask.sum() >= 12 and ann["iscrowd"] == 0  # COCO: mask area
            sides.append(max(w, h) / min(image["width"], image["height"]))
        x0, y0, w, h = np.array([a["bbox"] for a in anns]).T
        x1, y1 = x0 + w, y0 + h
        inter_w = np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0)
        inter_h = np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0)
        overlapping += int(np.triu((inter_w > 0) & (inter_h > 0), 1).sum())
    assert overlapping >= 6  # boxes overlap: occluded neighbours, not a grid of separate shapes
    assert min(sides) < 0.1 and max(sides) > 0.3  # a wide range of scales


def test_crowded_data_config_builds_the_crowded_set(tmp_path):
    from hydra.utils import instantiate

    from helpers.config import compose

    cfg = compose(
        "experiment=synthetic_crowded",
        f"paths.data_root={tmp_path}",
        "data.synthetic_train=4",
        "data.synthetic_val=1",
        "data.masks=true",
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    settings = json.loads((tmp_path / "synthetic_crowded" / "synthetic.json").read_text())
    assert settings["layout"] == "crowded" and dm.num_classes == len(SHAPES) + 1
    _, target = dm.train_dataset[0]
    assert len(target["boxes"]) >= 5 and target["masks"].shape[0] == len(target["boxes"])


# -- dataset and transforms ----------------------------------------------------------------------
def test_dataset_target_format(synth):
    ds = CocoDetection(synth / "train", ann_path(synth))
    assert (
        len(ds) == 6
        and ds.num_classes == 5
        and ds.category_names == dict(enumerate(list(SHAPES)[:4], 1))
    )
    image, target = ds[1]
    h, w = image.shape[-2:]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert set(target) == {"labels", "boxes", "image_id", "orig_size", "size"}
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["orig_size"].dtype == torch.int64 and target["orig_size"].tolist() == [h, w]
    assert target["size"].tolist() == [h, w] and isinstance(target["image_id"], int)
    anns = ds.coco.imgToAnns[target["image_id"]]
    expected = torch.tensor(
        [
            [
                (a["bbox"][0] + a["bbox"][2] / 2) / w,
                (a["bbox"][1] + a["bbox"][3] / 2) / h,
                a["bbox"][2] / w,
                a["bbox"][3] / h,
            ]
            for a in anns
        ]
    )
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_flip_mirrors_box_centres(synth):
    plain = CocoDetection(synth / "train", ann_path(synth))
    flipped = CocoDetection(
        synth / "train", ann_path(synth), v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(1.0)])
    )
    for i in range(len(plain)):
        a, b = plain[i][1]["boxes"], flipped[i][1]["boxes"]
        torch.testing.assert_close(b[:, 0], 1 - a[:, 0])
        torch.testing.assert_close(b[:, 1:], a[:, 1:])


def _bright_box_sample(h=90, w=120, box=(20, 30, 70, 80)):
    """A white rectangle on black with its box: a transform is right iff the box stays on the bright
    pixels."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, box[1] : box[3], box[0] : box[2]] = 255
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(h, w)
    )
    return tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([1])}


def test_train_transforms_keep_boxes_on_the_object():
    torch.manual_seed(0)
    tf = train_transforms(
        scales=[64, 80, 96], max_size=110, crop_resize=[70, 90], crop_size=(30, 60)
    )
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    kept = 0
    for _ in range(40):
        image, target = tf(*_bright_box_sample())
        assert image.dtype == torch.float32 and max(image.shape[-2:]) <= 110
        bright = (image * std + mean).mean(0) > 0.5
        h, w = image.shape[-2:]
        boxes, labels = finalize_boxes(target["boxes"], target["labels"], (h, w))
        assert ((boxes >= 0) & (boxes <= 1)).all() and len(labels) == len(boxes)
        if len(boxes) == 0:  # cropped away
            assert bright.sum() <= 2 * (h + w)  # at most a resampled sliver along a crop edge
            continue
        kept += 1
        x0, y0, x1, y1 = target["boxes"][0].tolist()
        ys, xs = torch.nonzero(bright, as_tuple=True)
        # Resampling blurs the edge by about a pixel.
        assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
        assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
    assert kept > 20


def test_random_size_crop_bounds():
    torch.manual_seed(0)
    crop = RandomSizeCrop(30, 50)
    for _ in range(30):
        out = crop(tv_tensors.Image(torch.zeros(3, 40, 100)))
        assert 30 <= out.shape[-2] <= 40 and 30 <= out.shape[-1] <= 50
    # smaller than min_size
    assert crop(tv_tensors.Image(torch.zeros(3, 20, 25))).shape[-2:] == (20, 25)
    with pytest.raises(ValueError, match="crop_size must be"):
        RandomSizeCrop(60, 50)


def test_eval_transforms_resize(synth):
    ds = CocoDetection(synth / "val", ann_path(synth, "val"), eval_transforms(64, 80))
    for image, target in (ds[i] for i in range(len(ds))):
        h, w = image.shape[-2:]
        oh, ow = target["orig_size"].tolist()
        assert target["size"].tolist() == [h, w]
        if max(oh, ow) / min(oh, ow) * 64 <= 80:
            assert min(h, w) == 64
        else:  # capped: the official rounding puts the long side within a pixel or two of max_size
            assert abs(max(h, w) - 80) <= 2 and min(h, w) < 64
        assert (h, w) == _official_size(ow, oh, 64, 80)


def _official_size(w, h, size, max_size=None):
    """The official DETR get_size_with_aspect_ratio, transcribed line by line: (w, h) in, (h, w)
    out."""
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def test_detr_resize_size_matches_the_official_rule():
    rng = random.Random(0)
    cases = []
    for _ in range(4000):
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        cases.append((h, w, rng.choice(COCO_TRAIN_SCALES), 1333))
        cases.append((h, w, rng.randint(1, 3000), rng.choice([None, 1333, rng.randint(1, 4000)])))
    for _ in range(2000):  # COCO-like images, where the 1333 cap often applies
        cases.append(
            (rng.randint(200, 640), rng.randint(200, 640), rng.choice(COCO_TRAIN_SCALES), 1333)
        )
    # a side equal to the target, squares, ties and caps that land on a side
    for s in (1, 2, 3, 480, 800):
        for other in {1, max(s - 1, 1), s, s + 1, 2 * s, 3 * s + 1, 1333, 2999}:
            for max_size in (None, s, s + 1, 2 * s, 1333):
                cases += [(s, other, s, max_size), (other, s, s, max_size)]
    # the cap lands exactly on the short side
    cases += [
        (500, 1333, 800, 1333),
        (1333, 500, 800, 1333),
        (90, 120, 96, 110),  # 82.5 rounds to even: 82
        # v2.Resize(max_size=1333) gives 1333 and 691
        (341, 576, 800, 1333),
        (318, 613, 704, 1333),
    ]
    mismatches = [
        c for c in cases if detr_resize_size(*c) != _official_size(c[1], c[0], c[2], c[3])
    ]
    assert not mismatches, mismatches[:10]
    assert detr_resize_size(90, 120, 96, 110) == (82, 109)
    assert detr_resize_size(341, 576, 800, 1333) == (789, 1332)
    assert detr_resize_size(500, 1333, 800, 1333) == (500, 1333)


def _boxes_sample(h, w):
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    boxes = torch.tensor(
        [
            [0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h],
            [0.0, 0.0, w, h],
            [0.5 * w, 0.1 * h, 0.7 * w, 0.3 * h],
        ]
    )
    return image, {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor([1, 2, 3]),
    }


def _assert_official_resize(before, after, size, max_size):
    (image, target), (out, out_target) = before, after
    h, w = image.shape[-2:]
    oh, ow = _official_size(w, h, size, max_size)
    assert tuple(out.shape[-2:]) == (oh, ow) and tuple(out_target["boxes"].canvas_size) == (oh, ow)
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
    torch.testing.assert_close(
        out_target["boxes"].as_subclass(torch.Tensor), target["boxes"] * scale
    )
    assert torch.equal(out_target["labels"], target["labels"])


@pytest.mark.parametrize(
    "h, w", [(341, 576), (553, 311), (318, 613), (427, 640), (500, 1333), (800, 800)]
)
def test_eval_and_train_resize_give_the_official_size_and_scaled_boxes(h, w):
    sample = _boxes_sample(h, w)
    _assert_official_resize(sample, eval_transforms(800, 1333)(*sample), 800, 1333)
    # the crop branch's resize has no cap
    for size, max_size in ((704, 1333), (480, 1333), (600, None)):
        resized = multi_scale_resize([size], max_size)(*sample)
        _assert_official_resize(sample, resized, size, max_size)
        # Bilinear with antialias, as v2.Resize does by default.
        expected = v2.functional.resize(sample[0], list(resized[0].shape[-2:]), antialias=True)
        assert torch.equal(resized[0], expected)


def test_multi_scale_resize_draws_every_scale():
    torch.manual_seed(0)
    sample = _boxes_sample(318, 613)
    tf = multi_scale_resize(COCO_TRAIN_SCALES, 1333)
    # 704..800 all hit the cap
    official = {_official_size(613, 318, s, 1333): s for s in COCO_TRAIN_SCALES}
    assert len(official) == 8
    seen = set()
    for _ in range(100):
        out = tf(*sample)
        size = tuple(out[0].shape[-2:])
        assert size in official
        _assert_official_resize(sample, out, official[size], 1333)
        seen.add(size)
    assert seen == set(official)
    with pytest.raises(ValueError, match="non-empty list of positive ints"):
        DetrResize([])
    with pytest.raises(ValueError, match="max_size must be a positive int"):
        DetrResize([800], 0)
    # An aspect ratio beyond what the official code can handle still gives a non-empty image.
    assert multi_scale_resize([800], 1333)(tv_tensors.Image(torch.zeros(3, 1, 3000))).shape[
        -2:
    ] == (1, 1333)


def test_collate_pads_bottom_right_and_masks(synth):
    ds = CocoDetection(synth / "train", ann_path(synth))
    items = [ds[i] for i in range(3)]
    images, mask, targets = collate(items)
    h, w = max(i[0].shape[1] for i in items), max(i[0].shape[2] for i in items)
    assert images.shape == (3, 3, h, w) and mask.shape == (3, h, w) and mask.dtype == torch.bool
    assert type(images) is torch.Tensor
    for k, (image, target) in enumerate(items):
        ih, iw = image.shape[-2:]
        assert torch.equal(images[k, :, :ih, :iw], image)
        assert not mask[k, :ih, :iw].any() and mask[k, ih:].all() and mask[k, :, iw:].all()
        assert images[k, :, ih:].abs().sum() == 0 and images[k, :, :, iw:].abs().sum() == 0
        assert targets[k] is target


# -- bad input -----------------------------------------------------------------------------------
def test_missing_annotation_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"annotation file '.*nope\.json' does not exist; check data\."
    ):
        CocoDetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "needs top-level lists 'images', 'annotations' and 'categories'"),
        (json.dumps({"images": [], "annotations": []}), "needs top-level lists"),
        (
            json.dumps(
                {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}
            ),
            r"images\[0\] lacks \['width', 'height'\]",
        ),
        (
            json.dumps({"images": [], "annotations": [{"id": 1}], "categories": []}),
            r"annotations\[0\] lacks \['image_id', 'category_id', 'bbox'\]",
        ),
    ],
)
def test_malformed_annotation_file(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        CocoDetection(tmp_path, bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
            r"annotations\[0\]\.bbox is \[1, 2, 3\]; it must be four",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=999),
            "refers to image_id 999, which is not in 'images'",
        ),
        (
            lambda d: d["annotations"][0].update(category_id=77),
            "category_id 77, which is not in 'categories'",
        ),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "repeats an id in 'images'"),
        (lambda d: d["images"][0].update(width=0), r"images\[0\] has width 0"),
        (
            lambda d: d["categories"][0].update(id=-1),
            "category id -1; category ids must be non-negative",
        ),
    ],
)
def test_inconsistent_annotation_file(editable, change, message):
    edit_ann(editable, change)
    with pytest.raises(ValueError, match=message):
        CocoDetection(editable / "train", ann_path(editable))


def test_missing_image_files(editable):
    for name in ("000002.png", "000003.png", "000004.png", "000006.png"):
        (editable / "train" / name).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"4 image file\(s\) .* missing .*'000002\.png', '000003\.png', '000004\.png' and 1 "
        r"more",
    ):
        CocoDetection(editable / "train", ann_path(editable))


def test_bad_boxes_clipped_or_dropped_with_one_warning_and_crowd_dropped(editable):
    def add_bad_boxes(data):
        img = data["images"][0]
        data["annotations"] += [
            # zero width
            {"id": 901, "image_id": img["id"], "category_id": 1, "bbox": [5, 5, 0, 10]},
            # spills out
            {"id": 902, "image_id": img["id"], "category_id": 2, "bbox": [-10, -10, 30, 30]},
            # outside
            {
                "id": 903,
                "image_id": img["id"],
                "category_id": 3,
                "bbox": [img["width"] + 5, 3, 10, 10],
            },
            # negative width
            {"id": 904, "image_id": img["id"], "category_id": 4, "bbox": [8, 8, -4, 10]},
            {
                "id": 905,
                "image_id": img["id"],
                "category_id": 3,
                "bbox": [3, 3, 20, 20],
                "iscrowd": 1,
            },
        ]

    data = edit_ann(editable, add_bad_boxes)
    originals = [
        a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"] and a["id"] < 900
    ]
    with pytest.warns(
        UserWarning, match=r"1 box\(es\) extend outside .* clipped .* 3 box\(es\) are empty"
    ) as record:
        ds = CocoDetection(editable / "train", ann_path(editable))
        target = ds[0][1]
        ds[0]
    assert len(record) == 1
    h, w = target["size"].tolist()
    assert target["labels"].tolist() == [a["category_id"] for a in originals] + [2]
    torch.testing.assert_close(target["boxes"][-1], torch.tensor([10 / w, 10 / h, 20 / w, 20 / h]))
    # Evaluation still sees the file as written.
    assert len(ds.coco.imgToAnns[data["images"][0]["id"]]) == len(originals) + 5


def test_images_without_annotations_go_through_training(editable):
    first = edit_ann(
        editable,
        lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 1]),
    )
    assert first["images"][0]["id"] == 1
    dm = small_datamodule(editable, batch_size=6)
    dm.setup("fit")
    for _ in range(3):  # random crops and flips of an empty image, batched with others
        images, mask, targets = next(iter(dm.train_dataloader()))
        empty = next(t for t in targets if t["image_id"] == 1)
        assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    image, target = dm.train_dataset[0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32


def test_category_id_beyond_the_model_classes(synth):
    dm = small_datamodule(synth, num_classes=4)
    with pytest.raises(
        ValueError, match=r"category id 4, but the model has num_classes=4 .* at least 5"
    ):
        dm.setup("fit")
    small_datamodule(synth, num_classes=91).setup("fit")


# -- datamodule ----------------------------------------------------------------------------------
def test_datamodule_end_to_end(synth):
    dm = small_datamodule(synth)
    assert dm.num_classes == 5 and dm.infer_num_classes() == 5
    assert dm.category_names[3] == "triangle"
    dm.num_classes = 8
    assert dm.num_classes == 8
    dm.setup("fit")
    images, mask, targets = next(iter(dm.train_dataloader()))
    assert (
        images.shape[:2] == (2, 3) and mask.shape == (2, *images.shape[-2:]) and len(targets) == 2
    )
    assert max(images.shape[-2:]) <= 100
    assert len(dm.train_dataloader()) == 3
    seen = [t["image_id"] for _, _, ts in dm.val_dataloader() for t in ts]
    assert sorted(seen) == sorted(dm.val_dataset.coco.getImgIds())
    assert isinstance(dm.val_dataset.coco, COCO)


def test_datamodule_writes_synthetic_data(tmp_path):
    dm = small_datamodule(tmp_path / "new", synthetic=True, synthetic_train=4, synthetic_val=2)
    dm.prepare_data()
    dm.setup("validate")
    assert dm.train_dataset is None and len(dm.val_dataset) == 2 and dm.num_classes == 5
    with pytest.raises(ValueError, match="synthetic=true needs data.root"):
        CocoDataModule(synthetic=True)


def test_datamodule_explicit_paths_and_small_train_set(synth):
    dm = CocoDataModule(
        train_images=str(synth / "train"),
        train_ann=str(ann_path(synth)),
        val_images=str(synth / "val"),
        val_ann=str(ann_path(synth, "val")),
        batch_size=8,
        num_workers=0,
    )
    with pytest.raises(ValueError, match="has 6 image.*fewer than data.batch_size=8"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="needs data.root, or data.val_images and data.val_ann"):
        CocoDataModule(train_images="x", train_ann="y")
    assert dm.num_classes == 5
