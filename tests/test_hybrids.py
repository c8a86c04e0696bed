"""Training-only query blocks (H-DETR hybrid queries, Group DETR groups) and the branches that use
them."""

import pytest
import torch
from hydra.utils import instantiate

from helpers.config import compose
from helpers.detectors import batch, tiny_detector
from msdetr.lit import DetectionModule
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import HungarianMatcher

TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]),
    },
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
]

TWO_STAGE = "model=deformable_detr_two_stage_refine"
MIXED = "model.detector.queries.mixed_selection=true"
BLOCKS = "model.detector.training_queries."
HYBRID = ("matcher=h_detr", BLOCKS + "hybrid.num_queries=11")  # H-DETR's block, 11 queries
GROUPS = ("matcher=group_detr", BLOCKS + "groups.groups=3")  # Group DETR's, 3 groups
VARIANTS = [
    HYBRID,
    (TWO_STAGE, *HYBRID),
    ("model=deformable_detr_pp", *HYBRID),
    GROUPS,
    (TWO_STAGE, MIXED, *GROUPS),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_extra_queries_only_in_training_and_invisible_to_the_one_to_one_ones(overrides):
    torch.manual_seed(0)
    model = tiny_detector(*overrides)
    images, mask = batch()
    out = model(images, mask)
    hybrid = "hybrid" in model.training_queries
    stream, extra = ("hybrid_outputs", 11) if hybrid else ("group_outputs", 2 * 7)
    assert set(model.output_streams) - {"main"} == {
        k for k in out if k.endswith("_outputs") and k != "aux_outputs"
    }
    assert out["pred_logits"].shape == (2, 7, 5)
    assert out[stream]["pred_logits"].shape == (2, extra, 5)
    assert len(out[stream]["aux_outputs"]) == 1
    # The self-attention mask isolates the blocks: with dropout 0 the one-to-one outputs of a
    # training forward are exactly the inference outputs, which never see the extra queries.
    model.eval()
    with torch.no_grad():
        ref = model(images, mask)
    assert stream not in ref
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=1e-5)
    model.train()
    # ...and gradients of the one-to-one outputs never reach the extra queries' embeddings.
    block = next(iter(model.training_queries.values()))
    if block.embed is not None:
        out["pred_logits"].sum().backward()
        assert block.embed.weight.grad is None or block.embed.weight.grad.abs().max() == 0
        assert model.queries.query_embed.weight.grad.abs().max() > 0


def test_groups_share_the_one_to_one_proposals():
    torch.manual_seed(0)
    model = tiny_detector(TWO_STAGE, MIXED, *GROUPS)
    out = model(*batch())
    refs = out["group_outputs"]["init_reference"]
    torch.testing.assert_close(refs[:, :7], out["init_reference"])
    torch.testing.assert_close(refs[:, 7:], out["init_reference"])


def test_hybrid_queries_take_the_next_ranked_proposals():
    torch.manual_seed(0)
    model = tiny_detector(TWO_STAGE, *HYBRID)
    out = model(*batch())
    enc = out["enc_outputs"]
    # The one-to-one and then the hybrid queries start from the encoder's best 7 + 11 boxes, in rank
    # order.
    best = enc["pred_logits"][..., 0].topk(18, dim=1)[1]
    boxes = torch.gather(enc["pred_boxes"], 1, best[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(out["init_reference"], boxes[:, :7])
    torch.testing.assert_close(out["hybrid_outputs"]["init_reference"], boxes[:, 7:])


def test_group_hungarian_matches_every_group_on_its_own():
    torch.manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 12, 5),
        "pred_boxes": torch.rand(2, 12, 4) * 0.5 + 0.25,
    }
    grouped = HungarianMatcher(group_size=4)(outputs, TARGETS)
    for b, (rows, cols) in enumerate(grouped):
        for g in range(3):
            block = {k: v[:, 4 * g : 4 * g + 4] for k, v in outputs.items()}
            ((r, c),) = HungarianMatcher()(
                {k: v[b : b + 1] for k, v in block.items()}, TARGETS[b : b + 1]
            )
            in_group = (rows >= 4 * g) & (rows < 4 * g + 4)
            assert (
                rows[in_group].tolist() == (r + 4 * g).tolist()
                and cols[in_group].tolist() == c.tolist()
            )
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        HungarianMatcher(group_size=5)(outputs, TARGETS)


def test_repeated_targets_match_every_gt_k_times_with_a_k_times_normalizer():
    torch.manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 20, 5),
        "pred_boxes": torch.rand(2, 20, 4) * 0.5 + 0.25,
    }
    branch = Branch("main", HungarianMatcher(), aux=False, repeat_targets=6)
    crit = SetCriterion(5, [branch])
    losses = crit(outputs, TARGETS)
    repeated = [
        {"labels": t["labels"].repeat(6), "boxes": t["boxes"].repeat(6, 1)} for t in TARGETS
    ]
    indices = HungarianMatcher()(outputs, repeated)
    assert [len(r) for r, _ in indices] == [12, 6]
    manual = crit.layer_losses(outputs, repeated, indices, num_boxes=3 * 6)
    for key in ("ce", "bbox", "giou"):
        torch.testing.assert_close(losses[f"loss_{key}"], manual[key])


def test_group_normalizer_averages_over_groups():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 8, 5), "pred_boxes": torch.rand(2, 8, 4) * 0.5 + 0.25}
    plain = SetCriterion(5, [Branch("main", HungarianMatcher(), aux=False)])(outputs, TARGETS)
    scaled = SetCriterion(5, [Branch("main", HungarianMatcher(), aux=False, num_boxes_scale=4)])(
        outputs, TARGETS
    )
    torch.testing.assert_close(scaled["loss_bbox"] * 4, plain["loss_bbox"])


