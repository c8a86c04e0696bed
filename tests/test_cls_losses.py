"""The per-branch classification losses (`Branch.loss_cls`): focal (unchanged), varifocal and
ia_bce, checked against the papers' formulas written out here entry by entry on a tiny hand-made
case."""

import math

import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops import sigmoid_focal_loss

from helpers.assigners import FixedAssigner
from helpers.config import compose
from msdetr.losses import Branch, SetCriterion
from msdetr.losses.criterion import aligned_iou, set_class_targets_

# One image, 4 queries, 3 classes. Query 0 sits exactly on GT 0 (IoU 1); query 1 is GT 1 shifted by
# half its width (intersection 0.1 x 0.2 = 0.02, union 0.04 + 0.04 - 0.02 = 0.06: IoU 1/3); query 2
# misses GT 2 entirely (IoU 0); query 3 is unassigned.
LOGITS = torch.tensor(
    [[0.5, -1.0, 2.0], [1.5, 0.2, -0.5], [-2.0, 0.8, 0.1], [0.3, -0.7, -3.0]], dtype=torch.float64
)
PRED_BOXES = torch.tensor(
    [[0.5, 0.5, 0.2, 0.2], [0.35, 0.3, 0.2, 0.2], [0.1, 0.8, 0.1, 0.1], [0.6, 0.2, 0.1, 0.3]],
    dtype=torch.float64,
)
TARGETS = [
    {
        "labels": torch.tensor([2, 0, 1]),
        "boxes": torch.tensor(
            [[0.5, 0.5, 0.2, 0.2], [0.25, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]], dtype=torch.float64
        ),
    }
]
INDICES = [(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))]
# (query, class) of each assigned query and the IoU of its box with its GT.
POSITIVES = {(0, 2): 1.0, (1, 0): 1 / 3, (2, 1): 0.0}
NUM_BOXES = 3.0


def _outputs(requires_grad=False):
    return {
        "pred_logits": LOGITS[None].clone().requires_grad_(requires_grad),
        "pred_boxes": PRED_BOXES[None].clone().requires_grad_(requires_grad),
    }


def _criterion(num_classes=3, **branch):
    return SetCriterion(num_classes, [Branch("main", FixedAssigner(INDICES), aux=False, **branch)])


def _per_entry(rule):
    """Sum of rule(p, positive IoU or None) over the 4 x 3 entries, divided by the GT count."""
    total = 0.0
    for q in range(4):
        for c in range(3):
            p = 1 / (1 + math.exp(-LOGITS[q, c].item()))
            total += rule(p, POSITIVES.get((q, c)))
    return total / NUM_BOXES


def test_aligned_iou_and_the_iou_written_at_the_assigned_class():
    iou = aligned_iou(
        torch.tensor(
            [
                [0.4, 0.4, 0.6, 0.6],
                [0.25, 0.2, 0.45, 0.4],
                [0.0, 0.0, 0.1, 0.1],
                [0.2, 0.2, 0.2, 0.2],
            ]
        ),
        torch.tensor(
            [
                [0.4, 0.4, 0.6, 0.6],
                [0.15, 0.2, 0.35, 0.4],
                [0.5, 0.5, 0.6, 0.6],
                [0.2, 0.2, 0.2, 0.2],
            ]
        ),
    )
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, 0.0, 0.0]))
    # A query in two pairs (a one-to-many assignment) takes its last pair's class and IoU.
    indices = [(torch.tensor([1, 1]), torch.tensor([0, 1]))]
    quality = set_class_targets_(
        torch.zeros(1, 4, 3), indices, TARGETS, values=torch.tensor([0.9, 0.25])
    )
    expected = torch.zeros(1, 4, 3)
    expected[0, 1, 0] = 0.25
    assert torch.equal(quality, expected)


