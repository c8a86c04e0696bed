"""MS-DETR's one-to-many assigner and the indices merge, on hand-made cases."""
import torch

from msdetr.losses.criterion import merge_indices
from msdetr.matching import MixedScoreTopKAssigner, cap_positives, quality_assign, topk_per_gt


def test_quality_assign_threshold_and_low_quality_rescue():
    quality = torch.tensor([[0.9, 0.5, 0.1, 0.2],
                            [0.1, 0.3, 0.2, 0.35]])
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
    quality = torch.tensor([[0.9, 0.8, 0.7, 0.1],
                            [0.2, 0.3, 0.1, 0.6]])
    best_gt = torch.tensor([0, 0, 0, 1])
    positive = torch.tensor([True, False, False, True])  # GT 0 has 1 positive, GT 1 has 1
    queries, gts = topk_per_gt(quality, best_gt, positive, k=6)
    assert sorted(zip(queries.tolist(), gts.tolist())) == [(0, 0), (3, 1)]
    positive = torch.tensor([True, True, True, True])  # GT 0: 3 positives -> its top-3 over all queries
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
    (queries, gts), = MixedScoreTopKAssigner()(outputs, [target])
    assert sorted(queries.tolist()) == [0, 1] and gts.tolist() == [0, 0]
    assert queries[-1] == 0  # the best pair comes last
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    (queries, gts), = MixedScoreTopKAssigner()(outputs, [empty])
    assert queries.numel() == 0 and gts.numel() == 0


def test_merge_indices_union_with_second_winning():
    first = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    second = [(torch.tensor([2, 3]), torch.tensor([1, 1]))]
    (queries, gts), = merge_indices(first, second, num_queries=5)
    assert queries.tolist() == [0, 2, 3] and gts.tolist() == [1, 1, 1]
