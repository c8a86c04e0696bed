"""The official training loop, reproduced: each trajectory fixture (the official code training E
epochs of S steps) trained through this project's own path: `from_official`, the module's
`configure_optimizers`, a `lightning.Trainer` with the official gradient clipping, one fixture batch
per step. Per step the weighted loss, the pre-clip gradient norm and every parameter's lr and weight
decay; at the end every parameter's norm and sum. Format and tolerances:
../shared/parity/README.md."""

import math

import lightning as L
import pytest
import torch

from helpers import load_fixture
from helpers.parity import fixture_batch, fixture_state_dict
from msdetr.naming import official_names
from msdetr.official import build_from_args, from_official, official_trainer_args, parse_flags

FIXTURES = ["trajectory_deformable_detr", "trajectory_ms_detr_pp"]


class FixtureBatches:
    """The fixture's batches in order: the i-th pass (epoch i) yields batches i*S .. i*S + S-1, each
    as the module takes it, (images, padding_mask, targets)."""

    def __init__(self, fx: dict):
        self.batches, self.steps = fx["batches"], fx["steps_per_epoch"]
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        first, self.epoch = self.epoch * self.steps, self.epoch + 1
        for batch in self.batches[first : first + self.steps]:
            images, mask = fixture_batch(batch)
            yield images, mask, batch["targets"]


class Recorder(L.Callback):
    """Per step: the loss training_step returned, the gradient norm before clipping and each
    parameter's (lr, weight decay) as the optimizer applies them."""

    def __init__(self, names: dict[str, str]):
        self.names = names
        self.losses, self.grad_norms, self.hyper = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        by_id = {id(p): n for n, p in pl_module.named_parameters()}
        self.hyper.append(
            {
                self.names[by_id[id(p)]]: (g["lr"], g["weight_decay"])
                for g in optimizer.param_groups
                for p in g["params"]
            }
        )
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(torch.nn.utils.get_total_norm(grads).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.fixture(scope="module", params=FIXTURES)
def trained(request):
    fx = load_fixture(f"{request.param}.pt")
    module = from_official(fixture_state_dict(fx), fx["flags"])
    names = official_names(module)
    recorder = Recorder(names)
    trainer_args = official_trainer_args(fx["flags"])
    trainer = L.Trainer(
        **trainer_args,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=FixtureBatches(fx))
    return fx, module, names, recorder, trainer_args


def _rel(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def test_the_official_flags_set_the_loop(trained):
    fx, module, names, _, trainer_args = trained
    train = fx["train"]
    assert trainer_args["max_epochs"] == fx["epochs"]
    assert trainer_args["gradient_clip_val"] == train["clip_max_norm"]
    groups = module.param_groups
    optimization = module.configure_optimizers()
    optimizer, scheduler = optimization["optimizer"], optimization["lr_scheduler"]
    assert (groups.lr, groups.lr_backbone, optimizer.defaults["weight_decay"]) == (
        train["lr"],
        train["lr_backbone"],
        train["weight_decay"],
    )
    assert type(optimizer) is torch.optim.AdamW
    step = scheduler["scheduler"]
    assert type(step) is torch.optim.lr_scheduler.StepLR and scheduler["interval"] == "epoch"
    assert (step.step_size, step.gamma) == (train["lr_drop"], 0.1)
    # Each parameter is in the group its official name selects; every other one is frozen.
    model_names = official_names(module.model)
    groups = {model_names[n]: g for n, g in module.param_group_names().items()}
    assert groups == {name: g for g, members in fx["groups"].items() for name in members}
    frozen = {names[n] for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen == set(fx["param_norms"]) - set(groups)


def test_losses_per_step(trained):
    fx, _, _, recorder, _ = trained
    expected = [s["total_loss"] for s in fx["steps"]]
    assert len(recorder.losses) == len(expected) == fx["epochs"] * fx["steps_per_epoch"]
    for step, (actual, ref) in enumerate(zip(recorder.losses, expected)):
        assert _rel(actual, ref) < fx["tolerances"]["loss"], f"step {step}: {actual} vs {ref}"


def test_gradient_norms_per_step(trained):
    fx, _, _, recorder, _ = trained
    for step, (actual, s) in enumerate(zip(recorder.grad_norms, fx["steps"])):
        assert _rel(actual, s["grad_norm"]) < fx["tolerances"]["grad_norm"], f"step {step}"


def test_learning_rates_and_weight_decay_per_step(trained):
    fx, _, _, recorder, _ = trained
    assert len(recorder.hyper) == len(fx["steps"])
    group_of = {name: g for g, members in fx["groups"].items() for name in members}
    for step, (hyper, s) in enumerate(zip(recorder.hyper, fx["steps"])):
        assert set(hyper) == set(group_of), f"step {step}"
        for name, (lr, wd) in hyper.items():
            assert _rel(lr, s["lrs"][group_of[name]]) < fx["tolerances"]["lr"], (
                f"step {step}: {name}"
            )
            assert wd == fx["train"]["weight_decay"]


def test_final_parameter_norms(trained):
    fx, module, names, _, _ = trained
    params = {names[n]: p.detach().double() for n, p in module.named_parameters()}
    assert set(params) == set(fx["param_norms"])
    tol_norm, tol_sum = fx["tolerances"]["param_norm"], fx["tolerances"]["param_sum"]
    for name, (norm, total) in fx["param_norms"].items():
        p = params[name]
        assert _rel(p.norm().item(), norm.item()) < tol_norm, name
        assert (
            abs(p.sum().item() - total.item()) / (math.sqrt(p.numel()) * norm.item()) < tol_sum
        ), name


def test_lr_drop_is_the_official_step_lr_and_list_flags_parse():
    """`--lr_drop d` drops every d epochs (StepLR), not only at epoch d; nargs='+' flags take all
    their values."""
    args = parse_flags(
        [
            "--backbone",
            "resnet18",
            "--enc_layers",
            "1",
            "--dec_layers",
            "1",
            "--num_queries",
            "10",
            "--lr_drop",
            "2",
            "--lr_backbone_names",
            "backbone.0",
            "input_proj",
            "--lr_linear_proj_names",
            "sampling_offsets",
            "--clip_max_norm",
            "0",
        ]
    )
    assert args["lr_backbone_names"] == ["backbone.0", "input_proj"]
    assert args["lr_linear_proj_names"] == ["sampling_offsets"]
    assert official_trainer_args(args)["gradient_clip_val"] is None  # 0: no clipping, as officially
    module = build_from_args(args)
    groups = module.param_group_names()
    assert {g for n, g in groups.items() if n.startswith("input_proj.")} == {"backbone"}
    assert {g for n, g in groups.items() if "reference_points" in n} == {"default"}
    optim = module.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-6])
