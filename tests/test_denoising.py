"""Denoising queries (DN-DETR, DINO's contrastive denoising) as a training-only query block: who
sees whom, the noise, the known assignment and its loss, and that none of it changes the
one-to-one queries or exists at inference."""

import pytest
import torch

from helpers.detectors import batch, tiny_detector
from msdetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import DenoisingAssigner, HungarianMatcher
from msdetr.models import ContrastiveDenoisingQueries, DenoisingQueries, TwoStageQueries

TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]),
    },
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
]
TWO_STAGE = (
    "model=deformable_detr_two_stage_refine",
    "model.detector.queries.mixed_selection=true",
)
DN = ("matcher=dn_detr", "model.detector.training_queries.dn.groups=2")  # DN-DETR's block, 2 groups
CDN = ("matcher=dino", "model.detector.training_queries.dn.max_positives=2")  # DINO's, 4 groups


def test_attention_mask_keeps_groups_apart_and_hides_them_from_the_matching_queries():
    # 7 one-to-one queries, 2 DN groups of 2 (largest GT count)
    model = tiny_detector(*TWO_STAGE, *DN)
    block = model.training_queries["dn"]
    sizes = [[7], block.sizes(7, TARGETS)]
    assert sizes[1] == [2, 2]
    mask = model.self_attn_mask([block], sizes, "cpu")  # True: may not attend
    o2o, g0, g1 = slice(0, 7), slice(7, 9), slice(9, 11)
    assert mask[o2o, g0].all() and mask[o2o, g1].all() and not mask[o2o, o2o].any()
    assert not mask[g0, o2o].any() and not mask[g0, g0].any() and mask[g0, g1].all()
    assert not mask[g1, o2o].any() and not mask[g1, g1].any() and mask[g1, g0].all()


def test_one_to_one_outputs_do_not_change_with_denoising_queries():
    torch.manual_seed(0)
    model = tiny_detector(*TWO_STAGE, *CDN)
    images, mask = batch()
    out = model(images, mask, TARGETS)
    # 4 groups x (pos + neg) x 2 GTs
    assert out["dn_outputs"]["pred_logits"].shape == (2, 4 * 2 * 2, 5)
    model.eval()
    with torch.no_grad():
        ref = model(images, mask)
    assert "dn_outputs" not in ref  # nothing of it at inference
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_training_without_targets_is_one_sentence():
    model = tiny_detector(*TWO_STAGE, *DN)
    with pytest.raises(ValueError, match="built from the targets: call model"):
        model(*batch())


def test_one_stage_models_are_refused():
    with pytest.raises(ValueError, match="needs box references: use a two-stage model"):
        tiny_detector(*DN)


def test_dn_queries_start_from_their_noised_gt():
    torch.manual_seed(0)
    model = tiny_detector(*TWO_STAGE, *DN)
    block = model.training_queries["dn"]
    queries = block.build(TARGETS, model.queries)
    assert queries.tgt.shape == (2, 4, 64) and queries.reference.shape == (2, 4, 4)
    for b, t in enumerate(TARGETS):
        n = len(t["labels"])
        for g in range(2):
            ref = queries.reference[b, 2 * g : 2 * g + n]
            gt = t["boxes"]
            # DN-DETR: centre within 0.4 x half the size, size within 0.4 x the size.
            assert ((ref[:, :2] - gt[:, :2]).abs() <= 0.4 * gt[:, 2:] / 2 + 1e-6).all()
            assert ((ref[:, 2:] - gt[:, 2:]).abs() <= 0.4 * gt[:, 2:] + 1e-6).all()
        if n < 2:  # padding: no content, the box of logit 0
            assert torch.equal(queries.tgt[b, n], torch.zeros(64))
            torch.testing.assert_close(queries.reference[b, n], torch.full((4,), 0.5))
    # Positions are the selection's embedding of the boxes, as the proposals get theirs.
    torch.testing.assert_close(
        queries.pos, model.queries.positions(torch.logit(queries.reference)), atol=1e-4, rtol=1e-4
    )