def test_focal_is_unchanged():
    def rule(p, iou):
        return (
            -0.25 * (1 - p) ** 2 * math.log(p)
            if iou is not None
            else -0.75 * p**2 * math.log(1 - p)
        )

    default = _criterion()
    explicit = _criterion(loss_cls="focal")
    onehot = torch.zeros(1, 4, 3, dtype=torch.float64)
    for q, c in POSITIVES:
        onehot[0, q, c] = 1
    expected = sigmoid_focal_loss(LOGITS[None], onehot, 0.25, 2.0, reduction="sum") / NUM_BOXES
    for crit in (default, explicit):
        losses = crit(_outputs(), TARGETS)
        assert losses["loss_ce"].item() == expected.item()  # bit for bit: the same call as before
        assert losses["loss_ce"].item() == pytest.approx(_per_entry(rule), rel=1e-12)
        assert losses["class_error"].item() == 0.0  # each query's top logit is its GT's class
    # The branch fields override the criterion's focal defaults.
    custom = _criterion(loss_cls="focal", cls_alpha=0.5, cls_gamma=1.0)
    expected = sigmoid_focal_loss(LOGITS[None], onehot, 0.5, 1.0, reduction="sum") / NUM_BOXES
    torch.testing.assert_close(custom(_outputs(), TARGETS)["loss_ce"], expected)


def test_varifocal_by_hand():
    def rule(p, iou, alpha=0.75, gamma=2.0):
        if iou:  # q > 0: -q (q log p + (1 - q) log(1 - p))
            return -iou * (iou * math.log(p) + (1 - iou) * math.log(1 - p))
        return -alpha * p**gamma * math.log(1 - p)  # q = 0, IoU-0 positives included

    losses = _criterion(loss_cls="varifocal")(_outputs(), TARGETS)
    assert losses["loss_ce"].item() == pytest.approx(_per_entry(rule), rel=1e-12)
    losses = _criterion(loss_cls="varifocal", cls_alpha=0.5, cls_gamma=1.5)(_outputs(), TARGETS)
    assert losses["loss_ce"].item() == pytest.approx(
        _per_entry(lambda p, iou: rule(p, iou, 0.5, 1.5)), rel=1e-12
    )
    # the box terms do not depend on the classification loss
    focal = _criterion()(_outputs(), TARGETS)
    for key in ("loss_bbox", "loss_giou", "cardinality_error", "class_error"):
        assert losses[key].item() == focal[key].item()


def test_ia_bce_by_hand():
    def rule(p, iou, alpha=0.25, gamma=2.0):
        if iou is not None:  # positive: BCE(p, t), t = p^alpha * IoU^(1 - alpha)
            t = p**alpha * iou ** (1 - alpha)
            return -(t * math.log(p) + (1 - t) * math.log(1 - p))
        return -(p**gamma) * math.log(1 - p)

    losses = _criterion(loss_cls="ia_bce")(_outputs(), TARGETS)
    assert losses["loss_ce"].item() == pytest.approx(_per_entry(rule), rel=1e-12)
    losses = _criterion(loss_cls="ia_bce", cls_alpha=0.5, cls_gamma=1.0)(_outputs(), TARGETS)
    assert losses["loss_ce"].item() == pytest.approx(
        _per_entry(lambda p, iou: rule(p, iou, 0.5, 1.0)), rel=1e-12
    )


@pytest.mark.parametrize("loss_cls", ["varifocal", "ia_bce"])
def test_gradient_reaches_the_logits_not_the_boxes_through_the_target(loss_cls):
    outputs = _outputs(requires_grad=True)
    loss_ce = _criterion(loss_cls=loss_cls)(outputs, TARGETS)["loss_ce"]
    grad_logits, grad_boxes = torch.autograd.grad(
        loss_ce, [outputs["pred_logits"], outputs["pred_boxes"]], allow_unused=True
    )
    assert grad_boxes is None  # the IoU target is detached
    assert grad_logits.abs().min() > 0  # every entry, negatives included, is supervised
    # At a positive entry the target is a constant: d BCE(sigmoid(x), target) / dx = p - target,
    # times the constant weight (varifocal: q; ia_bce: 1, its target p^alpha u^(1-alpha) detached
    # too).
    p = torch.sigmoid(LOGITS)
    for (q, c), iou in POSITIVES.items():
        if loss_cls == "varifocal" and iou > 0:
            expected = iou * (p[q, c] - iou)
        elif loss_cls == "ia_bce":
            expected = p[q, c] - p[q, c] ** 0.25 * iou**0.75
        else:
            continue
        torch.testing.assert_close(grad_logits[0, q, c], expected / NUM_BOXES)


