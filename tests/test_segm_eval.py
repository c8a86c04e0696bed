"""COCO segm AP in CocoMetric: the numbers of pycocotools' own COCOeval(iouType='segm') on hand-made
masks and predictions, bbox numbers unchanged, masks given as tensors or RLE, both backends, the
refusals, and the DDP gather of RLE bytes."""

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.utilities import dim_zero_cat

from msdetr.evaluation import MASK_STAT_NAMES, STAT_NAMES, CocoMetric

SIZES = {1: (60, 80), 2: (50, 70), 3: (64, 64)}  # image id: (height, width)


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (np.hypot(yy - cy, xx - cx) < r).astype(np.uint8)


def _rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _gt_masks():
    """{ann id: (image id, category, mask)}: two classes, small and medium objects, one crowd
    region."""
    h1, w1 = SIZES[1]
    h2, w2 = SIZES[2]
    h3, w3 = SIZES[3]
    return {
        1: (1, 1, _disk(h1, w1, 20, 20, 12)),
        2: (1, 2, _rect(h1, w1, 45, 10, 75, 50)),
        3: (1, 1, _disk(h1, w1, 48, 20, 5)),
        4: (2, 2, _disk(h2, w2, 25, 35, 18)),
        5: (2, 1, _rect(h2, w2, 2, 40, 12, 48)),
        6: (3, 1, _rect(h3, w3, 5, 5, 40, 30)),
        7: (3, 2, _rect(h3, w3, 40, 40, 64, 64)),  # crowd: ignored, not a miss
    }


def _gt_dataset():
    images = [
        {"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in SIZES.items()
    ]
    anns = []
    for ann_id, (image_id, category, mask) in _gt_masks().items():
        x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()
        segm = _rle(mask)
        if ann_id == 2:  # one polygon, as COCO files mostly have
            segm = [[45.0, 10.0, 75.0, 10.0, 75.0, 50.0, 45.0, 50.0]]
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x, y, w, h],
                "area": float(mask.sum()),
                "iscrowd": int(ann_id == 7),
                "segmentation": segm,
            }
        )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _coco(data):
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture()
def coco_gt():
    return _coco(_gt_dataset())


def _box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _predictions():
    """{image id: [(score, category, mask)]}: right, shifted, wrong-class, false positive and
    missed objects."""
    gt = _gt_masks()
    h1, w1 = SIZES[1]
    h2, w2 = SIZES[2]
    h3, w3 = SIZES[3]
    return {
        1: [
            (0.9, 1, gt[1][2]),
            (0.8, 2, np.roll(gt[2][2], 4, axis=1)),
            (0.3, 2, _disk(h1, w1, 48, 20, 5)),
            (0.6, 1, _rect(h1, w1, 0, 0, 10, 8)),
        ],  # ann 3 found with the wrong class, a false positive
        2: [(0.95, 2, np.roll(gt[4][2], (3, 2), axis=(0, 1))), (0.4, 1, _disk(h2, w2, 44, 7, 4))],
        3: [
            (0.7, 1, np.roll(gt[6][2], 10, axis=1)),
            (0.5, 2, _rect(h3, w3, 44, 44, 60, 60)),
        ],  # one on the crowd
    }


def _detections(with_masks=True, as_rle=False, as_float=False):
    out = {}
    for image_id, dets in _predictions().items():
        masks = np.stack([m for _, _, m in dets])
        det = {
            "scores": torch.tensor([s for s, _, _ in dets]),
            "labels": torch.tensor([c for _, c, _ in dets]),
            "boxes": torch.tensor([_box(m) for _, _, m in dets]),
        }
        if with_masks:
            if as_rle:
                det["masks"] = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
            elif as_float:
                det["masks"] = torch.from_numpy(masks).float() * 0.4 + 0.3  # 0.3 out, 0.7 in
            else:
                det["masks"] = torch.from_numpy(masks).bool()
        out[image_id] = det
    return out


