"""What a mask model's detections reach outside the model: the COCO `segm` metrics of validation
(val/mask_AP, ...), the RLE segmentations predict.py writes and the translucent masks of the
pictures."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from helpers.config import compose
from helpers.detectors import TINY
from msdetr.data.datamodule import CocoDataModule
from msdetr.evaluation.coco_eval import MASK_STAT_NAMES
from msdetr.lit.module import DetectionModule

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


def validate(module: DetectionModule, datamodule: L.LightningDataModule) -> dict:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_validating_a_mask_model_logs_segm_ap_beside_bbox_ap(tmp_path):
    module = tiny_mask_module()
    logged = validate(module, synthetic_masks(tmp_path))
    for name in ("AP", "AP50", "mask_AP", "mask_AP50", "mask_AP75", "mask_AR100"):
        assert f"val/{name}" in logged and math.isfinite(logged[f"val/{name}"]), sorted(logged)
        assert logged[f"val/{name}"] == pytest.approx(module.last_metrics[name])
    # Every defined mask statistic is logged; an undefined one (NaN, e.g. no small objects) not.
    for name in MASK_STAT_NAMES:
        assert (f"val/{name}" in logged) == (not math.isnan(module.last_metrics[name]))
