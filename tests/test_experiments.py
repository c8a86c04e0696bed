"""Every released recipe (conf/experiment/*.yaml, found by glob: a new one is tested without being
listed here) composes as train.py composes it, validates, builds its module and datamodule with its
architecture as released, and takes one training step and one evaluation on a tiny synthetic batch.

Only what would need downloads or files is overridden: random backbone weights, and the synthetic
data in place of COCO (with the recipe's class count). Nothing here reads the detector's size keys
(`model.detector.*`): the query count is read from the outputs and checked against whatever key of
the model config is named `num_queries` and against the count a file name states (`ms_detr_pp_900`).
"""

import re

import pytest
import torch
from omegaconf import OmegaConf

from helpers import CONF
from helpers.config import compose
from msdetr.config_schema import validate
from msdetr.run.build import build_datamodule, build_module

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# The recipes released when this test was written; more may come, none may silently go.
RELEASED = {
    "deformable_detr_pp_12ep",
    "deformable_detr_two_stage_refine_50ep",
    "deta_12ep",
    "deta_24ep",
    "deta_swin_large_24ep",
    "h_detr_pp_12ep",
    "ms_detr_300",
    "ms_detr_a_300",
    "ms_detr_pp_300",
    "ms_detr_pp_900",
    "synthetic_cpu",
    "deta_improved_baseline_50ep",
    "deta_swin_large_o365_24ep",
    "dino_4scale_12ep",
    "ms_detr_dino_12ep",
    "dn_deformable_detr_50ep",
    "deformable_detr_pp_mask_12ep",
    "ms_detr_pp_mask_12ep",
    "synthetic_cpu_mask",
}
# Over 10 s each on 2 CPU cores (Swin-L: ~200M parameters built and run on the CPU).
SLOW = {"deta_swin_large_24ep", "deta_swin_large_o365_24ep"}
NO_DOWNLOADS = ["model.detector.backbone.pretrained=false"]
# One 64 x 64 image whose lower right part is padding (the image itself is 48 x 40), with two boxes
# (cxcywh, relative to the image): one image keeps the H-DETR (1800 queries) and Swin-L steps cheap.
H, W, IMAGE_H, IMAGE_W = 64, 64, 48, 40
TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5], [0.3, 0.3, 0.2, 0.2]]),
    }
]
ORIG_SIZES = torch.tensor([[IMAGE_H, IMAGE_W]])


def with_masks(targets: list[dict]) -> list[dict]:
    """The targets with the instance masks of a recipe with data.masks=true: each box filled, at
    the image's unpadded size (as the synthetic data's masks come)."""
    ys = (torch.arange(IMAGE_H) + 0.5) / IMAGE_H
    xs = (torch.arange(IMAGE_W) + 0.5) / IMAGE_W
    out = []
    for t in targets:
        cx, cy, w, h = t["boxes"].unbind(1)
        inside_x = (xs[None] - cx[:, None]).abs() <= w[:, None] / 2
        inside_y = (ys[None] - cy[:, None]).abs() <= h[:, None] / 2
        out.append({**t, "masks": inside_y[:, :, None] & inside_x[:, None, :]})
    return out


def tiny_batch():
    images = torch.zeros(1, 3, H, W)
    images[:, :, :IMAGE_H, :IMAGE_W] = torch.randn(1, 3, IMAGE_H, IMAGE_W)
    mask = torch.ones(1, H, W, dtype=torch.bool)
    mask[:, :IMAGE_H, :IMAGE_W] = False
    return images, mask


