"""The mask head (msdetr.models.masks) and ResNet's stride-4 map, on tiny shapes."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from helpers.masks import layer_mask_losses
from msdetr.losses.masks import (
    map_points,
    mask_match_costs,
    point_sample,
    uncertain_points,
)
from msdetr.models.backbone import Backbone, FeatureBackbone
from msdetr.models.masks import MaskHead, mask_valid_ratio
from msdetr.postprocess_masks import paste_masks

HIDDEN, MASK_DIM, QUERIES = 32, 16, 5
SHAPES = ((8, 10), (4, 5), (2, 3))  # a 64 x 80 canvas at strides 8, 16, 32


def memory(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, sum(h * w for h, w in SHAPES), HIDDEN, generator=g)


def hidden_states(layers: int = 3, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, QUERIES, HIDDEN, generator=g) for _ in range(layers)]


def head(stride: int = 4, lateral_channels: int = 64) -> MaskHead:
    torch.manual_seed(0)
    return MaskHead(
        hidden_dim=HIDDEN,
        lateral_channels=lateral_channels,
        lateral_stride=stride,
        mask_dim=MASK_DIM,
        num_groups=8,
    )


@pytest.fixture(scope="module")
def backbone_maps():
    torch.manual_seed(0)
    backbone = Backbone(name="resnet18", pretrained=False, train_backbone=False).eval()
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 40:] = True
    mask[1, :, 60:] = True
    with torch.no_grad():
        plain = backbone(images, mask)
        levels, stride4 = backbone.forward_with_stride4(images, mask)
    return backbone, plain, levels, stride4, mask


def test_backbone_stride4_keeps_the_levels(backbone_maps):
    backbone, plain, levels, stride4, _ = backbone_maps
    assert backbone.stride4_channels == 64 and backbone.num_channels == [128, 256, 512]
    assert len(levels) == len(plain) == 3
    for (f, m), (f2, m2) in zip(plain, levels):
        assert torch.equal(f, f2) and torch.equal(m, m2)
    assert stride4.shape == (2, 64, 16, 20)
    assert [tuple(f.shape[-2:]) for f, _ in levels] == list(SHAPES)
    with pytest.raises(ValueError, match="lateral_stride=8"):
        FeatureBackbone().forward_with_stride4(
            torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)
        )
    assert FeatureBackbone.stride4_channels is None


@pytest.mark.parametrize("stride", [4, 8])
def test_output_shapes(backbone_maps, stride):
    _, _, levels, stride4, _ = backbone_maps
    lateral = stride4 if stride == 4 else levels[0][0]
    m = head(stride, lateral.shape[1])
    pixel = m.pixel_embedding(memory(), SHAPES, lateral)
    size = (16, 20) if stride == 4 else (8, 10)
    assert m.stride == stride and pixel.shape == (2, MASK_DIM, *size)
    masks = m(hidden_states(), pixel)
    assert len(masks) == 3 and all(x.shape == (2, QUERIES, *size) for x in masks)
    # two-stage proposals: any (B, K, C) features
    assert m.logits(torch.randn(2, 7, HIDDEN), pixel).shape == (2, 7, *size)


def test_finest_level_is_the_first_level_as_a_map():
    mem = memory()
    fine = MaskHead.finest_level(mem, SHAPES)
    assert fine.shape == (2, HIDDEN, 8, 10)
    assert torch.equal(fine[1, :, 3, 7], mem[1, 3 * 10 + 7])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="lateral_stride"):
        MaskHead(hidden_dim=32, lateral_stride=16)
    with pytest.raises(ValueError, match="num_groups"):
        MaskHead(hidden_dim=48, num_groups=32)


def test_gradients_reach_both_embeddings():
    m = head()
    mem = memory().requires_grad_()
    hidden = [h.requires_grad_() for h in hidden_states()]
    lateral = torch.randn(2, 64, 16, 20, requires_grad=True)
    pixel = m.pixel_embedding(mem, SHAPES, lateral)
    masks = m(hidden, pixel)
    gts = [torch.rand(3, 40, 60) > 0.5, torch.rand(2, 64, 80) > 0.5]
    indices = [(torch.tensor([0, 3]), torch.tensor([2, 0])), (torch.tensor([4]), torch.tensor([1]))]
    ratios = torch.tensor([[60 / 80, 40 / 64], [1.0, 1.0]])
    total = sum(
        sum(layer_mask_losses(x, gts, indices, ratios, 3.0, num_points=64).values()) for x in masks
    )
    total.backward()
    named = dict(m.named_parameters())
    for name in (
        "mask_embed.layers.0.weight",
        "mask_embed.layers.2.weight",
        "mask_features.weight",
        "lateral.0.weight",
        "output_conv.0.weight",
    ):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    for t in (mem, lateral, *hidden):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_pair_and_point_logits_equal_the_full_maps():
    m = head()
    pixel = m.pixel_embedding(memory(), SHAPES, torch.randn(2, 64, 16, 20))
    hidden = hidden_states(1)[0]
    full = m.logits(hidden, pixel)
    batch_idx, query_idx = torch.tensor([1, 0, 1]), torch.tensor([4, 2, 0])
    torch.testing.assert_close(
        m.pair_logits(hidden, pixel, batch_idx, query_idx), full[batch_idx, query_idx]
    )
    coords = torch.rand(2, 30, 2)
    points = m.point_logits(hidden, pixel, coords)
    expected = torch.stack(
        [point_sample(full[b], coords[b].expand(QUERIES, -1, -1)) for b in range(2)]
    )
    torch.testing.assert_close(points, expected, rtol=1e-4, atol=1e-5)


def test_valid_ratio_of_the_mask_map(backbone_maps):
    _, _, _, stride4, mask = backbone_maps
    ratio = mask_valid_ratio(mask, stride4.shape[-2:], 4)
    torch.testing.assert_close(ratio, torch.tensor([[1.0, 1.0], [60 / 80, 40 / 64]]))
    # A canvas that is not a multiple of the stride: the map spans 4 * ceil(66 / 4) = 68 rows.
    odd = torch.zeros(1, 66, 80, dtype=torch.bool)
    odd[:, 50:] = True
    torch.testing.assert_close(mask_valid_ratio(odd, (17, 20), 4), torch.tensor([[1.0, 50 / 68]]))


def fake_module(mode: FakeTensorMode, module: torch.nn.Module, device: str) -> torch.nn.Module:
    """The module's parameters as fakes on `device` (built for real first: nn.init works in
    place)."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with mode:
            module._apply(lambda t: mode.from_tensor(t).to(device))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    return module


