"""bench/mask_baseline.py: the box-filling baseline's masks, and one pass scoring both."""

import math
import sys

import lightning as L
import pytest
import torch

from helpers import ROOT
from helpers.runs import config
from msdetr.run.build import build_module, plain_config


@pytest.fixture(scope="module")
def mask_baseline():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import mask_baseline

        yield mask_baseline
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_a_filled_box_covers_the_pixels_whose_centres_it_holds(mask_baseline):
    boxes = torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.6, 1.4, 1.6, 2.6]])
    filled = mask_baseline.filled_boxes(boxes, 3, 4)
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[0, 0:2, 1:3] = True
    expected[1, 1:3, 1] = True  # centres (1.5, 1.5) and (1.5, 2.5)
    assert torch.equal(filled, expected)


def test_the_model_and_its_filled_boxes_are_scored_in_one_pass(mask_baseline, tmp_path):
    cfg = config(tmp_path, "data.num_classes=5", "+parts=mask_head", "matcher.mask_points=64")
    module = build_module(cfg)
    module.run_config = plain_config(cfg)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "mask.ckpt")
    results = mask_baseline.compare(str(tmp_path / "mask.ckpt"), max_images=2)
    assert set(results) == {"model", "filled boxes"}
    for values in results.values():
        assert all(math.isfinite(values[k]) for k in ("AP", "mask_AP", "mask_AP50"))
    # The same detections: the box metrics agree, only the masks differ.
    assert results["model"]["AP"] == results["filled boxes"]["AP"]