def values_of(node, key: str) -> list:
    """Every value of a key named `key`, anywhere below `node` (a plain container)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == key]
        return found + [x for v in node.values() for x in values_of(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in values_of(v, key)]
    return []


def streams_of(outputs: dict) -> set[str]:
    """The supervisable streams of a forward: `main` (the top-level predictions) and every
    sub-dict of predictions (`enc_outputs`, `o2m_outputs`, `hybrid_outputs`, ...)."""
    return {"main"} | {k for k, v in outputs.items() if isinstance(v, dict) and "pred_logits" in v}


def test_the_glob_finds_every_released_experiment():
    assert len(EXPERIMENTS) >= len(RELEASED) == 19
    assert RELEASED <= set(EXPERIMENTS), f"missing: {sorted(RELEASED - set(EXPERIMENTS))}"


@pytest.mark.parametrize(
    "experiment",
    [pytest.param(e, id=e, marks=[pytest.mark.slow] if e in SLOW else []) for e in EXPERIMENTS],
)
def test_experiment_builds_and_takes_a_training_step(experiment, tmp_path):
    # The recipe as released (COCO, its trainer) validates as train.py validates it.
    released = compose(f"experiment={experiment}", *NO_DOWNLOADS)
    validate(released)
    num_classes = released.data.get("num_classes")
    # The same recipe on the synthetic data (no files needed; data.num_classes: null reads the
    # synthetic annotation files, two images each, written under tmp_path).
    cfg = compose(
        f"experiment={experiment}",
        *NO_DOWNLOADS,
        "data=synthetic",
        f"data.num_classes={'null' if num_classes is None else num_classes}",
        f"paths.data_root={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "data.synthetic_train=2",
        "data.synthetic_val=2",
        "data.num_workers=0",
    )
    validate(cfg)
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    classes = dm.num_classes
    assert num_classes is None or classes == num_classes

    # What the name claims: `_12ep` trains 12 epochs, every lr drop inside them; `_900` has 900
    # one-to-one queries.
    epochs = re.search(r"_(\d+)ep(?:_|$)", experiment)
    if epochs:
        assert cfg.schedule.epochs == cfg.trainer.max_epochs == int(epochs.group(1))
    optimization = module.configure_optimizers()
    scheduler = optimization["lr_scheduler"]["scheduler"]
    drops = sorted(getattr(scheduler, "milestones", {}) or ())
    assert all(0 < d < cfg.schedule.epochs for d in drops), (drops, cfg.schedule.epochs)
    named_queries = re.search(r"_(\d+)$", experiment)

    # One training step: forward, every branch's loss finite, backward, every gradient finite.
    images, mask = tiny_batch()
    targets = with_masks(TARGETS) if cfg.data.get("masks") else TARGETS
    module.train()
    # the targets reach query blocks built from them (denoising)
    outputs = module.detect(images, mask, targets)
    criterion = module.criterion
    losses = criterion(outputs, targets)
    total = criterion.total(losses)
    assert torch.isfinite(total) and total > 0
    assert all(torch.isfinite(v).all() for v in losses.values()), [
        k for k, v in losses.items() if not torch.isfinite(v).all()
    ]
    # Every stream the training forward produces is supervised, every required branch finds its
    # stream, and each layer it assigns on holds the boxes its assigner matches against (DETA's IoU
    # assigners: the proposals, the anchors; its decoder branch assigns once, on the last layer).
    produced = streams_of(outputs)
    branches = list(criterion.branches)
    assert produced <= {b.stream for b in branches}, (
        "streams the recipe computes but never supervises"
    )
    assert {b.stream for b in branches if getattr(b, "required", True)} <= produced
    if hasattr(module.model, "output_streams"):
        assert set(module.model.output_streams) == produced
    for branch in (b for b in branches if b.stream in produced):
        assert f"loss_bbox{branch.suffix}" in losses, branch.stream
        # a branch with masks has its mask terms (the recipes with a mask head: data.masks=true)
        assert (f"loss_mask{branch.suffix}" in losses) == bool(getattr(branch, "masks", False))
        stream = outputs if branch.stream == "main" else outputs[branch.stream]
        box_key = branch.assigner.box_key
        assigned = (
            [stream]
            if getattr(branch, "assign_once", False)
            else [*stream.get("aux_outputs", []), stream]
        )
        for layer in assigned:
            assert {"pred_logits", "pred_boxes", box_key} <= set(layer), (
                branch.stream,
                box_key,
                sorted(layer),
            )
    total.backward()
    params = dict(module.model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert trainable
    assert not [n for n, p in trainable.items() if p.grad is None], (
        "parameters left out of the training step"
    )
    assert not [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()], (
        "non-finite gradients"
    )
    # Each optimizer group (backbone, linear projections, the rest) is reached by the loss.
    for group in optimization["optimizer"].param_groups:
        assert any(p.grad.abs().max() > 0 for p in group["params"]), group.get("name")

    # One evaluation: the one-to-one queries only, post-processed into detections.
    num_queries = outputs["pred_logits"].shape[1]
    assert outputs["pred_logits"].shape == (1, num_queries, classes)
    assert outputs["pred_boxes"].shape == (1, num_queries, 4)
    configured = values_of(OmegaConf.to_container(cfg.model, resolve=True), "num_queries")
    assert not configured or num_queries in configured, (num_queries, configured)
    if named_queries:
        assert num_queries == int(named_queries.group(1))
    module.eval()
    with torch.no_grad():
        evaluated = module(images, mask)
        detections = module.postprocess(evaluated, ORIG_SIZES)
    assert evaluated["pred_logits"].shape == (1, num_queries, classes)
    assert streams_of(evaluated) <= streams_of(outputs)
    num_select = module.postprocess.num_select
    assert num_select <= num_queries * classes
    assert isinstance(detections, list) and len(detections) == 1
    for det, (h, w) in zip(detections, ORIG_SIZES.tolist()):
        masks = getattr(module.model, "mask_head", None) is not None
        assert set(det) == {"scores", "labels", "boxes"} | ({"masks"} if masks else set())
        n = len(det["scores"])
        if masks:  # the kept detections' masks, at the original image size
            assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
        assert 0 < n <= num_select
        assert det["labels"].shape == (n,) and det["boxes"].shape == (n, 4)
        assert not det["labels"].is_floating_point()
        assert ((det["labels"] >= 0) & (det["labels"] < classes)).all()
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all(), "detections not ranked by score"
        boxes = det["boxes"]
        assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        # Scaled to the image's own size: box centres inside it.
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        assert ((cx >= 0) & (cx <= w) & (cy >= 0) & (cy <= h)).all()
