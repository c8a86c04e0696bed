"""Instance segmentation on the one detector: the mask head as a model part (parts/mask_head),
the per-branch mask losses, the Hungarian mask costs and the kept detections' masks.

The pieces themselves (the head's embeddings, the point losses against their formulas, the paste)
are tested in test_mask_head.py and test_mask_losses.py; here, how they are wired."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from helpers.config import compose
from helpers.detectors import TINY, batch, tiny_detector
from msdetr.config_schema import ConfigValidationError, validate
from msdetr.losses import Branch, SetCriterion
from msdetr.losses.masks import (
    dice_mask_loss,
    map_points,
    mask_match_costs,
    point_sample,
    sample_gt_masks,
    sigmoid_bce_mask_loss,
    uncertain_points,
    uniform_points,
)
from msdetr.matching import HungarianMatcher
from msdetr.models.backbone import FeatureBackbone
from msdetr.models.masks import embed_logits, mask_valid_ratio
from msdetr.postprocess import NMSPostProcess, TopKPostProcess
from msdetr.postprocess_masks import paste_masks

MASKS = ("+parts=mask_head", "matcher.mask_points=64")
MS_DETR = ("model=deformable_detr_pp", "matcher=ms_detr", *MASKS)


def tiny_run(*overrides: str):
    """The detector and criterion of a run with `overrides`, at the TINY sizes."""
    cfg = compose("~experiment", "model=deformable_detr", *TINY, *overrides)
    return instantiate(cfg.model.detector), instantiate(cfg.matcher.criterion)


def box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(G, 4) cxcywh boxes -> (G, h, w) bool masks filling them."""
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    cx, cy, bw, bh = boxes.unbind(1)
    inside_x = (xs[None] - cx[:, None]).abs() <= bw[:, None] / 2
    inside_y = (ys[None] - cy[:, None]).abs() <= bh[:, None] / 2
    return inside_y[:, :, None] & inside_x[:, None, :]


def targets_for(images_hw=((64, 80), (32, 40)), masks: bool = True) -> list[dict]:
    """Two GTs per image of `batch()` (the second image is 32 x 40 inside its padding)."""
    boxes = torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.65, 0.6, 0.4, 0.5]])
    out = []
    for h, w in images_hw:
        t = {"labels": torch.tensor([1, 3]), "boxes": boxes.clone()}
        if masks:
            t["masks"] = box_masks(boxes, h, w)
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# The model part


def test_a_tiny_mask_model_trains_every_stream_and_layer():
    torch.manual_seed(0)
    model, criterion = tiny_run(*MS_DETR)
    criterion.check_model(model.output_streams)
    images, mask = batch()
    out = model(images, mask, targets_for())
    # Every decoder layer of both streams carries the embeddings; the encoder stream none.
    for stream in (out, out["o2m_outputs"]):
        for layer in (*stream["aux_outputs"], stream):
            assert layer["mask_embed"].shape == (2, 7, 64)
            assert layer["mask_features"] is out["mask_features"]
    assert out["mask_features"].shape == (2, 64, 16, 20)  # 1/4 of the 64 x 80 canvas
    assert torch.allclose(out["mask_valid_ratio"], torch.tensor([[1.0, 1.0], [0.5, 0.5]]))
    assert "mask_embed" not in out["enc_outputs"]
    losses = criterion(out, targets_for())
    names = {f"loss_{t}{s}" for t in ("mask", "dice") for s in ("", "_0", "_o2m", "_0_o2m")}
    assert names <= set(losses) and not any(
        "mask" in k or "dice" in k for k in losses if "enc" in k
    )
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert criterion.weight_dict["loss_mask_0_o2m"] == criterion.weight_dict["loss_dice"] == 5.0
    criterion.total(losses).backward()
    head = dict(model.mask_head.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.values()), [
        n for n, p in head.items() if p.grad is None or p.grad.abs().sum() == 0
    ]


def test_the_mask_head_reads_the_backbones_stride4_map_and_its_channels():
    model = tiny_detector("+parts=mask_head")  # ResNet-18: layer1 has 64 channels at stride 4
    assert model.mask_head.stride == 4 and model.mask_head.lateral_channels == 64
    model = tiny_detector("+parts=mask_head", "model.detector.mask_head.lateral_stride=8")
    assert model.mask_head.lateral_channels == 128  # layer2, the first level
    model.eval()
    with torch.no_grad():
        out = model(*batch())
    assert out["mask_features"].shape[-2:] == (8, 10)


