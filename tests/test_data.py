"""COCO-format data: the synthetic writer, targets, transforms, collate and every kind of bad input."""
import json
import shutil

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from msdetr.data import CocoDataModule, CocoDetection, collate, write_synthetic_coco
from msdetr.data.transforms import eval_transforms, to_normalized_cxcywh, train_transforms


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=6, num_val=3)


def _ann(root, split="train"):
    return root / "annotations" / f"instances_{split}.json"


def _copy(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    return root


def test_synthetic_is_deterministic_and_valid(synth, tmp_path):
    again = write_synthetic_coco(tmp_path / "again", num_train=6, num_val=3)
    assert _ann(synth).read_text() == _ann(again).read_text()
    data = json.loads(_ann(synth).read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in data["annotations"])
    mtime = _ann(synth).stat().st_mtime_ns
    write_synthetic_coco(synth, num_train=6, num_val=3)  # same settings: nothing rewritten
    assert _ann(synth).stat().st_mtime_ns == mtime


def test_dataset_targets(synth):
    ds = CocoDetection(synth / "train", _ann(synth))
    assert ds.num_classes == 5 and ds.category_names[1] == "rectangle"
    image, target = ds[0]
    h, w = image.shape[-2:]
    assert target["orig_size"].tolist() == [h, w] == target["size"].tolist()
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and len(boxes) == len(target["labels"])
    assert ((boxes >= 0) & (boxes <= 1)).all()
    ann = [a for a in ds.coco.dataset["annotations"] if a["image_id"] == target["image_id"]][0]
    x, y, bw, bh = ann["bbox"]
    torch.testing.assert_close(boxes[0], torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]))


def test_flip_mirrors_boxes():
    image = tv_tensors.Image(torch.rand(3, 40, 60))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[6.0, 4.0, 18.0, 24.0]]), format="XYXY", canvas_size=(40, 60))
    _, out = v2.RandomHorizontalFlip(1.0)(image, {"boxes": boxes, "labels": torch.tensor([1])})
    before, after = to_normalized_cxcywh(boxes)[0], to_normalized_cxcywh(out["boxes"])[0]
    torch.testing.assert_close(after, torch.tensor([1 - before[0], before[1], before[2], before[3]]))


def test_train_transform_keeps_boxes_in_range_and_bounds_size(synth):
    torch.manual_seed(0)
    ds = CocoDetection(synth / "train", _ann(synth), train_transforms([64, 80], 100, [64], (40, 60)))
    for i in range(len(ds)):
        image, target = ds[i]
        assert max(image.shape[-2:]) <= 100 and min(image.shape[-2:]) <= 80
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert (target["boxes"][:, 2:] > 0).all()
        assert target["size"].tolist() == list(image.shape[-2:])


def test_eval_transform_size(synth):
    image, target = CocoDetection(synth / "val", _ann(synth, "val"), eval_transforms(100, 120))[0]
    assert min(image.shape[-2:]) == 100 or max(image.shape[-2:]) == 120


def test_collate_pads_and_masks():
    a = (torch.ones(3, 4, 5), {"labels": torch.tensor([1])})
    b = (torch.ones(3, 6, 3), {"labels": torch.zeros(0, dtype=torch.long)})
    images, mask, targets = collate([a, b])
    assert images.shape == (2, 3, 6, 5)
    assert not mask[0, :4, :5].any() and mask[0, 4:].all()
    assert not mask[1, :, :3].any() and mask[1, :, 3:].all()
    assert images[0, :, 4:].abs().sum() == 0 and len(targets) == 2


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file .* does not exist"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_malformed_annotation_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CocoDetection(tmp_path, bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="needs lists 'images', 'annotations' and 'categories'"):
        CocoDetection(tmp_path, bad)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks \['file_name'\]"):
        CocoDetection(tmp_path, bad)


def test_missing_image_file(synth, tmp_path):
    root = _copy(synth, tmp_path)
    (root / "train" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image.*000002.png"):
        CocoDetection(root / "train", _ann(root))


def test_bad_boxes_are_clipped_or_dropped_with_one_warning(synth, tmp_path):
    root = _copy(synth, tmp_path)
    data = json.loads(_ann(root).read_text())
    img = data["images"][0]
    extra = [
        {"id": 1001, "image_id": img["id"], "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
        {"id": 1002, "image_id": img["id"], "category_id": 2, "bbox": [-10, -10, 30, 30], "iscrowd": 0},  # spills out
        {"id": 1003, "image_id": img["id"], "category_id": 3, "bbox": [img["width"] + 5, 3, 10, 10], "iscrowd": 0},
        {"id": 1004, "image_id": img["id"], "category_id": 3, "bbox": [3, 3, 20, 20], "iscrowd": 1},  # crowd
    ]
    data["annotations"] += extra
    _ann(root).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="3 box") as record:
        ds = CocoDetection(root / "train", _ann(root))
    assert len(record) == 1
    kept = ds._annotations[img["id"]]
    assert [0.0, 0.0, 20.0, 20.0] in [b for _, b in kept]
    assert all(b[2] > b[0] and b[3] > b[1] for _, b in kept)


def test_images_without_annotations_train(synth, tmp_path):
    root = _copy(synth, tmp_path)
    data = json.loads(_ann(root).read_text())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    _ann(root).write_text(json.dumps(data))
    ds = CocoDetection(root / "train", _ann(root), train_transforms([64], 100, [64], (40, 60)))
    image, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images, mask, targets = collate([ds[0], ds[1]])
    assert targets[0]["boxes"].shape == (0, 4)


def test_category_id_without_a_class(synth):
    with pytest.raises(ValueError, match="category id 4, which the model \\(num_classes=3\\) has no class for"):
        CocoDetection(synth / "train", _ann(synth), num_classes=3)


def test_datamodule_end_to_end(synth):
    dm = CocoDataModule(root=str(synth), batch_size=2, num_workers=0, train_scales=[64], max_size=96,
                        crop_resize=[64], crop_size=(40, 60), eval_size=64)
    assert dm.infer_num_classes() == 5
    dm.setup("fit")
    images, mask, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 2 and mask.shape == (2, *images.shape[-2:])
    assert {"boxes", "labels", "image_id", "orig_size", "size"} <= set(targets[0])
    assert len(dm.val_dataloader().dataset) == 3
