"""Segm AP of a trained mask model against a box-filling baseline, on its own validation set.

    python bench/mask_baseline.py outputs/<date>/<time>/checkpoints/last.ckpt

The baseline keeps the model's detections (the same boxes, scores and classes) and replaces each
predicted mask by its filled box, so the table shows what the mask head adds over the boxes it
comes with. Both are scored by the same `CocoMetric` (pycocotools' segm AP) in one pass.
"""

from __future__ import annotations

import argparse
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from msdetr.checkpoints import load_weights
from msdetr.evaluation import CocoMetric
from msdetr.official import read_checkpoint_file
from msdetr.run.build import build_datamodule, build_module

ROWS = ("mask_AP", "mask_AP50", "mask_AP75", "AP")


def filled_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W) bool: each xyxy box (pixels) filled, the pixels whose centres it covers."""
    ys = torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5
    xs = torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5
    x0, y0, x1, y1 = (v[:, None, None] for v in boxes.unbind(1))
    inside_y = (ys[None, :, None] >= y0) & (ys[None, :, None] < y1)
    inside_x = (xs[None, None, :] >= x0) & (xs[None, None, :] < x1)
    return inside_y & inside_x


@torch.no_grad()
def compare(ckpt_path: str, max_images: int | None = None) -> dict[str, dict[str, float]]:
    """{"model": metrics, "filled boxes": metrics} on the checkpoint run's validation set."""
    ckpt = read_checkpoint_file(ckpt_path)
    saved = ckpt.get("msdetr_config") if isinstance(ckpt, dict) else None
    if not saved:
        raise SystemExit(f"'{ckpt_path}' has no run config: give a checkpoint train.py wrote.")
    cfg = OmegaConf.create(saved)
    assert isinstance(cfg, DictConfig)
    if cfg.model.detector.get("mask_head") is None:
        raise SystemExit(f"'{ckpt_path}' is a box-only model: train one with a mask head first.")
    cfg.model.detector.backbone.pretrained = False  # the checkpoint brings every weight
    dm = build_datamodule(cfg)
    module = build_module(cfg)
    load_weights(module, ckpt_path, ckpt)
    module.eval()
    dm.prepare_data()  # the synthetic shapes are written on first use
    dm.setup("validate")
    coco_gt = dm.val_dataset.coco
    metrics = {name: CocoMetric(coco_gt, verbose=False) for name in ("model", "filled boxes")}
    seen = 0
    for images, padding, targets in dm.val_dataloader():
        outputs = module.detect(images, padding)
        sizes = torch.stack([t["orig_size"] for t in targets])
        detections = module.postprocess(outputs, sizes)
        ids = [int(t["image_id"]) for t in targets]
        metrics["model"].update(dict(zip(ids, detections)))
        filled = []
        for det, size in zip(detections, sizes.tolist()):
            filled.append({**det, "masks": filled_boxes(det["boxes"], *size)})
        metrics["filled boxes"].update(dict(zip(ids, filled)))
        seen += len(ids)
        if max_images is not None and seen >= max_images:
            break
    return {name: metric.compute() for name, metric in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a checkpoint of a mask model written by train.py")
    parser.add_argument("--max-images", type=int, default=None)
    args = parser.parse_args(argv)
    results = compare(args.ckpt, args.max_images)
    print("| masks | " + " | ".join(ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * values[k]:.1f}" for k in ROWS) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
