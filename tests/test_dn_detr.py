"""DN-Deformable-DETR's pieces as parts and options (model=dab_deformable_detr, matcher=dn_detr):
the learned anchor selection with the indicator feature, the decoder's DAB query_scale, the
indicator and label book of the denoising block, DN-DETR's flags in from_official, its released
checkpoint's keys, and the recipe (experiment=dn_deformable_detr_50ep) value by value against
DN-DETR's main.py. Parity with DN-DETR's own code is in test_parity.py (dn_deformable_detr.pt)."""

import json

import pytest
import torch

from helpers import FIXTURES, load_fixture
from helpers.config import UNUSED_OUTPUT, compose
from helpers.detectors import batch, tiny_detector
from helpers.dn_detr_manifest import FLAGS, manifest
from msdetr.models import AnchorQueries, DeformableDecoder, DenoisingQueries, HybridQueries
from msdetr.official import build_model, from_official, parse_flags, to_official

TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.0, 0.3, 0.1, 0.1]]),
    },
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
]


def test_anchor_queries_are_learned_content_with_a_zero_indicator_and_learned_boxes():
    sel = AnchorQueries(num_queries=5, d_model=8, indicator=True)
    assert sel.tgt_embed.weight.shape == (5, 7) and sel.refpoint_embed.weight.shape == (5, 4)
    assert (
        not sel.gives_positions
        and sel.positions(torch.zeros(1, 5, 4)) is None
        and not sel.proposal_references
    )
    made = sel(torch.zeros(2, 11, 8), None)
    assert made.pos is None and made.outputs == {}
    torch.testing.assert_close(made.tgt[1, :, :7], sel.tgt_embed.weight)
    assert torch.equal(made.tgt[..., 7], torch.zeros(2, 5))
    torch.testing.assert_close(made.reference[0], sel.refpoint_embed.weight.sigmoid())
    plain = AnchorQueries(num_queries=5, d_model=8)
    assert plain(torch.zeros(1, 11, 8), None).tgt.shape == (1, 5, 8)
    with pytest.raises(
        ValueError,
        match=r"hybrid \(HybridQueries\) takes its queries from the query selection, "
        "and AnchorQueries has no anchors for them",
    ):
        HybridQueries(num_queries=3).bind(name="hybrid", selection=sel, num_classes=5)


def test_query_scale_scales_every_layer_after_the_first_by_its_input():
    torch.manual_seed(0)
    model = tiny_detector("model=dab_deformable_detr", "model.detector.decoder.num_layers=3")
    raw, scales = [], []
    model.decoder.query_scale.register_forward_hook(lambda m, i, o: scales.append(o))
    original = model.decoder.query_positions
    model.decoder.query_positions = lambda ref: raw.append(original(ref)) or raw[-1]
    positions = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda m, args: positions.append(args[1]) and None)
    model(*batch())
    assert len(raw) == 3 and len(scales) == 2  # the first layer's positions are not scaled
    torch.testing.assert_close(positions[0], raw[0])
    for lid in (1, 2):
        torch.testing.assert_close(positions[lid], scales[lid - 1] * raw[lid])
    assert "decoder.norm.weight" not in model.state_dict()  # DAB has no decoder output norm
    assert model.bbox_embed[0] is not model.bbox_embed[1]  # a box head per layer
    with pytest.raises(ValueError, match="set box_query_pos=true as well"):
        DeformableDecoder(layer=model.decoder.layers[0], num_layers=2, query_scale=True)


def test_denoising_indicator_and_label_book():
    torch.manual_seed(0)
    model = tiny_detector("model=dab_deformable_detr")
    block = DenoisingQueries(groups=2, seed=0, label_book=5, logit_eps=1e-3, indicator=True)
    block.bind(name="dn", selection=model.queries, num_classes=5)
    # DN-DETR's label_enc: (num_classes + 1, hidden - 1)
    assert block.label_embed.weight.shape == (6, 63)
    made = block.build(TARGETS, model.queries)
    assert (
        made.pos is None and made.tgt.shape == (2, 2 * 2, 64) and made.reference.shape == (2, 4, 4)
    )
    # Real queries end in a 1; image 1's padding queries (its second slot of each group) are all
    # zero, with the box of logit 0.
    real = torch.tensor([[True, True, True, True], [True, False, True, False]])
    assert torch.equal(made.tgt[..., -1], real.float())
    assert torch.equal(made.tgt[~real], torch.zeros(2, 64))
    assert torch.equal(made.reference[~real], torch.full((2, 4), 0.5))
    # A coordinate at 0 (GT 0's centre, clamped) starts at DN-DETR's inverse_sigmoid clamp: log(1e-3
    # / 1).
    assert (
        made.reference.min() >= 1e-3 / (1 + 1e-3) - 1e-9
        and made.reference.max() <= 1 - 1e-3 / (1 + 1e-3) + 1e-9
    )
    with pytest.raises(ValueError, match="label_book=3 is smaller than the 5 classes"):
        DenoisingQueries(label_book=3).bind(name="dn", selection=model.queries, num_classes=5)