@pytest.mark.parametrize(
    "matcher",
    [
        "hungarian",
        "ms_detr",
        "deta",
        "h_detr",
        "group_detr",
        "ms_detr_h_detr",
        "ms_detr_deta",
        "ms_detr_iou",
        "dn_detr",
        "dino",
        "ms_detr_dn",
        "ms_detr_dino",
        "ms_detr_group_detr",
    ],
)
@pytest.mark.parametrize(
    "model",
    [
        "deformable_detr",
        "deformable_detr_two_stage_refine",
        "deformable_detr_pp",
        "deta",
        "dino",
        "dab_deformable_detr",
    ],
)
def test_every_matcher_fits_every_model_or_says_why(matcher, model):
    cfg = compose(
        "data.num_classes=5",
        f"model={model}",
        f"matcher={matcher}",
        "model.detector.backbone.pretrained=false",
        "model.detector.backbone.name=resnet18",
        "model.num_queries=6",
        "model.hidden_dim=32",
        "model.nheads=2",
        "model.detector.encoder.num_layers=1",
        "model.detector.decoder.num_layers=2",
        "model.dim_feedforward=32",
        *([BLOCKS + "hybrid.num_queries=12"] if "h_detr" in matcher else []),
    )
    selection = cfg.model.detector.queries._target_
    # DN-DETR's learned anchors: one-stage (no encoder stream), but with box references to denoise
    # from.
    anchors = selection.endswith("AnchorQueries")
    one_stage = selection.endswith("LearnedQueries") or anchors
    needs_two_stage = matcher in ("deta", "ms_detr_deta", "ms_detr_iou")
    # DINOQueries always learn their content (no mixed_selection switch).
    if (
        "group_detr" in matcher
        and not one_stage
        and not cfg.model.detector.queries.get("mixed_selection", True)
    ):
        # Groups sharing two-stage proposals need learned content; switching it on silently would
        # change the model.
        with pytest.raises(Exception, match="mixed_selection=true"):
            instantiate(cfg.model.detector)
        return
    if ("h_detr" in matcher or "group_detr" in matcher) and anchors:
        # DN-DETR's learned anchors exist for the one-to-one queries only.
        with pytest.raises(Exception, match="has no anchors for them"):
            instantiate(cfg.model.detector)
        return
    if matcher in ("dn_detr", "dino", "ms_detr_dn", "ms_detr_dino") and one_stage and not anchors:
        with pytest.raises(Exception, match="needs box references: use a two-stage model"):
            instantiate(cfg.model.detector)
        return
    model_ = instantiate(cfg.model.detector)
    criterion = instantiate(cfg.matcher.criterion)
    if one_stage and needs_two_stage:
        with pytest.raises(ValueError, match="two-stage|two_stage"):
            DetectionModule(model_, criterion)
        return
    module = DetectionModule(model_, criterion)
    out = module.detect(*batch(64, 64), TARGETS)
    losses = criterion(out, TARGETS)
    total = criterion.total(losses)
    assert torch.isfinite(total)
    total.backward()
    streams = {b.stream for b in criterion.branches} - ({"enc_outputs"} if one_stage else set())
    for stream in streams:
        suffix = next(b.suffix for b in criterion.branches if b.stream == stream)
        assert f"loss_bbox{suffix}" in losses, stream


def test_a_branch_without_its_stream_is_one_sentence():
    model = tiny_detector()
    crit = SetCriterion(
        5, [Branch("main", HungarianMatcher()), Branch("hybrid_outputs", HungarianMatcher())]
    )
    with pytest.raises(
        ValueError, match="needs H-DETR's hybrid queries in model.detector.training_queries"
    ):
        DetectionModule(model, crit)


def test_inconsistent_query_blocks_are_refused():
    from msdetr.models import DeformableDETR, HybridQueries, QueryGroups

    with pytest.raises(ValueError, match="groups >= 2"):
        QueryGroups(groups=1)
    with pytest.raises(ValueError, match="num_queries >= 1"):
        HybridQueries(num_queries=0)
    with pytest.raises(ValueError, match="mixed_selection=true"):
        tiny_detector(
            TWO_STAGE,
            "model.detector.box_refine=false",
            "matcher=group_detr",
            BLOCKS + "groups.groups=2",
        )
    parts = tiny_detector()
    with pytest.raises(ValueError, match="training_queries.b and .a both write hybrid_outputs"):
        DeformableDETR(
            backbone=parts.backbone,
            encoder=parts.encoder,
            decoder=parts.decoder,
            queries=parts.queries,
            num_classes=5,
            training_queries={"a": HybridQueries(num_queries=3), "b": HybridQueries(num_queries=4)},
        )


def test_query_blocks_compose():
    """H-DETR's hybrid queries and Group DETR's groups side by side: each its own stream, every
    block invisible to the others, the one-to-one outputs those of inference."""
    torch.manual_seed(0)
    model = tiny_detector(
        TWO_STAGE,
        MIXED,
        "+parts@_global_=[h_detr_branch,group_detr_branch]",
        BLOCKS + "hybrid.num_queries=5",
        BLOCKS + "groups.groups=3",
    )
    images, mask = batch()
    out = model(images, mask)
    assert out["hybrid_outputs"]["pred_boxes"].shape == (2, 5, 4)
    assert out["group_outputs"]["pred_boxes"].shape == (2, 14, 4)
    torch.testing.assert_close(out["group_outputs"]["init_reference"][:, :7], out["init_reference"])
    model.eval()
    with torch.no_grad():
        ref = model(images, mask)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
