"""The Hydra configs build exactly the official models and losses; official checkpoints evaluate."""

import argparse
import json
import math

import pytest
import torch

from helpers import FIXTURES, load_fixture
from helpers.config import UNUSED_OUTPUT, compose
from helpers.parity import fixture_batch, fixture_state_dict, rel_err
from msdetr.official import build_model, load_official_state_dict, parse_flags, to_official
from msdetr.run import evaluate
from msdetr.run.build import build_module

# Fixture sizes: ResNet-18, 2 encoder / 3 decoder layers, FFN 512, 60 queries, dropout 0.
FIXTURE_SIZE = [
    "model.detector.backbone.name=resnet18",
    "model.detector.backbone.pretrained=false",
    "model.detector.encoder.num_layers=2",
    "model.detector.decoder.num_layers=3",
    "model.dim_feedforward=512",
    "model.num_queries=60",
    "model.dropout=0.0",
    "data.num_classes=91",
]


@pytest.mark.parametrize(
    "experiment, fixture",
    [
        ("deformable_detr_two_stage_refine_50ep", "deformable_detr"),
        ("ms_detr_300", "ms_detr_c"),
        ("ms_detr_pp_300", "ms_detr_c_pp"),
        ("ms_detr_a_300", "ms_detr_a"),
        ("deta_12ep", "deta"),
    ],
)
def test_experiment_config_reproduces_fixture_losses(experiment, fixture):
    fx = load_fixture(f"{fixture}.pt")
    module = build_module(compose(f"experiment={experiment}", *FIXTURE_SIZE, UNUSED_OUTPUT))
    load_official_state_dict(module, fixture_state_dict(fx))
    images, mask = fixture_batch(fx)
    module.train()
    losses = module.criterion(module.model(images, mask), fx["targets"])
    assert set(losses) == set(fx["losses"])
    for name, value in fx["losses"].items():
        assert rel_err(losses[name], value) < 2e-5, name
    assert rel_err(module.criterion.total(losses), fx["total_loss"]) < 2e-5


@pytest.mark.parametrize(
    "experiment, manifest_name, other",
    [
        ("ms_detr_pp_900", "ms_detr_pp_900", "ms_detr_300"),
        ("deta_12ep", "deta_r50", "deformable_detr_two_stage_refine_50ep"),
        ("dino_4scale_12ep", "dino_4scale_r50", "deformable_detr_pp_12ep"),
        (
            "dn_deformable_detr_50ep",
            "dn_deformable_detr_r50",
            "deformable_detr_two_stage_refine_50ep",
        ),
    ],
)
def test_official_checkpoint_evaluates_through_evaluate_py(
    tmp_path, experiment, manifest_name, other
):
    manifest = json.loads((FIXTURES / "manifests" / f"{manifest_name}.json").read_text())
    args = parse_flags(manifest["flags"])
    model = build_model(args, keys=manifest["state_dict"])
    official = to_official(model)
    assert {k: list(v.shape) for k, v in official.items()} == manifest["state_dict"]
    path = tmp_path / f"{manifest_name}.pth"
    torch.save({"model": official, "args": argparse.Namespace(**args), "epoch": 11}, path)
    small = [
        "data=synthetic",
        f"data.root={tmp_path / 'synth'}",
        "data.synthetic_train=2",
        "data.synthetic_val=2",
        "data.num_workers=0",
        "data.eval_size=96",
        "data.max_size=128",
        "data.num_classes=91",
        "model.detector.backbone.pretrained=false",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "logger=none",
        f"ckpt_path={path}",
    ]
    metrics = evaluate(compose(f"experiment={experiment}", *small, UNUSED_OUTPUT, name="evaluate"))
    assert set(metrics) >= {"AP", "AP50"} and all(
        math.isnan(v) or 0 <= v <= 1 for v in metrics.values()
    )
    # A checkpoint of another architecture is refused in one sentence, not a shape error.
    with pytest.raises(ValueError, match="does not fit the configured architecture"):
        evaluate(compose(f"experiment={other}", *small, UNUSED_OUTPUT, name="evaluate"))
