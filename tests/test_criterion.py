"""The criterion's target semantics where a one-to-many assignment claims a query twice, checked
against the official rule written out here (no fixture): one class per query, every pair in the
boxes."""

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from helpers.assigners import FixedAssigner
from msdetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from msdetr.losses import Branch, SetCriterion
from msdetr.losses.criterion import merge_indices, query_class_targets
from msdetr.matching import Assigner, MixedScoreTopKAssigner


def _official_class_target(logits, targets, indices):
    """The official loss_labels target: a (B, Q) class map written pair by pair in order, so a query
    written twice keeps its last pair's label; then a one-hot over the classes (background
    dropped)."""
    b, q, c = logits.shape
    target = torch.full((b, q), c, dtype=torch.int64)
    for i, (queries, gts) in enumerate(indices):
        for query, gt in zip(queries.tolist(), gts.tolist()):
            target[i, query] = targets[i]["labels"][gt]
    return torch.nn.functional.one_hot(target, c + 1)[..., :c].float()


def _case():
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 4)
    boxes = torch.rand(2, 6, 4) * 0.5 + 0.25
    targets = [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.5, 0.45, 0.3, 0.2]]),
        },
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])},
    ]
    # Image 0: query 4 is in the top-k of both GTs (class 1, then class 3 in ascending quality);
    # query 1 only of GT 0. Image 1: one plain pair.
    indices = [
        (torch.tensor([1, 4, 4]), torch.tensor([0, 0, 1])),
        (torch.tensor([2]), torch.tensor([0])),
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def test_a_query_claimed_twice_takes_its_last_pairs_class():
    outputs, targets, indices = _case()
    batch, query, label = query_class_targets(indices, targets, num_queries=6)
    assert list(zip(batch.tolist(), query.tolist(), label.tolist())) == [
        (0, 1, 1),
        (0, 4, 3),
        (1, 2, 2),
    ]


def test_losses_follow_the_official_semantics():
    outputs, targets, indices = _case()
    crit = SetCriterion(4, [Branch("main", FixedAssigner(indices))])
    num_boxes = 3.0
    terms = crit.layer_losses(outputs, targets, indices, num_boxes)

    onehot = _official_class_target(outputs["pred_logits"], targets, indices)
    assert onehot[0, 4].tolist() == [0, 0, 0, 1]  # one class, not both
    expected_ce = (
        sigmoid_focal_loss(outputs["pred_logits"], onehot, 0.25, 2.0, reduction="sum") / num_boxes
    )
    torch.testing.assert_close(terms["ce"], expected_ce)

    # The box terms count all three pairs of image 0, query 4 twice.
    src = torch.cat([outputs["pred_boxes"][0, [1, 4, 4]], outputs["pred_boxes"][1, [2]]])
    tgt = torch.cat([targets[0]["boxes"][[0, 0, 1]], targets[1]["boxes"][[0]]])
    torch.testing.assert_close(terms["bbox"], (src - tgt).abs().sum() / num_boxes)
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
    torch.testing.assert_close(terms["giou"], (1 - giou).sum() / num_boxes)


def test_class_error_counts_every_pair_with_its_own_label():
    outputs, targets, indices = _case()
    logits = torch.full((2, 6, 4), -4.0)
    logits[0, 1, 1] = 4.0  # right
    logits[0, 4, 3] = 4.0  # right for its last pair (class 3), wrong for its first (class 1)
    logits[1, 2, 0] = 4.0  # wrong
    outputs = {**outputs, "pred_logits": logits}
    error = SetCriterion.class_error(outputs, targets, indices)
    # 2 of 4 pairs right, as the official accuracy
    torch.testing.assert_close(error, torch.tensor(50.0))


def test_merge_keeps_one_gt_per_query():
    first = [(torch.tensor([0, 4]), torch.tensor([1, 0]))]
    # query 4 twice: its last pair (GT 2) wins
    second = [(torch.tensor([4, 2, 4]), torch.tensor([1, 0, 2]))]
    ((queries, gts),) = merge_indices(first, second, num_queries=6)
    assert queries.tolist() == [0, 2, 4] and gts.tolist() == [1, 0, 2]


def test_assigner_duplicates_end_to_end_with_the_best_gt_last():
    """A real MS-DETR assignment in which one query is in two GTs' top-k: the loss sees the class of
    the GT whose quality for it is higher."""
    # Same-size boxes along x: GT 0 at 0.45 (class 0), GT 1 at 0.50 (class 2). Query 0 is GT 0,
    # query 1 next to GT 1, query 3 a weaker positive of GT 0, query 2 between the two GTs: GT 0's
    # second best (IoU 0.74) and GT 1's (IoU 0.82), so it is in both GTs' top-2.
    xs = [0.45, 0.51, 0.48, 0.40] + [0.05] * 12
    boxes = torch.tensor([[[x, 0.5, 0.2, 0.2] for x in xs]])
    logits = torch.full((1, 16, 3), -3.0)
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.45, 0.5, 0.2, 0.2], [0.50, 0.5, 0.2, 0.2]]),
        }
    ]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    ((queries, gts),) = MixedScoreTopKAssigner(positive_fraction=1.0)(outputs, targets)
    assert (queries == 2).sum() == 2
    batch, query, label = query_class_targets([(queries, gts)], targets, num_queries=16)
    assert dict(zip(query.tolist(), label.tolist()))[2] == 2
    crit = SetCriterion(3, [Branch("main", FixedAssigner([(queries, gts)]))])
    terms = crit.layer_losses(outputs, targets, [(queries, gts)], 2.0)
    onehot = _official_class_target(logits, targets, [(queries, gts)])
    torch.testing.assert_close(
        terms["ce"], sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum") / 2.0
    )


