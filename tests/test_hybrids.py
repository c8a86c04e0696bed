"""Training-only query blocks (H-DETR hybrid queries, Group DETR groups) and the branches that use them."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from msdetr.lit import DetectionModule
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import HungarianMatcher

from test_model import batch, tiny

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
TARGETS = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])}]

VARIANTS = [
    dict(hybrid_queries=11),
    dict(hybrid_queries=11, two_stage=True, with_box_refine=True),
    dict(hybrid_queries=11, two_stage=True, with_box_refine=True, mixed_selection=True, look_forward_twice=True),
    dict(query_groups=3),
    dict(query_groups=3, two_stage=True, with_box_refine=True, mixed_selection=True),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_extra_queries_only_in_training_and_invisible_to_the_one_to_one_ones(kw):
    torch.manual_seed(0)
    model = tiny(**kw)
    images, mask = batch()
    out = model(images, mask)
    extra = 11 if "hybrid_queries" in kw else 2 * 7
    assert out["pred_logits"].shape == (2, 7, 5)
    assert out["hybrid_outputs"]["pred_logits"].shape == (2, extra, 5)
    assert len(out["hybrid_outputs"]["aux_outputs"]) == 1
    # The self-attention mask isolates the blocks: with dropout 0 the one-to-one outputs of a training
    # forward are exactly the inference outputs, which never see the extra queries.
    model.eval()
    with torch.no_grad():
        ref = model(images, mask)
    assert "hybrid_outputs" not in ref
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=1e-5)
    model.train()
    # ...and gradients of the one-to-one outputs never reach the extra queries' embeddings.
    if hasattr(model, "query_embed"):
        out["pred_logits"].sum().backward()
        grad = model.query_embed.weight.grad
        assert grad[7:].abs().max() == 0 and grad[:7].abs().max() > 0


def test_groups_share_the_one_to_one_proposals():
    torch.manual_seed(0)
    model = tiny(query_groups=3, two_stage=True, with_box_refine=True, mixed_selection=True)
    out = model(*batch())
    refs = out["hybrid_outputs"]["init_reference"]
    torch.testing.assert_close(refs[:, :7], out["init_reference"])
    torch.testing.assert_close(refs[:, 7:], out["init_reference"])


def test_group_hungarian_matches_every_group_on_its_own():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 12, 5), "pred_boxes": torch.rand(2, 12, 4) * 0.5 + 0.25}
    grouped = HungarianMatcher(group_size=4)(outputs, TARGETS)
    for b, (rows, cols) in enumerate(grouped):
        for g in range(3):
            block = {k: v[:, 4 * g:4 * g + 4] for k, v in outputs.items()}
            (r, c), = HungarianMatcher()({k: v[b:b + 1] for k, v in block.items()}, TARGETS[b:b + 1])
            in_group = (rows >= 4 * g) & (rows < 4 * g + 4)
            assert rows[in_group].tolist() == (r + 4 * g).tolist() and cols[in_group].tolist() == c.tolist()
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        HungarianMatcher(group_size=5)(outputs, TARGETS)


def test_repeated_targets_match_every_gt_k_times_with_a_k_times_normalizer():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 20, 5), "pred_boxes": torch.rand(2, 20, 4) * 0.5 + 0.25}
    branch = Branch("main", HungarianMatcher(), aux=False, repeat_targets=6)
    crit = SetCriterion(5, [branch])
    losses = crit(outputs, TARGETS)
    repeated = [{"labels": t["labels"].repeat(6), "boxes": t["boxes"].repeat(6, 1)} for t in TARGETS]
    indices = HungarianMatcher()(outputs, repeated)
    assert [len(r) for r, _ in indices] == [12, 6]
    manual = crit.layer_losses(outputs, repeated, indices, num_boxes=3 * 6)
    for key in ("ce", "bbox", "giou"):
        torch.testing.assert_close(losses[f"loss_{key}"], manual[key])


def test_group_normalizer_averages_over_groups():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 8, 5), "pred_boxes": torch.rand(2, 8, 4) * 0.5 + 0.25}
    plain = SetCriterion(5, [Branch("main", HungarianMatcher(), aux=False)])(outputs, TARGETS)
    scaled = SetCriterion(5, [Branch("main", HungarianMatcher(), aux=False, num_boxes_scale=4)])(outputs, TARGETS)
    torch.testing.assert_close(scaled["loss_bbox"] * 4, plain["loss_bbox"])


def _compose(*overrides):
    with initialize_config_dir(os.path.abspath(CONF), version_base="1.3"):
        return compose("train", overrides=["data.num_classes=5", *overrides])


@pytest.mark.parametrize("matcher", ["hungarian", "ms_detr", "deta", "h_detr", "group_detr", "ms_detr_h_detr",
                                     "ms_detr_deta", "ms_detr_iou"])
@pytest.mark.parametrize("model", ["deformable_detr", "deformable_detr_two_stage_refine", "deformable_detr_pp", "deta"])
def test_every_matcher_fits_every_model_or_says_why(matcher, model):
    cfg = _compose(f"model={model}", f"matcher={matcher}", "model.detector.backbone.pretrained=false",
                   "model.detector.backbone.name=resnet18", "model.detector.num_queries=6",
                   "model.detector.hidden_dim=32", "model.detector.nheads=2", "model.detector.enc_layers=1",
                   "model.detector.dec_layers=2", "model.detector.dim_feedforward=32",
                   *(["model.detector.hybrid_queries=12"] if "h_detr" in matcher else []))
    one_stage = not cfg.model.detector.two_stage
    needs_two_stage = matcher in ("deta", "ms_detr_deta", "ms_detr_iou")
    model_ = instantiate(cfg.model.detector)
    criterion = instantiate(cfg.matcher.criterion)
    if one_stage and needs_two_stage:
        with pytest.raises(ValueError, match="two-stage|two_stage"):
            DetectionModule(model_, criterion)
        return
    module = DetectionModule(model_, criterion)
    out = module.model(*batch(64, 64))
    losses = criterion(out, TARGETS)
    total = criterion.total(losses)
    assert torch.isfinite(total)
    total.backward()
    streams = {b.stream for b in criterion.branches} - ({"enc_outputs"} if one_stage else set())
    for stream in streams:
        suffix = next(b.suffix for b in criterion.branches if b.stream == stream)
        assert f"loss_bbox{suffix}" in losses, stream


def test_a_branch_without_its_stream_is_one_sentence():
    model = tiny()
    crit = SetCriterion(5, [Branch("main", HungarianMatcher()), Branch("hybrid_outputs", HungarianMatcher())])
    with pytest.raises(ValueError, match="hybrid_queries or query_groups"):
        DetectionModule(model, crit)


@pytest.mark.parametrize("bad, message", [
    (dict(hybrid_queries=4, query_groups=2), "only one of them"),
    (dict(query_groups=2, two_stage=True), "mixed_selection=true"),
    (dict(query_groups=0), "query_groups >= 1"),
])
def test_inconsistent_query_blocks_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(**bad)