def test_denoising_on_learned_anchors_trains():
    torch.manual_seed(0)
    model = tiny_detector(
        "experiment=dn_deformable_detr_50ep", "model.detector.training_queries.dn.groups=2"
    )
    out = model(*batch(), TARGETS)
    assert out["dn_outputs"]["pred_boxes"].shape == (2, 2 * 2, 4) and "enc_outputs" not in out
    assert set(model.output_streams) == {"main", "dn_outputs"}
    model.eval()
    assert "dn_outputs" not in model(*batch())


def test_dn_detr_flags_parse_and_refuse_what_is_not_released():
    args = parse_flags(FLAGS)
    assert (
        args["modelname"] == "dn_dab_deformable_detr"
        and args["use_dn"] is True
        and args["lr"] == 1e-4
    )
    assert (
        args["num_queries"],
        args["dim_feedforward"],
        args["dropout"],
        args["cls_loss_coef"],
    ) == (300, 2048, 0.0, 1)
    assert parse_flags({"modelname": "dn_dab_deformable_detr", "scalar": 3})["scalar"] == 3
    with pytest.raises(NotImplementedError, match="--num_patterns 3 is not supported"):
        build_model(parse_flags(["-m", "dn_dab_deformable_detr", "--num_patterns", "3"]))
    with pytest.raises(NotImplementedError, match="--two_stage True is not supported"):
        build_model(parse_flags(["--modelname", "dn_dab_deformable_detr", "--two_stage"]))


def test_released_key_manifest_is_derived_from_dn_detrs_code():
    stored = json.loads((FIXTURES / "manifests" / "dn_deformable_detr_r50.json").read_text())
    assert stored == json.loads(json.dumps(manifest()))


def test_from_official_builds_dn_detrs_module_and_loads_its_checkpoint():
    expected = manifest()["state_dict"]
    values = {k: torch.full(v, float(i)) for i, (k, v) in enumerate(expected.items())}
    module = from_official(values, FLAGS)
    back = to_official(module)
    assert set(back) == set(values)
    for name, tensor in values.items():
        # the alias: bbox_embed.i wins, as in DN-DETR
        if not name.startswith("transformer.decoder.bbox_embed."):
            assert torch.equal(back[name], tensor), name
    main, dn = module.criterion.branches
    assert main.weights == dn.weights == {"ce": 1, "bbox": 5, "giou": 2} and main.aux and dn.aux
    assert (dn.stream, dn.suffix, dn.assigner.padding, dn.assigner.parts) == (
        "dn_outputs",
        "_dn",
        "ignore",
        1,
    )
    # DN-DETR's util/box_ops, as DINO's
    assert module.criterion.giou_eps == main.assigner.giou_eps == 1e-6
    assert module.postprocess.num_select == 100
    # DN-DETR's optimiser: the backbone at lr_backbone, everything else at lr (no linear-projection
    # group).
    assert {g["lr"] for g in module.configure_optimizers()["optimizer"].param_groups} == {
        1e-4,
        1e-5,
    }
    assert (
        module.model.position_embedding.temperature == 10000
        and module.model.position_embedding.offset == 0.5
    )
    without_dn = from_official(
        {k: v for k, v in values.items()}, [f for f in FLAGS if f != "--use_dn"]
    )
    # label_enc is dropped, as DINO's with use_dn=False
    assert not without_dn.model.training_queries


