"""COCO evaluation: perfect detections score 1, none score 0, undefined metrics are NaN, repeated
images (DDP padding) count once, and torchmetrics' sync under DDP gives the single-process
numbers."""

import json
import math
import sys
import types
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader

from helpers.runs import validate_in_process
from msdetr.evaluation import STAT_NAMES, CocoMetric
from msdetr.lit.module import DetectionModule

GT = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "b.png", "width": 120, "height": 90},
        {"id": 3, "file_name": "c.png", "width": 60, "height": 60},
    ],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 30, 20],
            "area": 600,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "bbox": [50, 30, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 1,
            "bbox": [5, 5, 60, 60],
            "area": 3600,
            "iscrowd": 0,
        },
        {
            "id": 4,
            "image_id": 3,
            "category_id": 3,
            "bbox": [0, 0, 30, 50],
            "area": 1500,
            "iscrowd": 0,
        },
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "c"}],
}
LARGE = {"APl", "ARl"}  # GT has no object over 96^2 pixels: COCO writes -1, reported as NaN


def _write(tmp_path, data, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def gt_file(tmp_path):
    return _write(tmp_path, GT)


@pytest.fixture()
def coco_gt(gt_file):
    return COCO(str(gt_file))


def perfect(coco_gt, image_id):
    """Every ground-truth box of the image with score 1, xyxy in original pixels."""
    anns = coco_gt.imgToAnns[image_id]
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32
    )
    return {
        "scores": torch.ones(len(anns)),
        "labels": torch.tensor([a["category_id"] for a in anns]),
        "boxes": boxes,
    }


def half_right(coco_gt):
    """Image 1 with its second box shifted and scored low."""
    det = perfect(coco_gt, 1)
    det["scores"] = torch.tensor([0.9, 0.3])
    det["boxes"][1] += 6
    return det


def no_detections():
    return {
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
        "boxes": torch.zeros(0, 4),
    }


