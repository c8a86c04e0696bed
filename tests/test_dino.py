"""DINO's pieces as parts and options (model=dino, matcher=dino): the position encodings, the
decoder's per-layer box positions and output norm, shared heads, DINOQueries, the criterion's DINO
details, DINO's flags in from_official, the released checkpoint's keys, and the recipe
(experiment=dino_4scale_12ep) value by value against DINO's config. Parity with DINO's own code is
in test_parity.py (dino_nodn.pt, dino.pt)."""

import json
import math

import pytest
import torch

from helpers import FIXTURES, load_fixture
from helpers.config import UNUSED_OUTPUT, compose
from helpers.detectors import batch, tiny_detector
from helpers.dino_manifest import manifest
from msdetr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import DenoisingAssigner, HungarianMatcher
from msdetr.models import ContrastiveDenoisingQueries, DINOQueries, PositionEmbeddingSine
from msdetr.models.position_encoding import reference_sine_embedding
from msdetr.official import build_model, from_official, parse_flags, to_official

TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]),
    },
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
]


def test_position_encoding_temperature_and_offset():
    """DINO's PositionEmbeddingSineHW: normalised 1-based counts (no half-pixel shift), temperature
    20."""
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # the last column is padding
    pos = PositionEmbeddingSine(8, temperature=20, offset=0.0)(mask)
    x = 2 * math.pi * torch.tensor([1, 2, 3, 3]) / (3 + 1e-6)  # padding continues the last count
    freq = 20 ** (2 * (torch.arange(8) // 2) / 8)
    expected_x = torch.where(
        torch.arange(8) % 2 == 0, torch.sin(x[:, None] / freq), torch.cos(x[:, None] / freq)
    )
    torch.testing.assert_close(pos[0, 8:, 0].T, expected_x)
    shifted = PositionEmbeddingSine(8)(mask)  # Deformable-DETR's: pixel centres, temperature 10000
    assert not torch.allclose(shifted, pos)
    with pytest.raises(ValueError, match="temperature > 0"):
        PositionEmbeddingSine(8, temperature=0)


def test_reference_sine_embedding_is_y_x_w_h():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    emb = reference_sine_embedding(box, 4)
    single = [
        reference_sine_embedding(torch.tensor([[v, v, v, v]]), 4)[0, :4]
        for v in (0.2, 0.1, 0.3, 0.4)
    ]
    torch.testing.assert_close(emb[0], torch.cat(single))
    with pytest.raises(ValueError, match="points or"):
        reference_sine_embedding(torch.zeros(1, 3), 4)


def test_dino_decoder_positions_come_from_the_current_boxes_of_every_layer():
    torch.manual_seed(0)
    model = tiny_detector("model=dino")
    seen = []
    original = model.decoder.query_positions
    model.decoder.query_positions = lambda ref: seen.append(ref) or original(ref)
    out = model(*batch())
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # layer 2 embeds the refined boxes
    # The heads read the normed states: every layer's box is its shared head's delta on its
    # reference.
    assert (
        model.bbox_embed[0] is model.bbox_embed[1] and model.class_embed[0] is model.class_embed[1]
    )
    assert (
        "decoder.norm.weight" in model.state_dict()
        and "decoder.ref_point_head.layers.1.weight" in model.state_dict()
    )
    assert out["enc_outputs"]["pred_logits"].shape == (2, 7, 5)  # the selected proposals only


def test_dino_selection_ranks_by_the_best_class():
    sel = DINOQueries(num_queries=2, d_model=8, num_classes=3)
    scores = torch.tensor([[[0.0, 5.0, 0.0], [1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    assert sel.select(scores, None, None, 2, ()).tolist() == [[0, 2]]  # not by channel 0 alone
    # tiny maps: cycled
    assert sel.select(scores, None, None, 6, ()).tolist() == [[0, 2, 3, 1, 0, 2]]


def test_inconsistent_dino_parts_are_refused():
    parts = tiny_detector("model=dino")
    from msdetr.models import DeformableDecoder, DeformableDETR, TwoStageQueries

    plain = DeformableDecoder(layer=parts.decoder.layers[0], num_layers=2)
    with pytest.raises(ValueError, match="use decoder.box_query_pos=true exactly with DINOQueries"):
        DeformableDETR(
            backbone=parts.backbone,
            encoder=parts.encoder,
            decoder=plain,
            queries=parts.queries,
            num_classes=5,
            box_refine=True,
        )
    with pytest.raises(ValueError, match="share_heads shares the refining heads"):
        DeformableDETR(
            backbone=parts.backbone,
            encoder=parts.encoder,
            decoder=plain,
            queries=TwoStageQueries(num_queries=7, d_model=64),
            num_classes=5,
            box_refine=True,
            share_heads=True,
        )
    with pytest.raises(ValueError, match="scores 5 classes, the detector 9"):
        DeformableDETR(
            backbone=parts.backbone,
            encoder=parts.encoder,
            decoder=parts.decoder,
            queries=parts.queries,
            num_classes=9,
            box_refine=True,
            share_heads=True,
        )
    with pytest.raises(ValueError, match="the decoder's logit_eps must be in"):
        DeformableDecoder(layer=parts.decoder.layers[0], num_layers=2, logit_eps=0.0)
    with pytest.raises(ValueError, match="logit_eps must be in"):
        ContrastiveDenoisingQueries(logit_eps=0.7)
    block = ContrastiveDenoisingQueries(label_book=3)
    with pytest.raises(ValueError, match="label_book=3 is smaller than the 5 classes"):
        block.bind(name="dn", selection=parts.queries, num_classes=5)


def test_denoising_on_dino_has_no_positions_and_dino_sized_label_book():
    torch.manual_seed(0)
    model = tiny_detector("model=dino")
    # DINO doubles: 4 groups
    block = ContrastiveDenoisingQueries(max_positives=2, seed=0, label_book=5)
    block.bind(name="dn", selection=model.queries, num_classes=5)
    assert block.label_embed.weight.shape == (6, 64)  # DINO's label_enc: dn_labelbook_size + 1 rows
    made = block.build(TARGETS, model.queries)
    # A positive and a negative per GT (2 at most) in each of the 4 groups.
    assert made.pos is None and made.reference.shape == (2, 4 * 2 * 2, 4)


def test_dn_loss_names_put_the_suffix_first_and_giou_has_dinos_eps():
    outputs = {
        "pred_logits": torch.zeros(2, 8, 5),
        "pred_boxes": torch.full((2, 8, 4), 0.5),
        "aux_outputs": [
            {"pred_logits": torch.zeros(2, 8, 5), "pred_boxes": torch.full((2, 8, 4), 0.5)}
        ],
    }
    crit = SetCriterion(
        5, [Branch("main", DenoisingAssigner(contrastive=True), suffix="_dn", suffix_first=True)]
    )
    assert {"loss_ce_dn", "loss_ce_dn_0", "loss_giou_dn_0"} <= set(crit(outputs, TARGETS))
    a = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.01, 0.01]]))
    b = cxcywh_to_xyxy(torch.tensor([[0.505, 0.5, 0.01, 0.01]]))
    inter, union, area = 0.005 * 0.01, 1.5e-4, 0.015 * 0.01
    expected = inter / (union + 1e-6) - (area - union) / (area + 1e-6)
    torch.testing.assert_close(generalized_box_iou(a, b, 1e-6)[0, 0], torch.tensor(expected))
    torch.testing.assert_close(
        generalized_box_iou(a, b)[0, 0], torch.tensor(inter / union - (area - union) / area)
    )
    assert HungarianMatcher(giou_eps=1e-6).giou_eps == 1e-6


def test_dino_flags_parse_and_refuse_what_is_not_dino_4scale():
    args = parse_flags(["enc_layers=2", "use_dn=False", "lr=2e-4", "modelname='dino'"])
    assert (
        args["enc_layers"] == 2
        and args["use_dn"] is False
        and args["lr"] == 2e-4
        and args["num_queries"] == 900
    )
    with pytest.raises(ValueError, match="is not key=value"):
        parse_flags(["enc_layers=2", "use_dn"])
    with pytest.raises(NotImplementedError, match="two_stage_type='no' is not supported"):
        build_model(parse_flags(["two_stage_type='no'"]))
    with pytest.raises(NotImplementedError, match="pe_temperatureH and pe_temperatureW differ"):
        build_model(parse_flags(["pe_temperatureW=10"]))


def test_dino_checkpoint_round_trip_keeps_every_weight():
    fx = load_fixture("dino.pt")
    from helpers.parity import fixture_state_dict

    official = fixture_state_dict(fx)
    module = from_official(official, fx["flags"])
    back = to_official(module)
    assert set(back) == set(official)
    for name, tensor in official.items():  # aliases hold the same tensor in DINO's checkpoints too
        assert torch.equal(back[name], tensor), name
    # DINO's param_dict_type "default": the backbone at lr_backbone, every other parameter at lr.
    lrs = {group["lr"] for group in module.configure_optimizers()["optimizer"].param_groups}
    assert lrs == {1e-4, 1e-5}


def test_released_key_manifest_is_derived_from_dinos_code():
    stored = json.loads((FIXTURES / "manifests" / "dino_4scale_r50.json").read_text())
    assert stored == json.loads(json.dumps(manifest()))


def test_recipe_is_dinos_released_config_value_by_value():
    """experiment=dino_4scale_12ep against DINO's own resolved config (the fixture's `config_full`,
    its values at DINO_4scale.py but for the fixture's size overrides), and its detector against the
    key set of DINO's released R50 checkpoints."""
    fx = load_fixture("dino.pt")
    # The fixture's overrides shrank the model; DINO_4scale.py's own values for those keys:
    dino = {
        **fx["config_full"],
        "enc_layers": 6,
        "dec_layers": 6,
        "dim_feedforward": 2048,
        "num_queries": 900,
        "dropout": 0.0,
        "use_dn": True,
        "dn_number": 100,
    }
    assert set(fx["config"]) <= {
        "enc_layers",
        "dec_layers",
        "dim_feedforward",
        "num_queries",
        "dropout",
        "use_dn",
        "dn_number",
    }
    cfg = compose("experiment=dino_4scale_12ep", "model.detector.backbone.pretrained=false")
    m, d, s = cfg.model, cfg.model.detector, cfg.schedule
    crit = cfg.matcher.criterion.branches
    checks = {
        "lr": s.optim.lr,
        "lr_backbone": s.optim.lr_backbone,
        "weight_decay": s.optim.weight_decay,
        "clip_max_norm": s.clip_max_norm,
        "epochs": s.epochs,
        "batch_size": cfg.data.batch_size,
        "hidden_dim": m.hidden_dim,
        "nheads": m.nheads,
        "num_feature_levels": m.num_feature_levels,
        "dropout": m.dropout,
        "num_queries": m.num_queries,
        "num_select": m.postprocess.num_select,
        "enc_n_points": d.encoder.layer.n_points,
        "dec_n_points": d.decoder.layer.n_points,
        "pe_temperatureH": d.position_embedding.temperature,
        "pe_temperatureW": d.position_embedding.temperature,
        "set_cost_class": cfg.matcher.cost["class"],
        "set_cost_bbox": cfg.matcher.cost.bbox,
        "set_cost_giou": cfg.matcher.cost.giou,
        "cls_loss_coef": crit.main.weights.ce,
        "bbox_loss_coef": crit.main.weights.bbox,
        "giou_loss_coef": crit.main.weights.giou,
        "focal_alpha": cfg.matcher.criterion.focal_alpha,
        "dn_number": d.training_queries.dn.max_positives,
        "dn_box_noise_scale": d.training_queries.dn.box_noise,
        "dn_label_noise_ratio": d.training_queries.dn.label_noise,
        "dn_labelbook_size": d.training_queries.dn.label_book,
        "num_classes": d.num_classes,
        "dec_pred_bbox_embed_share": d.share_heads,
        "dec_pred_class_embed_share": d.share_heads,
        "backbone": d.backbone.name,
        "dilation": d.backbone.dilation,
    }
    for key, value in checks.items():
        assert value == dino[key], key
    assert (d.encoder.num_layers, d.decoder.num_layers, m.dim_feedforward) == (
        dino["enc_layers"],
        dino["dec_layers"],
        dino["dim_feedforward"],
    )
    assert s.optim.lr_drop_epochs == [dino["lr_drop"]] and dino["epochs"] == 12
    # no 0.1 group in DINO
    assert s.optim.lr_linear_proj_mult == 1.0 and dino["param_dict_type"] == "default"
    assert cfg.data.batch_size * cfg.trainer.devices == 16
    enc = crit.enc
    assert (
        enc.suffix == "_interm"
        and not enc.binary
        and enc.weights.ce * dino["interm_loss_coef"] == 1.0
    )
    assert cfg.matcher.criterion.giou_eps == cfg.matcher.assigner.giou_eps == 1e-6

    from hydra.utils import instantiate

    model = instantiate(cfg.model.detector)
    expected = json.loads((FIXTURES / "manifests" / "dino_4scale_r50.json").read_text())[
        "state_dict"
    ]
    assert {k: list(v.shape) for k, v in to_official(model).items()} == expected


@pytest.mark.parametrize("fixture", ["dino", "dino_nodn"])
def test_recipe_at_the_fixture_size_reproduces_dinos_losses(fixture):
    """The experiment config (not from_official) built at the fixture's sizes loads DINO's weights
    and
    gives DINO's losses: the configs wire the same parts, weights and names."""
    from helpers.parity import feed_fixture_denoising, fixture_batch, fixture_state_dict, rel_err
    from msdetr.official import load_official_state_dict
    from msdetr.run.build import build_module

    fx = load_fixture(f"{fixture}.pt")
    no_dn = (
        []
        if fx["config"]["use_dn"]
        else ["model.detector.training_queries.dn=null", "matcher.criterion.branches.dn=null"]
    )
    cfg = compose(
        "experiment=dino_4scale_12ep",
        "model.detector.backbone.name=resnet18",
        "model.detector.backbone.pretrained=false",
        "model.detector.encoder.num_layers=2",
        "model.detector.decoder.num_layers=3",
        "model.dim_feedforward=256",
        "model.num_queries=100",
        UNUSED_OUTPUT,
        *no_dn,
    )
    module = build_module(cfg)
    load_official_state_dict(module, fixture_state_dict(fx))
    if fx["config"]["use_dn"]:
        feed_fixture_denoising(module.model.training_queries["dn"], fx)
    images, mask = fixture_batch(fx)
    module.train()
    losses = module.criterion(module.model(images, mask, fx["targets"]), fx["targets"])
    weighted = module.criterion.weight_dict
    assert weighted == fx["weight_dict"]
    for name in weighted:
        assert rel_err(losses[name], fx["losses"][name]) < 2e-5, name
    assert rel_err(module.criterion.total(losses), fx["total_loss"]) < 2e-5


def test_dino_denoising_references_take_dinos_logit_round_trip():
    block = ContrastiveDenoisingQueries(logit_eps=1e-3)
    boxes = torch.tensor([[0.5, 0.0004, 0.2, 0.9999]])
    ref = block.as_reference(boxes)
    torch.testing.assert_close(
        ref, torch.tensor([[0.5, 1e-3 / (1e-3 + 0.9996), 0.2, 1 - 1e-3 / (1e-3 + 0.9999)]])
    )
    assert torch.equal(ContrastiveDenoisingQueries().as_reference(boxes), boxes)