def test_recipe_is_dn_detrs_released_command_value_by_value():
    """experiment=dn_deformable_detr_50ep against DN-DETR's main.py defaults with the README's
    command, and its detector against the key set of the released checkpoint."""
    dn = parse_flags(FLAGS)
    cfg = compose("experiment=dn_deformable_detr_50ep", "model.detector.backbone.pretrained=false")
    m, d, s = cfg.model, cfg.model.detector, cfg.schedule
    crit = cfg.matcher.criterion.branches
    block = d.training_queries.dn
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
        "dim_feedforward": m.dim_feedforward,
        "enc_layers": d.encoder.num_layers,
        "dec_layers": d.decoder.num_layers,
        "enc_n_points": d.encoder.layer.n_points,
        "dec_n_points": d.decoder.layer.n_points,
        "set_cost_class": cfg.matcher.cost["class"],
        "set_cost_bbox": cfg.matcher.cost.bbox,
        "set_cost_giou": cfg.matcher.cost.giou,
        "cls_loss_coef": crit.main.weights.ce,
        "bbox_loss_coef": crit.main.weights.bbox,
        "giou_loss_coef": crit.main.weights.giou,
        "focal_alpha": cfg.matcher.criterion.focal_alpha,
        "scalar": block.groups,
        "label_noise_scale": block.label_noise,
        "box_noise_scale": block.box_noise,
        "backbone": d.backbone.name,
        "dilation": d.backbone.dilation,
    }
    for key, value in checks.items():
        assert value == dn[key], key
    assert s.optim.lr_drop_epochs == [dn["lr_drop"]] == [40]
    # two groups in DN-DETR's main.py: backbone and the rest
    assert s.optim.lr_linear_proj_mult == 1.0
    assert cfg.data.batch_size * cfg.trainer.devices == 16 and cfg.trainer.get("num_nodes", 1) == 1
    assert dict(crit.dn.weights) == {
        "ce": dn["cls_loss_coef"],
        "bbox": dn["bbox_loss_coef"],
        "giou": dn["giou_loss_coef"],
    }
    assert crit.dn.assigner.padding == "ignore" and not crit.dn.assigner.contrastive
    assert block.label_book == d.num_classes == 91 and block.indicator and block.logit_eps == 1e-3
    assert (
        d.queries.indicator
        and d.decoder.query_scale
        and d.decoder.box_query_pos
        and not d.decoder.norm
    )
    assert d.box_refine and not d.share_heads and d.position_embedding is None  # temperature 10000
    assert m.postprocess.num_select == 100 and d.decoder.logit_eps == 1e-3
    assert cfg.matcher.criterion.giou_eps == cfg.matcher.assigner.giou_eps == 1e-6

    from hydra.utils import instantiate

    model = instantiate(cfg.model.detector)
    expected = json.loads((FIXTURES / "manifests" / "dn_deformable_detr_r50.json").read_text())[
        "state_dict"
    ]
    assert {k: list(v.shape) for k, v in to_official(model).items()} == expected


def test_recipe_at_the_fixture_size_reproduces_dn_detrs_losses():
    """The experiment config (not from_official) built at the fixture's sizes loads DN-DETR's
    weights and gives DN-DETR's losses (tests/fixtures/dn_deformable_detr.pt): the configs wire the
    same parts, weights and names."""
    from helpers.parity import (
        dn_detr_loss_name,
        feed_dn_detr_denoising,
        fixture_batch,
        fixture_state_dict,
        rel_err,
    )
    from msdetr.official import load_official_state_dict
    from msdetr.run.build import build_module

    fx = load_fixture("dn_deformable_detr.pt")
    cfg = compose(
        "experiment=dn_deformable_detr_50ep",
        "model.detector.backbone.name=resnet18",
        "model.detector.backbone.pretrained=false",
        "model.detector.encoder.num_layers=2",
        "model.detector.decoder.num_layers=3",
        "model.dim_feedforward=256",
        "model.num_queries=30",
        UNUSED_OUTPUT,
    )
    module = build_module(cfg)
    load_official_state_dict(module, fixture_state_dict(fx))
    feed_dn_detr_denoising(module.model.training_queries["dn"], fx)
    images, mask = fixture_batch(fx)
    module.train()
    losses = module.criterion(module.model(images, mask, fx["targets"]), fx["targets"])
    weighted = {k: w for k, w in fx["weight_dict"].items() if not k.endswith("_enc")}
    assert module.criterion.weight_dict == {dn_detr_loss_name(k): w for k, w in weighted.items()}
    for name in weighted:
        assert rel_err(losses[dn_detr_loss_name(name)], fx["losses"][name]) < 2e-5, name
    assert rel_err(module.criterion.total(losses), fx["total_loss"]) < 2e-5