def same(a, b):
    """Equal dicts of metrics, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in ((a[k], b[k]) for k in a)
    )


def test_perfect_detections_score_one(coco_gt, capsys):
    metric = CocoMetric(coco_gt)
    metric.update({i: perfect(coco_gt, i) for i in (1, 2, 3)})
    stats = metric.compute()
    assert set(stats) == set(STAT_NAMES) and all(isinstance(v, float) for v in stats.values())
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert stats[name] == pytest.approx(1.0)
    assert all(math.isnan(stats[name]) for name in LARGE)
    assert (
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
        in capsys.readouterr().out
    )


def test_no_detections_score_zero(coco_gt):
    metric = CocoMetric(coco_gt)
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        nothing = metric.compute()  # no image seen: nothing is defined
    assert all(math.isnan(v) for v in nothing.values())
    metric.update({1: no_detections(), 2: no_detections()})
    stats = metric.compute()
    assert {k: v for k, v in stats.items() if k not in LARGE} == dict.fromkeys(
        set(STAT_NAMES) - LARGE, 0.0
    )
    assert all(math.isnan(stats[name]) for name in LARGE)


def test_only_updated_images_are_scored(coco_gt):
    metric = CocoMetric(coco_gt)
    metric.update({1: perfect(coco_gt, 1)})
    assert metric.compute()["AP"] == pytest.approx(1.0)
    metric.update({2: no_detections()})  # a seen image with a missed box lowers recall
    # class 1: 1 of 2 found; class 3: 1 of 1
    assert metric.compute()["AR100"] == pytest.approx(0.75)


def test_wrong_label_and_box_score_low(coco_gt):
    metric = CocoMetric(coco_gt, verbose=False)
    shifted = perfect(coco_gt, 2)
    shifted["boxes"] = shifted["boxes"] + 40  # IoU with the ground truth is small
    wrong_label = perfect(coco_gt, 3)
    wrong_label["labels"] = torch.tensor([1])
    metric.update({2: shifted, 3: wrong_label})
    assert metric.compute()["AP50"] == 0.0


def test_numbers_are_the_official_ones(coco_gt):
    # What pycocotools gives (and the earlier hand-written gather gave) on these detections.
    metric = CocoMetric(coco_gt, verbose=False)
    metric.update({1: half_right(coco_gt), 2: perfect(coco_gt, 2)})
    stats = metric.compute()
    assert same(
        stats,
        {
            "AP": 0.6,
            "AP50": 1.0,
            "AP75": 0.5,
            "APs": 0.9999999999999998,
            "APm": 0.5999999999999999,
            "APl": math.nan,
            "AR1": 0.6,
            "AR10": 0.6,
            "AR100": 0.6,
            "ARs": 1.0,
            "ARm": 0.6,
            "ARl": math.nan,
        },
    )


def test_repeated_images_count_once_with_their_first_detections(coco_gt):
    once = CocoMetric(coco_gt)
    once.update({1: half_right(coco_gt), 2: no_detections()})
    twice = CocoMetric(coco_gt)
    twice.update({1: half_right(coco_gt), 2: no_detections()})
    # As a padding distributed sampler delivers them; a repeat's detections are not used.
    twice.update({1: perfect(coco_gt, 1), 2: perfect(coco_gt, 2)})
    assert same(once.compute(), twice.compute())
    twice.reset()
    assert twice.image_ids == [] and twice.detections == []


def test_unknown_image_id_and_backend(coco_gt):
    with pytest.raises(ValueError, match="image id 42 is not in the ground-truth annotations"):
        CocoMetric(coco_gt).update({42: no_detections()})
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'nope'"):
        CocoMetric(coco_gt, backend="nope")
    with pytest.raises(RuntimeError, match="no ground truth"):
        CocoMetric().update({1: no_detections()})


def test_missing_fast_backend_says_how_to_install(coco_gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import fail
    # no ground truth, nothing to score: a predicting module builds one
    CocoMetric(backend="faster_coco_eval")
    with pytest.raises(ImportError, match=r"pip install msdetr\[fast-eval\]"):
        CocoMetric(coco_gt, backend="faster_coco_eval")


def test_fast_backend_agrees_with_pycocotools(coco_gt):
    pytest.importorskip("faster_coco_eval")
    cases = {
        "partial": {1: half_right(coco_gt), 2: perfect(coco_gt, 2)},
        "none": {1: no_detections(), 3: no_detections()},
    }
    for case, predictions in cases.items():
        results = {}
        for backend in ("pycocotools", "faster_coco_eval"):
            metric = CocoMetric(coco_gt, backend=backend, verbose=False)
            metric.update(predictions)
            results[backend] = metric.compute()
        for name in STAT_NAMES:
            fast, reference = results["faster_coco_eval"][name], results["pycocotools"][name]
            assert math.isnan(fast) == math.isnan(reference), (case, name)
            assert math.isnan(fast) or fast == pytest.approx(reference, abs=1e-6), (case, name)


def test_small_objects_only_leave_large_metrics_undefined(tmp_path):
    small = {
        **GT,
        "annotations": [
            {**a, "bbox": [a["bbox"][0], a["bbox"][1], 20, 20], "area": 400}
            for a in GT["annotations"]
        ],
    }
    coco = COCO(str(_write(tmp_path, small)))
    metric = CocoMetric(coco, verbose=False)
    metric.update({i: perfect(coco, i) for i in (1, 2, 3)})
    stats = metric.compute()
    assert stats["AP"] == pytest.approx(1.0) and stats["APs"] == pytest.approx(1.0)
    assert all(math.isnan(stats[name]) for name in ("APm", "APl", "ARm", "ARl"))


def test_no_annotations_warn_once_and_leave_everything_undefined(tmp_path):
    path = _write(tmp_path, {**GT, "annotations": []}, name="empty.json")
    coco = COCO(str(path))
    with pytest.warns(UserWarning, match="empty.json' has no annotations") as record:
        metric = CocoMetric(coco, source=str(path), verbose=False)
        metric.set_ground_truth(coco, str(path))  # the same ground truth again: no second warning
    assert len([w for w in record if "has no annotations" in str(w.message)]) == 1
    metric.update({1: perfect(COCO(str(_write(tmp_path, GT))), 1), 2: no_detections()})
    assert all(math.isnan(v) for v in metric.compute().values())


# -- the module's validation hooks ---------------------------------------------------------------
class _EchoIds(nn.Module):
    """A 'detector' whose output is the image id written into pixel (0, 0, 0)."""

    def forward(self, images, padding_mask):
        return {"ids": images[:, 0, 0, 0]}


class _PerfectFor(nn.Module):
    """Post-processing that returns every box `coco` has for the image."""

    def __init__(self, coco):
        super().__init__()
        self.coco = coco

    def forward(self, outputs, orig_sizes):
        return [perfect(self.coco, int(i)) for i in outputs["ids"]]


class _Val(L.LightningDataModule):
    def __init__(self, ann_file):
        super().__init__()
        self.val_dataset = types.SimpleNamespace(coco=COCO(str(ann_file)), ann_file=ann_file)

    def val_dataloader(self):
        ids = self.val_dataset.coco.getImgIds()
        images = torch.zeros(len(ids), 3, 4, 4)
        images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        targets = [{"image_id": torch.tensor(i), "orig_size": torch.tensor([80, 100])} for i in ids]
        batch = (images, torch.zeros(len(ids), 4, 4, dtype=torch.bool), targets)
        return DataLoader([batch], batch_size=None)  # one ready-made batch


def test_module_does_not_log_undefined_metrics(gt_file):
    dm = _Val(gt_file)
    module = DetectionModule(
        _EchoIds(), criterion=None, postprocess=_PerfectFor(dm.val_dataset.coco)
    )
    logged = validate_in_process(module, dm)
    assert module.last_metrics["AP"] == pytest.approx(1.0) and float(
        logged["val/AP"]
    ) == pytest.approx(1.0)
    assert math.isnan(module.last_metrics["APl"])
    assert "val/APl" not in logged and "val/ARl" not in logged and "val/APm" in logged
    # The metric's states never reach a checkpoint.
    module.coco_metric.update({1: perfect(dm.val_dataset.coco, 1)})
    assert not [key for key in module.state_dict() if key.startswith("coco_metric")]


def test_module_warns_once_on_a_validation_set_without_annotations(gt_file, tmp_path):
    empty = _write(tmp_path, {**GT, "annotations": []}, name="val_empty.json")
    dm = _Val(empty)
    module = DetectionModule(
        _EchoIds(), criterion=None, postprocess=_PerfectFor(COCO(str(gt_file)))
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logged = validate_in_process(module, dm, times=2)
    ours = [w for w in record if "has no annotations" in str(w.message)]
    assert len(ours) == 1 and str(empty) in str(ours[0].message)
    assert not [key for key in logged if key.startswith("val/")]
    assert math.isnan(module.last_metrics["AP"])  # what train.py / evaluate.py get back


# -- distributed --------------------------------------------------------------------------------
# A padding sampler over 3 images and 2 ranks: rank 0 sees images 1 and 3, rank 1 sees 2 and 1
# again (with other detections, which must not count).
def _rank_updates(coco_gt, rank):
    if rank == 0:
        return [{1: half_right(coco_gt)}, {3: perfect(coco_gt, 3)}]
    return [{2: no_detections(), 1: perfect(coco_gt, 1)}]


def _rank_main(rank, gt_path, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    coco_gt = COCO(str(gt_path))
    metric = CocoMetric(coco_gt, verbose=False)
    for predictions in _rank_updates(coco_gt, rank):
        metric.update(predictions)
    with metric.sync_context():  # what compute sees: every rank's images, in rank order
        gathered = metric.image_ids.tolist()
    local = [t.tolist() for t in metric.image_ids]  # unsynced again afterwards
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps({"gathered": gathered, "local": local, "stats": metric.compute()})
    )
    dist.destroy_process_group()


def test_sync_across_two_ranks_gives_the_single_process_numbers(gt_file, coco_gt, tmp_path):
    mp.spawn(_rank_main, args=(gt_file, tmp_path / "store", tmp_path), nprocs=2)
    single = CocoMetric(coco_gt, verbose=False)
    for rank in (0, 1):
        for predictions in _rank_updates(coco_gt, rank):
            single.update(predictions)
    expected = single.compute()
    assert expected["AP"] < 1.0  # image 1's first detections count, not rank 1's perfect repeat
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["gathered"] == [1, 3, 2, 1]
        assert out["local"] == ([[1], [3]] if rank == 0 else [[2, 1]])
        assert same(out["stats"], expected)