def test_no_host_reads_on_a_fake_cuda_device():
    """Every tensor a fake on a fake CUDA device: a data-dependent host read (.item(), .tolist(),
    nonzero, a boolean index) would raise. The head, the losses, the costs and the paste run."""
    mode = FakeTensorMode()
    m = fake_module(mode, head(), "cuda")
    with mode:
        with pytest.raises(DataDependentOutputException):  # the mode does catch host reads
            torch.zeros(2, device="cuda").sum().item()
        mem = torch.randn(2, sum(h * w for h, w in SHAPES), HIDDEN, device="cuda")
        hidden = [torch.randn(2, QUERIES, HIDDEN, device="cuda") for _ in range(2)]
        padding = torch.zeros(2, 64, 80, dtype=torch.bool, device="cuda")
        pixel = m.pixel_embedding(mem, SHAPES, torch.randn(2, 64, 16, 20, device="cuda"))
        masks = m(hidden, pixel)
        ratios = mask_valid_ratio(padding, pixel.shape[-2:], m.stride)
        gts = [
            torch.zeros(3, 40, 60, dtype=torch.bool, device="cuda"),
            torch.zeros(2, 64, 80, dtype=torch.bool, device="cuda"),
        ]
        idx = [
            (torch.tensor([0, 3], device="cuda"), torch.tensor([2, 0], device="cuda")),
            (torch.tensor([4], device="cuda"), torch.tensor([1], device="cuda")),
        ]
        losses = layer_mask_losses(masks[-1], gts, idx, ratios, 3.0, num_points=64)
        assert losses["mask"].device.type == "cuda"
        coords = torch.rand(1, 64, 2, device="cuda")
        points = m.point_logits(hidden[-1], pixel, map_points(coords.expand(2, -1, -1), ratios))
        bce, dice = mask_match_costs(None, gts[0], ratios[0], coords=coords, pred_points=points[0])
        assert bce.shape == dice.shape == (QUERIES, 3)
        assert uncertain_points(masks[0][0], 32, valid_ratio=ratios[0]).shape == (QUERIES, 32, 2)
        kept = m.pair_logits(
            hidden[-1],
            pixel,
            torch.tensor([0, 0, 1], device="cuda"),
            torch.tensor([1, 2, 3], device="cuda"),
        )
        assert paste_masks(kept, ratios[0], (30, 40)).shape == (3, 30, 40)
