"""What a mask model's detections reach outside the model: the COCO `segm` metrics of validation
(val/mask_AP, ...), the RLE segmentations predict.py writes and the translucent masks of the
pictures."""

from __future__ import annotations

import math
import types

import pytest
import torch
from hydra.utils import instantiate
from PIL import ImageColor

from helpers.config import compose
from helpers.detectors import TINY
from helpers.runs import validate_in_process
from msdetr import visualize
from msdetr.data.datamodule import CocoDataModule
from msdetr.evaluation.coco_eval import MASK_STAT_NAMES
from msdetr.lit import callbacks
from msdetr.lit.module import DetectionModule
from msdetr.visualize import MASK_ALPHA, class_colour, draw_detections

MASKS = ("+parts=mask_head", "matcher.mask_points=64")


def tiny_mask_module() -> DetectionModule:
    """A tiny Deformable-DETR with the mask head in a DetectionModule, as a run builds it."""
    torch.manual_seed(0)
    cfg = compose("~experiment", "model=deformable_detr", *TINY, *MASKS)
    model = instantiate(cfg.model.detector)
    return DetectionModule(model, instantiate(cfg.matcher.criterion))


def synthetic_masks(root, num_val: int = 3) -> CocoDataModule:
    """The built-in shapes with their masks, a few small validation images."""
    return CocoDataModule(
        root=str(root),
        synthetic=True,
        synthetic_train=1,
        synthetic_val=num_val,
        num_classes=5,  # TINY: class index = category id 1..4
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
        eval_size=64,
        max_size=96,
        masks=True,
    )


def test_validating_a_mask_model_logs_segm_ap_beside_bbox_ap(tmp_path):
    module = tiny_mask_module()
    logged = {
        k: float(v) for k, v in validate_in_process(module, synthetic_masks(tmp_path)).items()
    }
    for name in ("AP", "AP50", "mask_AP", "mask_AP50", "mask_AP75", "mask_AR100"):
        assert f"val/{name}" in logged and math.isfinite(logged[f"val/{name}"]), sorted(logged)
        assert logged[f"val/{name}"] == pytest.approx(module.last_metrics[name])
    # Every defined mask statistic is logged; an undefined one (NaN, e.g. no small objects) not.
    for name in MASK_STAT_NAMES:
        assert (f"val/{name}" in logged) == (not math.isnan(module.last_metrics[name]))


# ---------------------------------------------------------------------------------------------
# Pictures


def square_detection(score: float = 0.9, label: int = 2) -> dict:
    """One detection on a 40 x 80 picture: box (5, 4)-(75, 36), its caption at the top, mask rows
    20..29 x cols 20..49."""
    masks = torch.zeros(1, 40, 80, dtype=torch.bool)
    masks[0, 20:30, 20:50] = True
    return {
        "boxes": torch.tensor([[5.0, 4.0, 75.0, 36.0]]),
        "scores": torch.tensor([score]),
        "labels": torch.tensor([label]),
        "masks": masks,
    }


def test_a_drawn_mask_is_filled_translucent_in_its_class_colour_and_nothing_else_changes():
    grey = torch.full((3, 40, 80), 100, dtype=torch.uint8)
    det = square_detection()
    picture = draw_detections(grey, det, {2: "ellipse"}, 0.5)
    colour = torch.tensor(ImageColor.getrgb(class_colour(2)), dtype=torch.float32)
    blended = MASK_ALPHA * colour + (1 - MASK_ALPHA) * 100
    inside = picture[:, 20:30, 20:50].float()
    assert ((inside - blended.view(3, 1, 1)).abs() <= 1).all()  # torchvision truncates
    # Away from the mask and from the box's outline and caption: untouched.
    assert (picture[:, 38:, :] == 100).all() and (picture[:, 18:32, 8:18] == 100).all()
    assert (picture[:, 18:32, 52:72] == 100).all() and (picture[:, 31:34, 20:50] == 100).all()
    # The box is drawn too, in the same colour, and without masks the inside stays grey.
    no_masks = {k: v for k, v in det.items() if k != "masks"}
    boxes_only = draw_detections(grey, no_masks, None, 0.5)
    assert (boxes_only[:, 20:30, 20:50] == 100).all() and (boxes_only[:, 25, 5] != 100).any()
    assert torch.equal(picture[:, 25, 5], boxes_only[:, 25, 5])
    # Below the threshold: neither mask nor box; probabilities are drawn above 0.5.
    assert torch.equal(draw_detections(grey, square_detection(score=0.2), None, 0.5), grey)
    soft = {**det, "masks": det["masks"].float() * 0.7}
    assert torch.equal(draw_detections(grey, soft, {2: "ellipse"}, 0.5), picture)


def test_masks_of_another_size_than_the_picture_are_refused():
    grey = torch.full((3, 20, 80), 100, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"masks are \(40, 80\) but the picture is \(20, 80\)"):
        draw_detections(grey, square_detection(), None, 0.5)


def test_the_validation_grid_shows_a_mask_models_masks(tmp_path, monkeypatch):
    module = tiny_mask_module()
    dm = synthetic_masks(tmp_path / "data", num_val=2)
    dm.prepare_data()
    dm.setup("validate")
    drawn = []
    real = visualize.draw_detections

    def keep_then_draw(tile, det, *args, **kwargs):
        drawn.append((tile.shape, det))
        return real(tile, det, *args, **kwargs)

    monkeypatch.setattr(visualize, "draw_detections", keep_then_draw)
    trainer = types.SimpleNamespace(is_global_zero=True, datamodule=dm, loggers=[])
    pictures = callbacks.PredictionImages(str(tmp_path / "pictures"), num_images=2, min_side=96)
    pictures.score_threshold = 0.0  # an untrained model: draw every detection
    path = pictures.render(trainer, module, "final")
    assert path is not None and path.is_file() and len(drawn) == 2
    for shape, det in drawn:
        # enlarged with the tile (nearest): the masks cover the picture the boxes are drawn on
        assert det["masks"].dtype == torch.bool
        assert det["masks"].shape == (35, *shape[-2:])  # top-k over 7 queries x 5 classes
        assert det["masks"].any()
