"""COCO evaluation: perfect detections score 1, none score 0, repeated images count once."""
import json

import pytest
import torch
from pycocotools.coco import COCO

from msdetr.evaluation import CocoEvaluator


@pytest.fixture()
def coco_gt(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.png", "width": 120, "height": 90}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60], "area": 3600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return COCO(str(path))


def perfect(coco_gt, image_id):
    anns = coco_gt.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32)
    return {"scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns]), "boxes": boxes}


def test_perfect_detections(coco_gt):
    ev = CocoEvaluator(coco_gt)
    ev.update({1: perfect(coco_gt, 1), 2: perfect(coco_gt, 2)})
    stats = ev.summarize()
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_no_detections(coco_gt):
    ev = CocoEvaluator(coco_gt)
    assert ev.summarize()["AP"] == 0.0
    ev.update({1: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}})
    assert ev.summarize()["AP"] == 0.0


def test_repeated_images_count_once(coco_gt):
    once = CocoEvaluator(coco_gt)
    once.update({1: perfect(coco_gt, 1)})
    twice = CocoEvaluator(coco_gt)
    twice.update({1: perfect(coco_gt, 1)})
    twice.update({1: perfect(coco_gt, 1)})  # as a padded distributed sampler delivers it
    assert once.summarize() == twice.summarize()


def test_unknown_backend(coco_gt):
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        CocoEvaluator(coco_gt, backend="nope")