def _dino_group_count(dn_number, known_num):
    """DINO's prepare_for_cdn (models/dino/dn_components.py), step by step: the number doubled
    first, divided by twice the largest GT count only from 100 on, never below 1."""
    dn_number = dn_number * 2
    if max(known_num) == 0:
        dn_number = 1
    elif dn_number >= 100:
        dn_number = dn_number // (max(known_num) * 2)
    elif dn_number < 1:
        dn_number = 1
    return max(dn_number, 1)


@pytest.mark.parametrize("dn_number", [1, 3, 10, 49, 50, 51, 77, 99, 100, 101, 250])
def test_contrastive_group_count_follows_dino_for_every_dn_number(dn_number):
    block = ContrastiveDenoisingQueries(max_positives=dn_number, seed=0)
    block.bind(name="dn", selection=TwoStageQueries(num_queries=5, d_model=16), num_classes=4)
    for largest in (1, 2, 3, 7, 30, 60, 120):
        targets = [
            {
                "labels": torch.zeros(largest, dtype=torch.long),
                "boxes": torch.full((largest, 4), 0.5),
            },
            {"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.full((1, 4), 0.5)},
        ]
        groups = _dino_group_count(dn_number, [largest, 1])
        assert block.sizes(5, targets) == [2 * largest] * groups, (dn_number, largest)


def test_contrastive_negatives_are_farther_than_positives():
    block = ContrastiveDenoisingQueries(max_positives=100, box_noise=0.4, label_noise=0.0, seed=3)
    block.bind(name="dn", selection=TwoStageQueries(num_queries=5, d_model=16), num_classes=4)
    targets = [
        {
            "labels": torch.tensor([0, 1, 2]),
            "boxes": torch.tensor(
                [[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.1, 0.3], [0.5, 0.4, 0.3, 0.1]]
            ),
        }
    ]
    assert block.sizes(5, targets) == [6] * (100 // 3)  # DINO: dn_number // largest GT count groups
    q = (
        block.build(targets, TwoStageQueries(num_queries=5, d_model=16))
        .reference[0]
        .view(-1, 2, 3, 4)
    )
    gt = targets[0]["boxes"]
    half = gt[:, 2:] / 2

    def corner_shift(boxes):  # per corner coordinate, in units of box_noise x half size
        xyxy, ref = cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt)
        return (xyxy - ref).abs() / (0.4 * half.repeat(1, 2))

    positives, negatives = corner_shift(q[:, 0]), corner_shift(q[:, 1])
    assert (
        (positives < 1 + 1e-5).all()
        and (negatives >= 1 - 1e-5).all()
        and (negatives < 2 + 1e-5).all()
    )
    assert block.flip_rate == 0.0


def test_label_noise_and_seeded_reproducibility():
    def noised(seed):
        block = DenoisingQueries(groups=1, label_noise=0.2, seed=seed)
        block.bind(name="dn", selection=TwoStageQueries(num_queries=5, d_model=16), num_classes=10)
        return block.noised_labels(torch.zeros(20000, dtype=torch.long))

    labels = noised(1)
    # a random class is 0 one time in 10
    assert abs((labels != 0).float().mean().item() - 0.2 * 0.9) < 0.01
    assert torch.equal(labels, noised(1)) and not torch.equal(labels, noised(2))
    cdn = ContrastiveDenoisingQueries(label_noise=0.5)
    assert cdn.flip_rate == 0.25  # DINO halves its ratio


def test_dn_loss_is_the_known_assignment_averaged_over_groups():
    """Hand-computed: 2 groups x 2 queries (the largest GT count) for the 2-GT image, the second
    image's padding query unassigned; L1 and GIoU summed over the assigned queries and divided by
    the batch's 3 GTs x 2 groups. The classification loss as DN-DETR's `tgt_loss_labels`: the real
    noised queries only (padding slots get no loss), as DINO's: every query, padding as
    background."""
    torch.manual_seed(0)
    boxes = torch.rand(2, 4, 4) * 0.3 + 0.3
    logits = torch.randn(2, 4, 5)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    assigner = DenoisingAssigner()
    (rows0, cols0), (rows1, cols1) = assigner(outputs, TARGETS)
    assert rows0.tolist() == [0, 1, 2, 3] and cols0.tolist() == [0, 1, 0, 1]
    assert rows1.tolist() == [0, 2] and cols1.tolist() == [0, 0]
    assert assigner.normalizer_scale(outputs, TARGETS) == 2
    crit = SetCriterion(5, [Branch("main", assigner, aux=False)])
    losses = crit(outputs, TARGETS)
    pairs = [(0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1), (1, 0, 0), (1, 2, 0)]
    l1 = sum((boxes[b, q] - TARGETS[b]["boxes"][j]).abs().sum() for b, q, j in pairs) / 6
    giou = (
        sum(
            1
            - generalized_box_iou(
                cxcywh_to_xyxy(boxes[b, q][None]), cxcywh_to_xyxy(TARGETS[b]["boxes"][j][None])
            )[0, 0]
            for b, q, j in pairs
        )
        / 6
    )
    onehot = torch.zeros_like(logits)
    for b, q, j in pairs:
        onehot[b, q, TARGETS[b]["labels"][j]] = 1
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    torch.testing.assert_close(losses["loss_bbox"], l1)
    torch.testing.assert_close(losses["loss_giou"], giou)
    # DN-DETR: the known queries gathered into one (1, N, C) batch, its focal mean over N, summed,
    # divided by the number of known queries and multiplied by N.
    known = focal[[b for b, _, _ in pairs], [q for _, q, _ in pairs]][None]
    torch.testing.assert_close(losses["loss_ce"], known.mean(1).sum() / 6 * known.shape[1])
    # DINO's rule on the same layout: every query of the part, padding slots as background.
    dino = SetCriterion(5, [Branch("main", DenoisingAssigner(padding="background"), aux=False)])
    torch.testing.assert_close(dino(outputs, TARGETS)["loss_ce"], focal.mean(1).sum() / 6 * 4)
    assert (
        DenoisingAssigner(contrastive=True).padding == "background" and assigner.padding == "ignore"
    )
    with pytest.raises(ValueError, match="padding"):
        DenoisingAssigner(padding="none")


def test_contrastive_negatives_are_background():
    outputs = {"pred_logits": torch.zeros(2, 8, 5), "pred_boxes": torch.full((2, 8, 4), 0.5)}
    (rows0, _), (rows1, _) = DenoisingAssigner(contrastive=True)(outputs, TARGETS)
    # groups of 2 positives then 2 negatives: the negatives (2, 3, 6, 7) are never assigned
    assert rows0.tolist() == [0, 1, 4, 5] and rows1.tolist() == [0, 4]


def test_a_batch_without_boxes_has_no_denoising_queries_and_a_zero_dn_loss():
    torch.manual_seed(0)
    model = tiny_detector(*TWO_STAGE, *CDN)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(*batch(), empty)
    assert out["dn_outputs"]["pred_logits"].shape == (2, 0, 5)
    crit = SetCriterion(
        5,
        [
            Branch("main", HungarianMatcher()),
            Branch("dn_outputs", DenoisingAssigner(contrastive=True), suffix="_dn"),
        ],
    )
    losses = crit(out, empty)
    assert losses["loss_bbox_dn"] == 0 and losses["loss_ce_dn"] == 0
    crit.total(losses).backward()
    # The label embedding stays in the graph through the empty queries: a zero gradient, not none,
    # so a DDP rank whose batch has no boxes reduces the same parameters as the others (DINO and
    # DN-DETR add label_enc.weight[0][0] * 0 for this).
    grad = model.training_queries["dn"].label_embed.weight.grad
    assert grad is not None and not grad.any()


def test_denoising_trains_through_the_module_with_its_noise_in_the_checkpoint_rng():
    from msdetr.lit import DetectionModule

    model = tiny_detector(*TWO_STAGE, *DN)
    crit = SetCriterion(
        5,
        [
            Branch("main", HungarianMatcher()),
            Branch("dn_outputs", DenoisingAssigner(), suffix="_dn"),
        ],
    )
    module = DetectionModule(model, crit)
    assert model.training_queries["dn"].generator in module._generators()
    images, mask = batch()
    loss = module.training_step((images, mask, TARGETS), 0)
    assert torch.isfinite(loss)