class NoStride4(FeatureBackbone):
    """A backbone of one stride-8 level and no stride-4 map (as Swin here)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 8, stride=8)
        self.num_channels, self.strides = [32], [8]

    def forward(self, images, padding_mask):
        feat = self.conv(images)
        return [(feat, padding_mask[:, ::8, ::8])]


def with_backbone(cfg, backbone: FeatureBackbone):
    """The config's detector on `backbone`; a part's refusal raised as itself."""
    try:
        return instantiate(cfg.model.detector, backbone=backbone)
    except InstantiationException as error:
        raise error.__cause__ from None


def test_a_backbone_without_a_stride4_map_is_refused_unless_lateral_stride_is_8():
    cfg = compose("~experiment", "model=deformable_detr", *TINY, *MASKS)
    with pytest.raises(ValueError, match="no stride-4 map.*set lateral_stride=8"):
        with_backbone(cfg, NoStride4())
    cfg.model.detector.mask_head.lateral_stride = 8
    model = with_backbone(cfg, NoStride4())
    assert model.mask_head.lateral_channels == 32
    model.eval()
    with torch.no_grad():
        assert model(*batch())["mask_features"].shape == (2, 64, 8, 10)


def test_the_mask_heads_other_refusals():
    with pytest.raises(ValueError, match="stride 32.*return_interm_layers"):
        tiny_detector(
            *MASKS,
            "model.detector.mask_head.lateral_stride=8",
            "model.detector.backbone.return_interm_layers=false",
        )
    with pytest.raises(ValueError, match="lateral_channels=256.*64 channels"):
        tiny_detector(*MASKS, "model.detector.mask_head.lateral_channels=256")
    with pytest.raises(ValueError, match="mask_head.hidden_dim=32"):
        tiny_detector(*MASKS, "model.detector.mask_head.hidden_dim=32")


# ---------------------------------------------------------------------------------------------
# Per-branch switches and refusals


def test_o2m_on_boxes_only_or_on_boxes_and_masks_is_one_override():
    images, mask = batch()
    for override, o2m_masks in [
        ((), True),
        (("matcher.criterion.branches.o2m.masks=false",), False),
    ]:
        torch.manual_seed(0)
        model, criterion = tiny_run(*MS_DETR, *override)
        criterion.check_model(model.output_streams)
        losses = criterion(model(images, mask), targets_for())
        assert "loss_bbox_o2m" in losses and "loss_mask" in losses
        assert ("loss_mask_o2m" in losses) == ("loss_dice_0_o2m" in losses) == o2m_masks


def test_deta_and_h_detr_supervise_masks_with_their_own_assigners_pairs():
    images, mask = batch()
    for overrides, suffix in [
        (("model=deta", *MASKS), ""),
        (
            (
                "model=deformable_detr_two_stage_refine",
                "matcher=h_detr",
                "model.detector.training_queries.hybrid.num_queries=8",
                *MASKS,
            ),
            "_one2many",
        ),
    ]:
        torch.manual_seed(0)
        model, criterion = tiny_run(*overrides)
        criterion.check_model(model.output_streams)
        losses = criterion(model(images, mask), targets_for())
        assert {f"loss_mask{suffix}", f"loss_dice_0{suffix}"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())


def test_masks_asked_of_a_model_without_a_mask_head_are_refused():
    model, criterion = tiny_run("matcher=ms_detr", "matcher.masks=true")
    with pytest.raises(ValueError, match=r"branches.main.masks=true.*\+parts=mask_head"):
        criterion.check_model(model.output_streams)


def test_masks_asked_of_the_encoder_stream_are_refused():
    model, criterion = tiny_run(
        "model=deformable_detr_pp", *MASKS, "+matcher.criterion.branches.enc.masks=true"
    )
    with pytest.raises(ValueError, match="branches.enc.masks=true.*boxes only"):
        criterion.check_model(model.output_streams)


def test_a_mask_head_without_a_branch_with_masks_is_refused():
    model, criterion = tiny_run(*MASKS, "matcher.masks=false")
    with pytest.raises(ValueError, match="no branch supervises masks"):
        criterion.check_model(model.output_streams)


def test_targets_without_masks_are_refused_in_one_sentence():
    torch.manual_seed(0)
    model, criterion = tiny_run(*MASKS)
    out = model(*batch())
    with pytest.raises(ValueError, match="no masks; set data.masks=true"):
        criterion(out, targets_for(masks=False))  # the Hungarian mask costs ask first
    criterion.branches[0].assigner.cost_mask = criterion.branches[0].assigner.cost_dice = 0.0
    with pytest.raises(ValueError, match="targets have none; set data.masks=true"):
        criterion(out, targets_for(masks=False))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.masks=false",), "branches.main.masks=true needs instance masks.*data.masks=false"),
        (("matcher.masks=false",), "mask_head is set but no branch"),
        (
            ("model.detector.mask_head=null", "data.masks=true"),
            r"branches.main.masks=true supervises masks.*mask_head is null",
        ),
    ],
)
def test_the_config_check_refuses_masks_without_their_parts(overrides, message):
    validate(compose("experiment=synthetic_cpu_mask"))
    with pytest.raises(ConfigValidationError, match=message):
        validate(compose("experiment=synthetic_cpu_mask", *overrides))


# ---------------------------------------------------------------------------------------------
# The losses and the matching on hand-made outputs


def mask_outputs(seed: int = 0, b: int = 2, q: int = 4, d: int = 3, size=(6, 8)) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(b, q, 5, generator=g),
        "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + 0.3,
        "mask_embed": torch.randn(b, q, d, generator=g),
        "mask_features": torch.randn(b, d, *size, generator=g),
        "mask_valid_ratio": torch.tensor([[1.0, 1.0], [0.75, 0.5]])[:b],
    }


def test_the_mask_terms_are_the_full_maps_losses_at_the_same_points():
    out = mask_outputs()
    targets = [targets_for()[0], targets_for(((12, 20),))[0]]
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.tensor([3]), torch.tensor([1]))]
    criterion = SetCriterion(5, [Branch("main", HungarianMatcher(), masks=True)])
    criterion.mask_num_points, criterion.mask_oversample_ratio = 30, 2.0
    torch.manual_seed(3)
    terms = criterion.mask_terms(out, targets, indices, 2.5, criterion.branches[0])
    # Written out: the full (B, Q, h, w) maps, the matched rows, the same draws of the points.
    maps = embed_logits(out["mask_embed"], out["mask_features"])
    pairs = torch.cat([maps[0, indices[0][0]], maps[1, indices[1][0]]])
    ratios = out["mask_valid_ratio"][torch.tensor([0, 0, 1])]
    torch.manual_seed(3)
    coords = uncertain_points(pairs, 30, 2.0, 0.75, valid_ratio=ratios)
    pred = point_sample(pairs, map_points(coords, ratios))
    gt = torch.cat(
        [
            point_sample(targets[0]["masks"][indices[0][1]].float(), coords[:2]),
            point_sample(targets[1]["masks"][indices[1][1]].float(), coords[2:]),
        ]
    )
    assert torch.allclose(terms["mask"], sigmoid_bce_mask_loss(pred, gt, 2.5), atol=1e-6)
    assert torch.allclose(terms["dice"], dice_mask_loss(pred, gt, 2.5), atol=1e-6)
    # Repeated targets (H-DETR's one-to-many: GT j is mask j % G) read the same masks.
    repeated = [
        {**t, "labels": t["labels"].repeat(2), "boxes": t["boxes"].repeat(2, 1)} for t in targets
    ]
    shifted = [(s, t + 2) for s, t in indices]
    torch.manual_seed(3)
    again = criterion.mask_terms(out, repeated, shifted, 2.5, criterion.branches[0])
    assert torch.equal(again["mask"], terms["mask"]) and torch.equal(again["dice"], terms["dice"])


def test_the_mask_losses_repeat_under_the_same_seed_and_vanish_without_pairs():
    out = mask_outputs()
    targets = [targets_for()[0], targets_for(((12, 20),))[0]]
    criterion = SetCriterion(
        5, [Branch("main", HungarianMatcher(cost_mask=5, cost_dice=5), masks=True)]
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(criterion(out, targets))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in ("loss_mask", "loss_dice"))
    empty = [
        {**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0], "masks": t["masks"][:0]}
        for t in targets
    ]
    embed = out["mask_embed"].clone().requires_grad_()
    losses = criterion({**out, "mask_embed": embed}, empty)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    losses["loss_mask"].backward()
    assert embed.grad is not None  # every rank runs the same backward


def test_the_hungarian_mask_costs_equal_mask_match_costs_on_the_full_maps():
    out = mask_outputs(q=5)
    targets = [targets_for()[0], targets_for(((12, 20),))[0]]
    matcher = HungarianMatcher(
        cost_class=0, cost_bbox=0, cost_giou=1, cost_mask=2, cost_dice=3, num_points=40
    )
    torch.manual_seed(11)
    costs = matcher.mask_costs(out, targets)
    maps = embed_logits(out["mask_embed"], out["mask_features"])
    torch.manual_seed(11)
    coords = uniform_points(2, 40)
    for b in range(2):
        bce, dice = mask_match_costs(
            maps[b], targets[b]["masks"], out["mask_valid_ratio"][b], coords=coords[b : b + 1]
        )
        assert torch.allclose(costs[b], 2 * bce + 3 * dice, atol=1e-5)


def test_the_mask_cost_changes_the_assignment():
    """Two queries with the same class scores and nearly the same box, two GTs sharing one box: the
    box cost prefers query 0 -> GT 0 by a hair, but query 0's mask is GT 1's (the right half) and
    query 1's GT 0's (the left half)."""
    h, w = 8, 8
    features = torch.zeros(1, 2, h, w)
    features[0, 0, :, : w // 2] = 10.0  # channel 0: the left half
    features[0, 1, :, w // 2 :] = 10.0  # channel 1: the right half
    features = features - 5.0
    out = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.8, 0.8], [0.51, 0.5, 0.8, 0.8]]]),
        "mask_embed": torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]),
        "mask_features": features,
        "mask_valid_ratio": torch.ones(1, 2),
    }
    left = torch.zeros(1, 16, 16, dtype=torch.bool)
    left[:, :, :8] = True
    target = {
        "labels": torch.tensor([0, 1]),
        "boxes": torch.tensor([[0.5, 0.5, 0.8, 0.8], [0.5, 0.5, 0.8, 0.8]]),
        "masks": torch.cat([left, ~left]),
    }
    target["boxes"][1, 0] = 0.52  # GT 1 sits a hair to the right: the boxes pair 0-0 and 1-1
    boxes_only = HungarianMatcher(num_points=200)(out, [target])[0]
    with_masks = HungarianMatcher(cost_mask=5.0, cost_dice=5.0, num_points=200)(out, [target])[0]
    assert boxes_only[1][boxes_only[0].argsort()].tolist() == [0, 1]
    assert with_masks[1][with_masks[0].argsort()].tolist() == [1, 0]
    # Without mask embeddings (the encoder stream), the same matcher matches on boxes.
    plain = {k: v for k, v in out.items() if not k.startswith("mask")}
    on_boxes = HungarianMatcher(cost_mask=5.0, cost_dice=5.0)(plain, [target])[0]
    assert on_boxes[1][on_boxes[0].argsort()].tolist() == [0, 1]


def test_the_hungarian_mask_costs_repeat_for_repeated_targets():
    out = mask_outputs(q=6)
    target = targets_for()[0]
    repeated = {
        **target,
        "labels": target["labels"].repeat(3),
        "boxes": target["boxes"].repeat(3, 1),
    }
    matcher = HungarianMatcher(cost_mask=5.0, cost_dice=5.0, num_points=30)
    torch.manual_seed(0)
    once = matcher.mask_costs({k: v[:1] for k, v in out.items()}, [target])[0]
    torch.manual_seed(0)
    thrice = matcher.mask_costs({k: v[:1] for k, v in out.items()}, [repeated])[0]
    assert thrice.shape == (6, 6) and torch.equal(thrice, once.repeat(1, 3))


def test_the_gt_sampler_equals_point_sample_of_the_float_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 7, 9, generator=g) > 0.5
    index = torch.tensor([2, 0, 0, 1])
    coords = torch.rand(4, 50, 2, generator=g) * 1.2 - 0.1  # some points outside: zero there
    expected = point_sample(masks[index].float(), coords)
    for chunk in (16, 3, 1):  # the float copies made a few rows at a time
        assert torch.allclose(sample_gt_masks(masks, index, coords, chunk), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Inference: the kept detections' masks at the original size


def test_the_post_processes_paste_the_kept_detections_masks_at_the_original_size():
    out = mask_outputs(q=4)
    sizes = torch.tensor([[30, 40], [25, 18]])
    maps = embed_logits(out["mask_embed"], out["mask_features"])
    for post in (TopKPostProcess(num_select=5), NMSPostProcess(num_select=5, iou_threshold=0.5)):
        detections = post(out, sizes)
        plain = post({k: v for k, v in out.items() if not k.startswith("mask")}, sizes)
        for b, (det, box_only) in enumerate(zip(detections, plain)):
            assert "masks" not in box_only and torch.equal(det["boxes"], box_only["boxes"])
            n, (h, w) = len(det["scores"]), sizes[b].tolist()
            assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
            # Each kept detection's mask is its query's map pasted: find the query by its box.
            for k in range(n):
                query = [
                    i
                    for i in range(4)
                    if torch.allclose(det["boxes"][k], _abs_box(out["pred_boxes"][b, i], h, w))
                ][0]
                expected = paste_masks(
                    maps[b, query : query + 1], out["mask_valid_ratio"][b], (h, w)
                )
                assert torch.equal(det["masks"][k : k + 1], expected)


def _abs_box(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    cx, cy, bw, bh = box.tolist()
    return torch.tensor(
        [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
    )


def test_a_mask_model_gives_masks_at_inference_only_for_what_it_keeps():
    torch.manual_seed(0)
    model = tiny_detector(*MASKS)
    model.eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
        detections = TopKPostProcess(num_select=6)(out, torch.tensor([[100, 120], [48, 60]]))
    assert [d["masks"].shape for d in detections] == [(6, 100, 120), (6, 48, 60)]
    ratio = mask_valid_ratio(mask, out["mask_features"].shape[-2:], 4)
    assert torch.equal(out["mask_valid_ratio"], ratio)
