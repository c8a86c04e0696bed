"""The one-to-many assigners (MS-DETR's mixed score, DETA's IoU) and the indices merge, on hand-made
cases."""

import pytest
import torch

from helpers.assigners import cap_positives, topk_per_gt
from msdetr.losses.criterion import merge_indices, query_class_targets
from msdetr.matching import IoUTopKAssigner, MixedScoreTopKAssigner, quality_assign


def test_quality_assign_threshold_and_low_quality_rescue():
    quality = torch.tensor([[0.9, 0.5, 0.1, 0.2], [0.1, 0.3, 0.2, 0.35]])
    best_gt, positive, negative = quality_assign(quality, threshold=0.4)
    assert best_gt.tolist() == [0, 0, 1, 1]
    # query 3 is below the threshold but is GT 1's best: rescued, keeping its own best GT (1).
    assert positive.tolist() == [True, True, False, True]
    _, strict, _ = quality_assign(quality, threshold=0.4, low_quality="none")
    assert strict.tolist() == [True, True, False, False]


def test_cap_keeps_a_random_subset_only_above_the_cap():
    positive = torch.tensor([True, False, True, True, True])
    assert torch.equal(cap_positives(positive, 4, None), positive)
    capped = cap_positives(positive, 2, torch.Generator().manual_seed(0))
    assert capped.sum() == 2 and not (capped & ~positive).any()


def test_topk_per_gt_searches_all_queries_and_sorts_ascending():
    quality = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.3, 0.1, 0.6]])
    best_gt = torch.tensor([0, 0, 0, 1])
    positive = torch.tensor([True, False, False, True])  # GT 0 has 1 positive, GT 1 has 1
    queries, gts = topk_per_gt(quality, best_gt, positive, k=6)
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 0), (3, 1)]
    # GT 0: 3 positives -> its top-3 over all queries
    positive = torch.tensor([True, True, True, True])
    queries, gts = topk_per_gt(quality, best_gt, positive, k=2)
    scores = quality[gts, queries]
    assert (scores[1:] >= scores[:-1]).all()
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 0), (1, 0), (3, 1)]


def test_assigner_end_to_end_and_empty_images():
    # 8 queries so that the positive cap, int(0.25 * Q), is 2.
    far = [[0.1, 0.1, 0.05, 0.05]] * 6
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2], *far]])
    logits = torch.full((1, 8, 4), -5.0)
    logits[0, :2, 2] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    ((queries, gts),) = MixedScoreTopKAssigner()(outputs, [target])
    assert sorted(queries.tolist()) == [0, 1] and gts.tolist() == [0, 0]
    assert queries[-1] == 0  # the best pair comes last
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    ((queries, gts),) = MixedScoreTopKAssigner()(outputs, [empty])
    assert queries.numel() == 0 and gts.numel() == 0


def test_merge_indices_union_with_second_winning():
    first = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    second = [(torch.tensor([2, 3]), torch.tensor([1, 1]))]
    ((queries, gts),) = merge_indices(first, second, num_queries=5)
    assert queries.tolist() == [0, 2, 3] and gts.tolist() == [1, 1, 1]


# Each one-to-many assigner's official rule, written out step by step from its own repository, on
# crowded scenes where candidates sit in the top-k of two GTs of different classes. The positive cap
# is kept out of play (positive_fraction 1) so the rule is deterministic.


def _official_matcher(quality, threshold, ties):
    """Each candidate's best GT; positive at >= threshold; every GT's best candidate (all ties for
    DETA's detectron2 Matcher, the first best for MS-DETR's topk(1)) made positive."""
    best_val, best_gt = quality.max(dim=0)
    positive = best_val >= threshold
    for g in range(quality.shape[0]):
        row = quality[g]
        best = (row == row.max()).nonzero().flatten().tolist() if ties else [int(row.argmax())]
        for n in best:
            positive[n] = True
    return best_gt, positive


def _official_topk_per_gt(quality, best_gt, positive, k, sort_by_score):
    """sample_topk_per_gt: for each GT (ascending) with c positives its top-min(c, k) candidates by
    quality over all candidates, in top-k order; MS-DETR then sorts all pairs by ascending score,
    DETA returns them as they are."""
    pairs = []
    for g in sorted(set(best_gt[positive].tolist())):
        c = int((best_gt[positive] == g).sum())
        scores, cands = quality[g].topk(min(k, quality.shape[1]))
        pairs += [(float(s), int(n), g) for s, n in zip(scores[:c], cands[:c])]
    if sort_by_score:
        order = torch.tensor([s for s, _, _ in pairs]).argsort().tolist()
        pairs = [pairs[i] for i in order]
    return [n for _, n, _ in pairs], [g for _, _, g in pairs]