def _reference(coco_gt, iou_type):
    """pycocotools' own COCOeval on the same predictions."""
    results = []
    for image_id, dets in _predictions().items():
        for score, category, mask in dets:
            entry = {"image_id": image_id, "category_id": category, "score": score}
            if iou_type == "segm":
                entry["segmentation"] = mask_utils.encode(np.asfortranarray(mask))
            else:
                x0, y0, x1, y1 = _box(mask)
                entry["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            results.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) if v >= 0 else math.nan for v in evaluator.stats]


def same(a, b, tol=0.0):
    return len(a) == len(b) and all(
        abs(x - y) <= tol or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)
    )


def test_segm_ap_equals_pycocotools(coco_gt, capsys):
    metric = CocoMetric(coco_gt)
    for image_id, det in _detections().items():  # one image per update
        metric.update({image_id: det})
    stats = metric.compute()
    expected = _reference(_coco(_gt_dataset()), "segm")
    assert same([stats[k] for k in MASK_STAT_NAMES], expected)
    assert (
        0.2 < stats["mask_AP"] < 0.9 and stats["mask_AP50"] > stats["mask_AP75"]
    )  # neither trivial nor perfect
    assert same([stats[k] for k in STAT_NAMES], _reference(_coco(_gt_dataset()), "bbox"))
    assert "COCO segm:" in capsys.readouterr().out


def test_perfect_masks_score_one(coco_gt):
    metric = CocoMetric(coco_gt, verbose=False)
    for image_id in SIZES:
        anns = [a for a in coco_gt.imgToAnns[image_id] if not a["iscrowd"]]
        masks = torch.stack([torch.from_numpy(coco_gt.annToMask(a)) for a in anns]).bool()
        metric.update(
            {
                image_id: {
                    "scores": torch.ones(len(anns)),
                    "labels": torch.tensor([a["category_id"] for a in anns]),
                    "boxes": torch.tensor([_box(m.numpy()) for m in masks]),
                    "masks": masks,
                }
            }
        )
    stats = metric.compute()
    assert stats["mask_AP"] == pytest.approx(1.0) and stats["mask_AP50"] == pytest.approx(1.0)


def test_bbox_unchanged_and_no_mask_keys_without_masks(coco_gt):
    boxes_only = CocoMetric(coco_gt, verbose=False)
    boxes_only.update(_detections(with_masks=False))
    plain = boxes_only.compute()
    assert list(plain) == list(STAT_NAMES)
    with_masks = CocoMetric(coco_gt, verbose=False)
    with_masks.update(_detections())
    both = with_masks.compute()
    assert list(both) == list(STAT_NAMES) + list(MASK_STAT_NAMES)
    assert same([both[k] for k in STAT_NAMES], [plain[k] for k in STAT_NAMES])


@pytest.mark.parametrize("form", ["rle", "float"])
def test_rle_and_probability_masks_give_the_same_numbers(coco_gt, form):
    reference = CocoMetric(coco_gt, verbose=False)
    reference.update(_detections())
    other = CocoMetric(coco_gt, verbose=False)
    other.update(_detections(as_rle=form == "rle", as_float=form == "float"))
    assert same(list(other.compute().values()), list(reference.compute().values()))


def test_masks_larger_than_the_ground_truth_are_cropped(coco_gt):
    reference = CocoMetric(coco_gt, verbose=False)
    reference.update(_detections())
    padded = _detections()
    for det in padded.values():  # an image file 3 rows and 5 columns larger than its JSON size
        det["masks"] = torch.nn.functional.pad(det["masks"], (0, 5, 0, 3))
    other = CocoMetric(coco_gt, verbose=False)
    other.update(padded)
    assert same(list(other.compute().values()), list(reference.compute().values()))


def test_faster_coco_eval_scores_masks_too(coco_gt):
    ours = CocoMetric(coco_gt, backend="pycocotools", verbose=False)
    fast = CocoMetric(coco_gt, backend="faster_coco_eval", verbose=False)
    for metric in (ours, fast):
        metric.update(_detections())
    a, b = ours.compute(), fast.compute()
    assert list(a) == list(b) and same(list(a.values()), list(b.values()), tol=1e-6)