class EveryOtherQuery(Assigner):
    """A new assigner, defined here and nowhere in msdetr: GT j of an image supervises query 2j;
    the classification loss leaves out the odd queries and the loss is averaged over 2 (as if
    two groups). `assign_many` is its own, so every call of a step reaches it in one batch."""

    batches: list[int] = []

    def assign(self, outputs, targets):
        device = outputs["pred_logits"].device
        gts = [torch.arange(len(t["labels"]), device=device) for t in targets]
        return [(j * 2, j) for j in gts]

    @classmethod
    def assign_many(cls, calls):
        cls.batches.append(len(calls))
        return [assigner.assign(outputs, targets) for assigner, outputs, targets in calls]

    def normalizer_scale(self, outputs, targets):
        return 2.0

    def class_loss_mask(self, outputs, targets):
        queries = outputs["pred_logits"].shape[1]
        return (torch.arange(queries) % 2 == 0).expand(len(targets), queries)


class EveryOtherQueryOnAnchors(EveryOtherQuery):
    box_key = "anchors"


def test_a_new_assigner_is_one_class():
    """An assigner written against the `Assigner` contract alone runs as a branch: its pairs, its
    normalizer factor and its classification mask reach the losses, its subclasses are assigned
    in the same batch, and `check_model` reads its box key."""
    torch.manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.rand(2, 4) * 0.5 + 0.25},
        {"labels": torch.tensor([2]), "boxes": torch.rand(1, 4) * 0.5 + 0.25},
    ]

    def layer():
        return {
            "pred_logits": torch.randn(2, 6, 4),
            "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.25,
            "anchors": torch.rand(2, 6, 4) * 0.5 + 0.25,
        }

    aux = [layer(), layer()]
    o2m = {**layer(), "aux_outputs": [layer(), layer()]}
    outputs = {**layer(), "aux_outputs": aux, "o2m_outputs": o2m}
    crit = SetCriterion(
        4,
        [
            Branch("main", EveryOtherQuery()),
            Branch("o2m_outputs", EveryOtherQueryOnAnchors(), suffix="_o2m"),
        ],
    )
    crit.check_model({"main": {"pred_boxes"}, "o2m_outputs": {"pred_boxes", "anchors"}})
    with pytest.raises(ValueError, match="'anchors'"):
        crit.check_model({"main": {"pred_boxes"}, "o2m_outputs": {"pred_boxes"}})
    EveryOtherQuery.batches.clear()
    losses = crit(outputs, targets)
    assert EveryOtherQuery.batches == [6]  # 3 layers of 2 branches, one batch
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]
    mask = (torch.arange(6) % 2 == 0).expand(2, 6)
    for name, out in (("_0", aux[0]), ("_1", aux[1]), ("", outputs)):
        expected = crit.layer_losses(out, targets, indices, 3.0 * 2.0, class_mask=mask)
        for key in ("ce", "bbox", "giou"):
            torch.testing.assert_close(losses[f"loss_{key}{name}"], expected[key])
    unmasked = crit.layer_losses(outputs, targets, indices, 3.0 * 2.0)
    assert losses["loss_ce"] < unmasked["ce"]  # the odd queries' background terms are left out
    assert {f"loss_ce_{i}_o2m" for i in range(2)} | {"loss_ce_o2m"} <= set(losses)


def test_a_branch_takes_only_an_assigner():
    with pytest.raises(TypeError, match="not an msdetr.matching.Assigner"):
        Branch("main", lambda outputs, targets: [])
