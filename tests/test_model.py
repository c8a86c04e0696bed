"""Detector behaviour beyond the fixtures: any levels/queries/classes, tiny images, options,
errors."""

import pytest
import torch

from helpers.detectors import batch, tiny_detector
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import HungarianMatcher
from msdetr.models import DeformableDETR, TwoStageQueries
from msdetr.postprocess import TopKPostProcess

TWO_STAGE = "model=deformable_detr_two_stage_refine"
MIXED = "model.detector.queries.mixed_selection=true"
LAYER = "model.detector.decoder.layer."  # the decoder layer's options: o2m_tap, aux_ffn, ...
BLOCKS = "model.detector.training_queries."


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.detector.box_refine=true",),
        (TWO_STAGE,),
        (TWO_STAGE, "model.detector.box_refine=false"),
        ("model=deformable_detr_pp",),  # + mixed selection, look forward twice
        (TWO_STAGE, "model.num_feature_levels=5", "model.detector.queries.pix_trans=true"),
        ("model.num_feature_levels=3",),
        (TWO_STAGE, "matcher=ms_detr"),  # cross_attn_first, o2m_tap=cross_attn, aux_ffn
        (TWO_STAGE, "matcher=ms_detr_a"),  # o2m_tap=output, o2m_class_heads
        (TWO_STAGE, "matcher=ms_detr_d"),  # o2m_tap=self_attn
        ("model=dino",),
        ("model=dino", "matcher=ms_detr"),
        (
            "model=dino",
            "+parts@_global_=[h_detr_branch,group_detr_branch]",
            BLOCKS + "hybrid.num_queries=3",
            BLOCKS + "groups.groups=2",
        ),
    ],
)
def test_variants_forward_backward(overrides):
    model = tiny_detector(*overrides)
    images, mask = batch()
    out = model(images, mask)
    assert out["pred_logits"].shape == (2, 7, 5) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    if isinstance(model.queries, TwoStageQueries):
        assert out["enc_outputs"]["pred_logits"].shape[1] == out["enc_outputs"]["anchors"].shape[1]
    if model.decoder.o2m_tap is not None:
        assert out["o2m_outputs"]["pred_logits"].shape == (2, 7, 5)
        model.eval()
        assert "o2m_outputs" not in model(images, mask)  # never computed at inference
        model.train()
    sum(v.float().sum() for v in out["pred_boxes"]).backward()


def test_tiny_image_fewer_tokens_than_queries():
    # 32x32 gives 16+4+1+1 = 22 tokens over four levels, fewer than 50 queries: no crash.
    model = tiny_detector(TWO_STAGE, "model.num_queries=50")
    out = model(*batch(32, 32))
    assert out["pred_boxes"].shape == (2, 50, 4)
    assert torch.isfinite(out["pred_logits"]).all()


def test_criterion_handles_images_without_boxes():
    model = tiny_detector(TWO_STAGE)
    out = model(*batch())
    matcher = HungarianMatcher()
    crit = SetCriterion(
        5,
        [
            Branch("main", matcher),
            Branch("enc_outputs", matcher, suffix="_enc", aux=False, binary=True),
        ],
    )
    targets = [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]),
        },
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    losses = crit(out, targets)
    total = crit.total(losses)
    assert torch.isfinite(total)
    total.backward()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(model(*batch()), empty)
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0


def test_matcher_rejects_nonfinite_costs():
    outputs = {
        "pred_logits": torch.full((1, 3, 2), float("nan")),
        "pred_boxes": torch.rand(1, 3, 4),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        HungarianMatcher()(outputs, targets)


def test_matcher_is_optimal_on_a_toy_problem():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.3, 0.3]]])
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": boxes}
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]),
        }
    ]
    ((rows, cols),) = HungarianMatcher()(outputs, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_criterion_names_a_missing_stream():
    model = tiny_detector()  # one-stage: no encoder outputs
    crit = SetCriterion(5, [Branch("enc_outputs", HungarianMatcher(), suffix="_enc", binary=True)])
    with pytest.raises(KeyError, match="needs a two-stage model"):
        crit(
            model(*batch()),
            [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2,
        )


def test_postprocess_scales_to_original_size():
    logits = torch.full((1, 2, 3), -10.0)
    logits[0, 1, 2] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]]])
    det = TopKPostProcess(num_select=2)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )[0]
    assert det["labels"][0] == 2
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            ("model.detector.decoder.look_forward_twice=true",),
            "look_forward_twice needs box_refine",
        ),
        ((LAYER + "o2m_tap=nowhere",), "unknown o2m_tap"),
        ((LAYER + "aux_ffn=true",), "aux_ffn .* set o2m_tap"),
        (("model.detector.o2m_class_heads=true",), "o2m_class_heads needs a one-to-many stream"),
        (("model.num_feature_levels=2",), "fewer than the backbone's 3 outputs"),
        (
            (
                TWO_STAGE,
                "model.detector.box_refine=false",
                "matcher=group_detr",
                BLOCKS + "groups.groups=3",
            ),
            "mixed_selection=true",
        ),
    ],
)
def test_inconsistent_options_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_detector(*bad)


def test_parts_of_other_widths_are_refused():
    from msdetr.models import LearnedQueries

    model = tiny_detector()
    with pytest.raises(ValueError, match="the parts disagree.*queries d_model=32"):
        DeformableDETR(
            backbone=model.backbone,
            encoder=model.encoder,
            decoder=model.decoder,
            queries=LearnedQueries(num_queries=7, d_model=32),
        )


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        (
            TWO_STAGE,
            MIXED,
            LAYER + "o2m_tap=cross_attn",
            "matcher=h_detr",
            BLOCKS + "hybrid.num_queries=4",
        ),
        (
            TWO_STAGE,
            MIXED,
            "matcher=group_detr",
            BLOCKS + "groups.groups=2",
            LAYER + "o2m_tap=output",
        ),
        (
            "model=dino",
            LAYER + "o2m_tap=cross_attn",
            "matcher=h_detr",
            BLOCKS + "hybrid.num_queries=4",
        ),
    ],
)
def test_output_streams_are_what_a_training_forward_returns(overrides):
    """`output_streams` (what matchers are checked against) is derived from the parts, and names
    exactly the DetectorOutput keys a training forward returns."""
    from typing import get_type_hints

    from msdetr.models import DetectorOutput

    model = tiny_detector(*overrides)
    out = model(*batch())
    declared = get_type_hints(DetectorOutput)
    assert set(out) <= set(declared)
    streams = set(model.output_streams) - {"main"}
    assert streams == {k for k in out if k.endswith("_outputs") and k != "aux_outputs"}
    assert {"pred_logits", "pred_boxes", "aux_outputs", "init_reference"} <= set(out)


def test_state_dict_names_convert_to_the_official_layout_and_back():
    from msdetr.naming import from_official_name, to_official_name

    model = tiny_detector(
        TWO_STAGE,
        MIXED,
        "model.detector.queries.pix_trans=true",
        LAYER + "o2m_tap=cross_attn",
        LAYER + "aux_ffn=true",
    )
    names = list(model.state_dict())
    official = [to_official_name(n) for n in names]
    assert {
        "transformer.level_embed",
        "transformer.enc_output.weight",
        "transformer.pos_trans_norm.bias",
        "transformer.pix_trans.weight",
        "query_embed.weight",
        "transformer.encoder.layers.0.linear1.weight",
        "transformer.decoder.layers.0.linear3.weight",
    } <= set(official)
    assert [from_official_name(n) for n in official] == names
