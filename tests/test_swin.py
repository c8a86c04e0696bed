"""The timm Swin backbone: any image size, local weights in Microsoft's format, DETA's checkpoint
names."""

import pytest
import torch

pytest.importorskip("timm")

from helpers.detectors import batch, tiny_detector  # noqa: E402
from msdetr.lit import DetectionModule  # noqa: E402
from msdetr.losses import Branch, SetCriterion  # noqa: E402
from msdetr.matching import HungarianMatcher  # noqa: E402
from msdetr.models import SwinBackbone  # noqa: E402
from msdetr.models.swin import swin_timm_to_official  # noqa: E402
from msdetr.official import load_official_state_dict, to_official  # noqa: E402

TINY = "swin_tiny_patch4_window7_224"
# DETA's detector on this Swin (the backbone group's config: random init, no drop path, no
# activation checkpointing).
DETA_SWIN = (
    "model=deta",
    "backbone=swin_large",
    f"model.detector.backbone.name={TINY}",
    "model.detector.backbone.drop_path_rate=0.0",
    "model.detector.backbone.checkpointing=false",
)


def test_swin_maps_any_image_size():
    torch.manual_seed(0)
    backbone = SwinBackbone(name=TINY, drop_path_rate=0.0)
    assert backbone.num_channels == [192, 384, 768] and backbone.strides == [8, 16, 32]
    images, mask = batch(70, 90)  # neither a multiple of the patch size nor of a window
    feats = backbone(images, mask)
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(9, 12), (5, 6), (3, 3)]
    assert all(m.shape == (2, *f.shape[-2:]) for f, m in feats)
    assert feats[0][1][1, -1, -1] and not feats[0][1][0].any()


def _microsoft_checkpoint(tmp_path):
    """A Swin checkpoint as Microsoft releases them: {'model': ...}, merges at the end of each
        stage,
    attention buffers included, a classifier head."""
    import timm

    reference = timm.create_model(TINY, pretrained=False, num_classes=1000)
    state = {swin_timm_to_official(k): v for k, v in reference.state_dict().items()}
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)
    return reference, path


def test_swin_loads_local_microsoft_weights(tmp_path):
    reference, path = _microsoft_checkpoint(tmp_path)
    backbone = SwinBackbone(name=TINY, pretrained=str(path))
    mine = backbone.body.state_dict()
    for name, tensor in reference.state_dict().items():
        if not name.startswith(("head.", "norm.")):
            torch.testing.assert_close(mine[name], tensor, msg=name)
    with pytest.raises(ValueError, match="do not fit swin_small"):
        SwinBackbone(name="swin_small_patch4_window7_224", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        SwinBackbone(name=TINY, pretrained=str(tmp_path / "missing.pth"))


def test_swin_detector_trains_and_round_trips_deta_names():
    torch.manual_seed(0)
    model = tiny_detector(*DETA_SWIN)
    criterion = SetCriterion(5, [Branch("main", HungarianMatcher())])
    module = DetectionModule(model, criterion)
    out = model(*batch(70, 90))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    criterion.total(criterion(out, targets)).backward()
    official = to_official(module)
    # DETA's names: merges at the end of their stage, output norms norm1..3 inside the body.
    assert "backbone.0.body.layers.0.downsample.reduction.weight" in official
    assert "backbone.0.body.layers.3.downsample.reduction.weight" not in official
    assert {f"backbone.0.body.norm{i}.weight" for i in (1, 2, 3)} <= set(official)
    # saved by DETA
    official["backbone.0.body.layers.1.blocks.0.attn.relative_position_index"] = torch.zeros(1)
    fresh = DetectionModule(tiny_detector(*DETA_SWIN), criterion)
    load_official_state_dict(fresh, official)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, msg=name)