def test_no_detections_score_zero(coco_gt):
    metric = CocoMetric(coco_gt, verbose=False)
    metric.update(
        {
            i: {
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
                "boxes": torch.zeros(0, 4),
                "masks": torch.zeros(0, h, w, dtype=torch.bool),
            }
            for i, (h, w) in SIZES.items()
        }
    )
    stats = metric.compute()
    assert stats["mask_AP"] == 0.0 and stats["AP"] == 0.0


def test_refusals(coco_gt):
    data = _gt_dataset()
    for ann in data["annotations"]:
        ann.pop("segmentation")
    no_segm = CocoMetric(_coco(data), source="boxes.json", verbose=False)
    with pytest.raises(
        ValueError,
        match=r"ground truth \(boxes.json\) has annotations without a segmentation; "
        "set data.masks=true",
    ):
        no_segm.update(_detections())
    metric = CocoMetric(coco_gt, verbose=False)
    metric.update({1: _detections()[1]})
    with pytest.raises(
        ValueError, match="carry 'masks' and some do not; give masks for every image"
    ):
        metric.update({2: _detections(with_masks=False)[2]})
    metric.reset()
    metric.update({2: _detections(with_masks=False)[2]})  # reset forgets the earlier mode
    bad = _detections()[1]
    bad["masks"] = bad["masks"][:2]
    with pytest.raises(
        ValueError,
        match=r"image 1: 'masks' has shape \(2, 60, 80\); it must be \(4, height, width\)",
    ):
        CocoMetric(coco_gt, verbose=False).update({1: bad})
    rle = _detections(as_rle=True)[1]
    rle["masks"][0] = mask_utils.encode(np.zeros((5, 5, 1), dtype=np.uint8, order="F"))[0]
    with pytest.raises(ValueError, match=r"must be 4 dicts of size \[60, 80\]"):
        CocoMetric(coco_gt, verbose=False).update({1: rle})


# -- distributed --------------------------------------------------------------------------------
# Rank 0 sees images 1 and 3, rank 1 sees 2 and 1 again (a padding sampler) with other masks,
# which must not count. torchmetrics' own sync runs on rank 0's metric with a gather function that
# returns both ranks' states, as gather_all_tensors does (tests/test_evaluation.py runs a real
# two-process gloo group for the box states; here the same reduction code meets the RLE states
# without the cost of spawning processes).
def _rank_updates(rank):
    dets = _detections()
    if rank == 0:
        return [{1: dets[1]}, {3: dets[3]}]
    repeat = _detections()[1]
    repeat["masks"] = torch.ones_like(repeat["masks"])
    return [{2: dets[2], 1: repeat}]


def _two_rank_gather(other: CocoMetric):
    """A dist_sync_fn for rank 0: each call (one per state, in registration order) returns
    [rank 0's tensor, rank 1's], rank 1's lists concatenated as torchmetrics does before
    gathering."""
    theirs = iter([dim_zero_cat(getattr(other, attr)) for attr in other._reductions])

    def gather(tensor, group=None):
        return [tensor, next(theirs)]

    return gather


def test_ddp_gather_of_rle_bytes_gives_the_single_process_numbers(coco_gt):
    rank1 = CocoMetric(coco_gt, verbose=False)
    for predictions in _rank_updates(1):
        rank1.update(predictions)
    rank0 = CocoMetric(
        coco_gt,
        verbose=False,
        dist_sync_fn=_two_rank_gather(rank1),
        distributed_available_fn=lambda: True,
    )
    for predictions in _rank_updates(0):
        rank0.update(predictions)
    gathered = rank0.compute()
    assert (
        rank0.mask_bytes[0].dtype == torch.uint8 and len(rank0.mask_bytes) == 2
    )  # unsynced again after compute
    single = CocoMetric(coco_gt, verbose=False)
    for rank in (0, 1):
        for predictions in _rank_updates(rank):
            single.update(predictions)
    expected = single.compute()
    assert same([expected[k] for k in MASK_STAT_NAMES], _reference(_coco(_gt_dataset()), "segm"))
    assert list(gathered) == list(expected) and same(
        list(gathered.values()), list(expected.values())
    )