@pytest.mark.parametrize("loss_cls", ["varifocal", "ia_bce"])
def test_binary_branch(loss_cls):
    """The class-agnostic (two-stage encoder) branch: one logit, every target label 0."""
    logits = LOGITS[:, :1]
    outputs = {
        "enc_outputs": {"pred_logits": logits[None], "pred_boxes": PRED_BOXES[None]},
        "pred_logits": LOGITS[None],
        "pred_boxes": PRED_BOXES[None],
    }
    crit = SetCriterion(
        3,
        [
            Branch(
                "enc_outputs",
                FixedAssigner(INDICES),
                suffix="_enc",
                aux=False,
                binary=True,
                loss_cls=loss_cls,
            )
        ],
    )
    losses = crit(outputs, TARGETS)
    assert "class_error_enc" not in losses
    ious = [1.0, 1 / 3, 0.0, None]
    total = 0.0
    for q, iou in enumerate(ious):
        p = torch.sigmoid(logits[q, 0]).item()
        if loss_cls == "varifocal":
            total += (
                -iou * (iou * math.log(p) + (1 - iou) * math.log(1 - p))
                if iou
                else -0.75 * p**2 * math.log(1 - p)
            )
        else:
            t = p**0.25 * iou**0.75 if iou is not None else None
            total += (
                -(t * math.log(p) + (1 - t) * math.log(1 - p))
                if t is not None
                else -(p**2) * math.log(1 - p)
            )
    assert losses["loss_ce_enc"].item() == pytest.approx(total / NUM_BOXES, rel=1e-12)


def test_invalid_choices_are_one_sentence():
    with pytest.raises(ValueError) as err:
        Branch("main", FixedAssigner(INDICES), loss_cls="softmax")
    message = str(err.value)
    assert (
        message == "branch 'main': unknown loss_cls 'softmax'; use one of focal, varifocal, ia_bce."
    )
    with pytest.raises(ValueError, match=r"cls_alpha must be in \[0, 1\] and cls_gamma >= 0"):
        Branch("main", FixedAssigner(INDICES), loss_cls="ia_bce", cls_alpha=1.5)


def test_hydra_override_composes_and_builds():
    cfg = compose(
        "matcher.criterion.branches.main.loss_cls=varifocal",
        "matcher.criterion.branches.enc.loss_cls=ia_bce",
    )
    crit = instantiate(cfg.matcher.criterion)
    assert isinstance(crit, SetCriterion)
    kinds = {b.stream: crit.cls_loss_params(b) for b in crit.branches}
    assert kinds == {"main": ("varifocal", 0.75, 2.0), "enc_outputs": ("ia_bce", 0.25, 2.0)}
    # ...and the default config keeps the focal loss on every branch.
    default = instantiate(compose().matcher.criterion)
    assert {b.loss_cls for b in default.branches} == {"focal"}
    # the built criterion runs (Hungarian assignment, every term finite)
    torch.manual_seed(0)
    c = 4  # the config leaves num_classes to the data module; the losses take it from the logits
    outputs = {
        "pred_logits": torch.randn(2, 5, c),
        "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25,
        "enc_outputs": {
            "pred_logits": torch.randn(2, 5, 1),
            "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25,
        },
    }
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
        },
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
    ]
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"loss_ce", "loss_ce_enc"} <= set(losses)


@pytest.mark.parametrize("loss_cls", ["varifocal", "ia_bce"])
def test_iou_aware_losses_add_no_host_sync(loss_cls):
    """The IoU targets are written without a data-dependent shape: the criterion keeps its three
    host copies per step (tests/test_host_syncs.py), with every branch on the IoU-aware loss."""
    import dataclasses

    from helpers.syncs import (
        NUM_CLASSES,
        SyncCounter,
        ms_detr_branches,
        synthetic_ms_detr_outputs,
    )

    criterion = SetCriterion(
        NUM_CLASSES, [dataclasses.replace(b, loss_cls=loss_cls) for b in ms_detr_branches()]
    )
    outputs, targets = synthetic_ms_detr_outputs(num_layers=3, num_images=2)
    with SyncCounter() as counter:
        losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert counter.counts == {"copy to host": 3}, counter.counts