def _crowded(seed, clusters=7, per_cluster=3, num_queries=48, num_classes=6):
    """GTs in overlapping clusters (a crowd), queries scattered around them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.cat(
        [
            0.25 + 0.5 * torch.rand(clusters, 2, generator=g),
            0.15 + 0.15 * torch.rand(clusters, 2, generator=g),
        ],
        1,
    )
    gt_boxes = base.repeat_interleave(per_cluster, 0)
    gt_boxes = gt_boxes + 0.025 * torch.randn(gt_boxes.shape, generator=g) * torch.tensor(
        [1.0, 1.0, 0.5, 0.5]
    )
    pick = torch.randint(len(gt_boxes), (num_queries,), generator=g)
    boxes = (gt_boxes[pick] + 0.02 * torch.randn(num_queries, 4, generator=g)).clamp(0.05, 0.95)
    outputs = {
        "pred_logits": torch.randn(1, num_queries, num_classes, generator=g),
        "pred_boxes": boxes[None],
        "init_reference": boxes[None],
    }
    target = {
        "labels": torch.randint(num_classes, (len(gt_boxes),), generator=g),
        "boxes": gt_boxes,
    }
    return outputs, [target]


def _class_map(indices, target, num_queries):
    """The official `target_classes[idx] = labels`, one write per pair in order: the last one
    stays."""
    classes = [-1] * num_queries
    for n, g in zip(*(x.tolist() for x in indices[0])):
        classes[n] = int(target["labels"][g])
    return classes


@pytest.mark.parametrize("seed", range(6))
def test_each_assigner_lists_its_pairs_in_its_official_order(seed):
    outputs, targets = _crowded(seed)
    num_queries = outputs["pred_logits"].shape[1]
    ms_detr = MixedScoreTopKAssigner(positive_fraction=1.0)
    deta = IoUTopKAssigner(threshold=0.6, k=4, positive_fraction=1.0)
    cases = [(ms_detr, 0.4, False, 6, True), (deta, 0.6, True, 4, False)]
    for assigner, threshold, ties, k, sort_by_score in cases:
        quality = assigner.quality(outputs, 0, targets[0])
        best_gt, positive = _official_matcher(quality, threshold, ties)
        expected = _official_topk_per_gt(quality, best_gt, positive, k, sort_by_score)
        indices = assigner(outputs, targets)
        assert (indices[0][0].tolist(), indices[0][1].tolist()) == expected
        # The class each query then gets: the official class map, written pair by pair.
        _, query, label = query_class_targets(indices, targets, num_queries)
        got = [-1] * num_queries
        for q, c in zip(query.tolist(), label.tolist()):
            got[q] = c
        assert got == _class_map(indices, targets[0], num_queries)
        shared = [
            n
            for n in set(expected[0])
            if len({int(targets[0]["labels"][g]) for m, g in zip(*expected) if m == n}) > 1
        ]
        assert shared, "the scene must put a candidate in the top-k of two GTs of different classes"


def test_deta_order_gives_the_larger_gt_index_not_the_better_gt():
    """A proposal in the top-k of two GTs: DETA's unsorted pairs give it the later GT's class even
    where the earlier GT overlaps it more; MS-DETR's sorted pairs give it the better GT's class."""
    # GT 0 (class 1) is proposal 0; GT 1 (class 2) is proposal 1 and the best GT of proposal 2 too
    # (IoU 0.6), so it takes its top-2 over all proposals: 1 and then 0 (IoU 0.67 with GT 1, 1 with
    # GT 0).
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.54, 0.5, 0.2, 0.2], [0.59, 0.5, 0.2, 0.2]]])
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": boxes, "init_reference": boxes}
    targets = [
        {
            "labels": torch.tensor([1, 2]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.54, 0.5, 0.2, 0.2]]),
        }
    ]
    deta = IoUTopKAssigner(threshold=0.5, k=2, positive_fraction=1.0)
    ms_detr = MixedScoreTopKAssigner(threshold=0.4, k=2, positive_fraction=1.0)
    for assigner, expected_class in ((deta, 2), (ms_detr, 1)):
        indices = assigner(outputs, targets)
        _, query, label = query_class_targets(indices, targets, 3)
        assert dict(zip(query.tolist(), label.tolist()))[0] == expected_class, type(
            assigner
        ).__name__


def test_pair_order_is_checked_and_overridable():
    assert MixedScoreTopKAssigner().pair_order == "quality" and IoUTopKAssigner().pair_order == "gt"
    assert IoUTopKAssigner(pair_order="quality").pair_order == "quality"
    assert IoUTopKAssigner.pair_order == "gt"  # the override is the instance's own
    with pytest.raises(ValueError, match="pair_order"):
        IoUTopKAssigner(pair_order="best")


def _official_subsample(quality, threshold, ties, cap):
    """The official subsample_labels on one image: a permutation of the positives (ascending
    indices) and then one of the negatives, drawn from torch's global RNG whether or not the cap
    binds; the first `cap` permuted positives are kept."""
    best_gt, positive = _official_matcher(quality, threshold, ties)
    negative = ~positive  # one threshold: below it and not rescued
    idx = positive.nonzero().flatten()
    perm = torch.randperm(idx.numel())
    torch.randperm(int(negative.sum()))
    kept = torch.zeros_like(positive)
    kept[idx[perm[:cap]]] = True
    return best_gt, kept


@pytest.mark.parametrize("seed", range(4))
def test_the_random_cap_draws_as_the_official_code(seed):
    """Without a seed of their own the assigners draw from torch's global RNG, as the official code
    does, and the same draws in the same order: where the cap binds the same positives are kept, and
    the stream is left where the official code leaves it (the next draw is the same)."""
    outputs, target = _crowded(seed)
    outputs = {k: torch.cat([v, v.flip(1)]) for k, v in outputs.items()}  # two images
    targets = target * 2
    for assigner, threshold, ties, k, sort_by_score in (
        (MixedScoreTopKAssigner(positive_fraction=0.2), 0.4, False, 6, True),
        (IoUTopKAssigner(threshold=0.6, k=4, positive_fraction=0.1), 0.6, True, 4, False),
    ):
        cap = int(assigner.positive_fraction * outputs["pred_logits"].shape[1])
        torch.manual_seed(100 + seed)
        expected = []
        for b in range(2):
            quality = assigner.quality(outputs, b, targets[b])
            best_gt, kept = _official_subsample(quality, threshold, ties, cap)
            expected.append(_official_topk_per_gt(quality, best_gt, kept, k, sort_by_score))
        after_official = torch.randint(1 << 30, (4,))
        torch.manual_seed(100 + seed)
        got = assigner(outputs, targets)
        assert [(q.tolist(), g.tolist()) for q, g in got] == expected
        assert torch.equal(torch.randint(1 << 30, (4,)), after_official)
        positives = [
            int(
                _official_matcher(assigner.quality(outputs, b, targets[b]), threshold, ties)[
                    1
                ].sum()
            )
            for b in range(2)
        ]
        assert max(positives) > cap, "the cap must bind for this test to mean something"


def test_costs_and_qualities_keep_the_models_precision():
    """Near-ties resolve as the official code resolves them in its own precision: float64 outputs
    are matched in float64 (a float32 cost picks another, almost as cheap matching on crowded
    float64 runs), half precision in float32."""
    from msdetr.matching import HungarianMatcher

    outputs, targets = _crowded(0)
    for dtype, expected in (
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
    ):
        out = {k: v.to(dtype) for k, v in outputs.items()}
        assert HungarianMatcher().cost_matrices(out, targets)[0].dtype == expected
        assert MixedScoreTopKAssigner().quality(out, 0, targets[0]).dtype == expected
        assert IoUTopKAssigner().quality(out, 0, targets[0]).dtype == expected


def _reference_assign(assigner, outputs, targets):
    """`assigner(outputs, targets)` image by image: `quality_assign`, the random cap and the per-GT
    top-k of tests/helpers/assigners.py, drawing from the assigner's generator in image order."""
    out = []
    for b, target in enumerate(targets):
        if len(target["labels"]) == 0:
            out.append(([], []))
            continue
        quality = assigner.quality(outputs, b, target)
        best_gt, positive, negative = quality_assign(
            quality, assigner.threshold, assigner.low_quality, assigner.ignore_below
        )
        kept = cap_positives(
            positive, assigner.cap(quality.shape[1]), assigner.generator, int(negative.sum())
        )
        queries, gts = topk_per_gt(quality, best_gt, kept, assigner.k, assigner.pair_order)
        out.append((queries.tolist(), gts.tolist()))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_the_batch_of_calls_is_the_image_by_image_rule(seed):
    """`QualityTopKAssigner.assign_many` over calls of both assigners (seeded or on the global RNG,
    binding caps, an image without GTs) gives, bit for bit, what the per-image rule gives call after
    call, and leaves every random stream where that rule leaves it."""
    outputs, target = _crowded(seed)
    outputs = {k: torch.cat([v, v.flip(1), v]) for k, v in outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    targets = [target[0], empty, target[0]]

    def assigners():
        return [
            MixedScoreTopKAssigner(positive_fraction=0.1, seed=seed),
            IoUTopKAssigner(threshold=0.6, k=4, positive_fraction=0.1),
            MixedScoreTopKAssigner(positive_fraction=0.5, pair_order="gt"),
            IoUTopKAssigner(
                threshold=0.5, ignore_below=0.2, k=3, positive_fraction=0.05, seed=seed + 7
            ),
        ]

    torch.manual_seed(seed)
    reference = assigners()
    expected = [_reference_assign(a, outputs, targets) for a in reference]
    after = torch.randint(1 << 30, (4,))
    torch.manual_seed(seed)
    batched = assigners()
    got = MixedScoreTopKAssigner.batch_group().assign_many([(a, outputs, targets) for a in batched])
    assert [[(q.tolist(), g.tolist()) for q, g in call] for call in got] == expected
    assert torch.equal(torch.randint(1 << 30, (4,)), after)
    for mine, theirs in zip(batched, reference):
        if mine.generator is not None:
            assert torch.equal(mine.generator.get_state(), theirs.generator.get_state())
    assert IoUTopKAssigner.batch_group() is MixedScoreTopKAssigner.batch_group()
    for assigner in reference:  # the cap binds for every assigner (in the first image)
        quality = assigner.quality(outputs, 0, targets[0])
        _, positive, _ = quality_assign(
            quality, assigner.threshold, assigner.low_quality, assigner.ignore_below
        )
        assert positive.sum() > assigner.cap(quality.shape[1]), type(assigner).__name__
