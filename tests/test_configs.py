"""The Hydra configs build exactly the official models and losses; official checkpoints evaluate."""

import argparse
import dataclasses
import inspect
import json
import math

import pytest
import torch
import yaml

from helpers import FIXTURES, ROOT, load_fixture
from helpers.config import UNUSED_OUTPUT, compose
from helpers.parity import fixture_batch, fixture_state_dict, rel_err
from msdetr.__main__ import main as cli_main
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


def _described(value):
    """What an object is built of, comparably: a module's type, plain attributes, submodules and
    tensor shapes; a dataclass's or plain object's type and public attributes; containers item by
    item."""
    if isinstance(value, torch.nn.Module):
        return (
            type(value).__name__,
            {k: _described(v) for k, v in vars(value).items() if not k.startswith("_")},
            {name: _described(child) for name, child in value.named_children()},
            {name: tuple(t.shape) for name, t in value.state_dict().items() if "." not in name},
        )
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    if isinstance(value, dict):
        return {k: _described(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
        attributes = {
            k: _described(v)
            for k, v in vars(value).items()
            if not k.startswith("_") and not inspect.isroutine(v)
        }
        return type(value).__name__, attributes
    return type(value).__name__


def test_the_lightning_cli_config_builds_what_its_hydra_experiment_builds(tmp_path, monkeypatch):
    """configs/cli/synthetic.yaml (LightningCLI) is the default experiment=synthetic_cpu: the same
    detector, criterion and post-processing (structure and every setting), the same optimizer, LR
    schedule, parameter groups, seed and compile setting, the same data and training loop. A
    change to one that the other lacks fails here, so conf/ stays the one source of truth."""
    monkeypatch.chdir(tmp_path)  # the CLI's relative paths (default_root_dir, data.root)
    monkeypatch.setattr("sys.argv", ["msdetr"])
    path = ROOT / "configs" / "cli" / "synthetic.yaml"
    cli = cli_main(["--config", str(path)], run=False)
    written = yaml.safe_load(path.read_text())
    # The synthetic set's class count comes from its annotation file (4 shapes, ids 1..4) in Hydra.
    num_classes = written["data"]["num_classes"]
    cfg = compose("experiment=synthetic_cpu", f"data.num_classes={num_classes}")
    hydra = build_module(cfg)
    ours = cli.model
    for part in ("model", "criterion", "postprocess"):
        assert _described(getattr(ours, part)) == _described(getattr(hydra, part)), part
    assert ours.param_groups == hydra.param_groups
    assert ours.compile_options == hydra.compile_options is None
    assert ours.seed == hydra.seed == cfg.seed
    assert ours.hparams.eval_backend == hydra.hparams.eval_backend
    assert ours.max_consecutive_skipped_steps == hydra.max_consecutive_skipped_steps
    a, b = ours.configure_optimizers(), hydra.configure_optimizers()
    assert type(a["optimizer"]) is type(b["optimizer"])
    strip = [
        [{k: v for k, v in g.items() if k != "params"} for g in o["optimizer"].param_groups]
        for o in (a, b)
    ]
    assert strip[0] == strip[1] and a["optimizer"].defaults == b["optimizer"].defaults
    schedules = [o["lr_scheduler"] for o in (a, b)]
    assert type(schedules[0]["scheduler"]) is type(schedules[1]["scheduler"])
    assert schedules[0]["scheduler"].state_dict() == schedules[1]["scheduler"].state_dict()
    assert schedules[0]["interval"] == schedules[1]["interval"]
    # The data and the training loop (the data's root and the run directory are each tool's own).
    data = {k: v for k, v in cfg.data.items() if k not in ("_target_", "root", "num_classes")}
    assert {k: cli.config.data[k] for k in data} == data
    trainer = cli.trainer
    assert (trainer.max_epochs, trainer.check_val_every_n_epoch, trainer.log_every_n_steps) == (
        cfg.trainer.max_epochs,
        cfg.trainer.check_val_every_n_epoch,
        cfg.trainer.log_every_n_steps,
    )
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val == cfg.schedule.clip_max_norm
