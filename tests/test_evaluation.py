"""COCO evaluation: perfect detections score 1, none score 0, repeated images (DDP padding) count once."""
import json
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from msdetr.evaluation import STAT_NAMES, CocoEvaluator

GT = {
    "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
               {"id": 2, "file_name": "b.png", "width": 120, "height": 90},
               {"id": 3, "file_name": "c.png", "width": 60, "height": 60}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60], "area": 3600, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 3, "bbox": [0, 0, 30, 50], "area": 1500, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}],
}


@pytest.fixture()
def gt_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    return path


@pytest.fixture()
def coco_gt(gt_file):
    return COCO(str(gt_file))


def perfect(coco_gt, image_id):
    """Every ground-truth box of the image with score 1, xyxy in original pixels."""
    anns = coco_gt.imgToAnns[image_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
    return {"scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns]),
            "boxes": boxes}


def no_detections():
    return {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def test_perfect_detections_score_one(coco_gt, capsys):
    ev = CocoEvaluator(coco_gt)
    ev.update({i: perfect(coco_gt, i) for i in (1, 2, 3)})
    stats = ev.summarize()
    assert set(stats) == set(STAT_NAMES) and all(isinstance(v, float) for v in stats.values())
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert stats[name] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out


def test_no_detections_score_zero(coco_gt):
    ev = CocoEvaluator(coco_gt)
    assert ev.summarize() == dict.fromkeys(STAT_NAMES, 0.0)
    ev.update({1: no_detections(), 2: no_detections()})
    assert ev.summarize() == dict.fromkeys(STAT_NAMES, 0.0)


def test_only_updated_images_are_scored(coco_gt):
    ev = CocoEvaluator(coco_gt)
    ev.update({1: perfect(coco_gt, 1)})
    assert ev.summarize()["AP"] == pytest.approx(1.0)
    ev.update({2: no_detections()})  # a seen image with a missed box lowers recall
    assert ev.summarize()["AR100"] == pytest.approx(0.75)  # class 1: 1 of 2 found; class 3: 1 of 1


def test_wrong_label_and_box_score_low(coco_gt):
    ev = CocoEvaluator(coco_gt)
    shifted = perfect(coco_gt, 2)
    shifted["boxes"] = shifted["boxes"] + 40  # IoU with the ground truth is small
    wrong_label = perfect(coco_gt, 3)
    wrong_label["labels"] = torch.tensor([1])
    ev.update({2: shifted, 3: wrong_label})
    assert ev.summarize(verbose=False)["AP50"] == 0.0


def test_repeated_images_count_once(coco_gt):
    once = CocoEvaluator(coco_gt)
    once.update({1: perfect(coco_gt, 1), 2: no_detections()})
    twice = CocoEvaluator(coco_gt)
    twice.update({1: perfect(coco_gt, 1), 2: no_detections()})
    twice.update({1: perfect(coco_gt, 1), 2: no_detections()})  # as a padding distributed sampler delivers them
    assert len(twice.results) == 2
    assert once.summarize() == twice.summarize()
    twice.reset()
    assert twice.results == {}


def test_unknown_image_id_and_backend(coco_gt):
    with pytest.raises(ValueError, match="image id 42 is not in the ground-truth annotations"):
        CocoEvaluator(coco_gt).update({42: no_detections()})
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'nope'"):
        CocoEvaluator(coco_gt, backend="nope")


def test_missing_fast_backend_says_how_to_install(coco_gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install msdetr\[fast-eval\]"):
        CocoEvaluator(coco_gt, backend="faster_coco_eval")


def test_fast_backend_agrees_with_pycocotools(coco_gt):
    pytest.importorskip("faster_coco_eval")
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        ev = CocoEvaluator(coco_gt, backend=backend)
        half = perfect(coco_gt, 1)
        half["scores"] = torch.tensor([0.9, 0.3])
        half["boxes"][1] += 6
        ev.update({1: half, 2: perfect(coco_gt, 2)})
        results[backend] = ev.summarize(verbose=False)
    for name in STAT_NAMES:
        assert results["faster_coco_eval"][name] == pytest.approx(results["pycocotools"][name], abs=1e-6)


def _rank_main(rank, gt_path, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    coco_gt = COCO(str(gt_path))
    ev = CocoEvaluator(coco_gt)
    # A padding sampler over 3 images and 2 ranks: rank 0 sees images 1 and 3, rank 1 sees 2 and 1 again.
    ev.update({image_id: perfect(coco_gt, image_id) for image_id in ((1, 3) if rank == 0 else (2, 1))})
    ev.synchronize()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"ids": sorted(ev.results),
                                                          "stats": ev.summarize(verbose=False)}))
    dist.destroy_process_group()


def test_synchronize_gathers_across_ranks_once_per_image(gt_file, tmp_path):
    mp.spawn(_rank_main, args=(gt_file, tmp_path / "store", tmp_path), nprocs=2)
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["ids"] == [1, 2, 3]
        assert out["stats"]["AP"] == pytest.approx(1.0)
