"""Detections on a folder of images (or one image): a COCO-style results JSON and annotated PNGs."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.io import ImageReadMode, decode_image, write_png

from .checkpoints import load_weights
from .data import collate
from .data.transforms import eval_transforms
from .files import atomic_write
from .lit.callbacks import draw_detections
from .official import read_checkpoint_file

log = logging.getLogger("msdetr")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input '{path}' is neither an image nor a folder; pass input=<image or folder>.")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"the folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return images


def build_predictor(cfg: DictConfig):
    """The module (weights loaded) and category names for `cfg.ckpt_path`. This project's .ckpt
    carries its config and names; an official .pth needs the experiment config on the command line."""
    from .runner import build_module

    ckpt = read_checkpoint_file(cfg.ckpt_path)
    saved = ckpt.get("msdetr_config") if isinstance(ckpt, dict) else None
    names = {int(k): v for k, v in (ckpt.get("category_names") or {}).items()} if saved else {}
    model_cfg = OmegaConf.create(saved) if saved else cfg.copy()
    model_cfg.model.detector.backbone.pretrained = False  # the checkpoint brings every weight
    module = build_module(model_cfg)
    load_weights(module, cfg.ckpt_path, ckpt)
    return module.eval(), names


@torch.no_grad()
def predict(cfg: DictConfig) -> Path:
    """Writes `<output_dir>/detections.json` and one PNG per image under `<output_dir>/images/`."""
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path '{cfg.ckpt_path}' does not exist; point it at a .ckpt or official .pth.")
    paths = list_images(cfg.input)
    module, names = build_predictor(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device)
    transform = eval_transforms(cfg.eval_size, cfg.max_size)
    out_dir = Path(cfg.output_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    results = []
    for start in range(0, len(paths), cfg.batch_size):
        chunk = paths[start:start + cfg.batch_size]
        originals = [decode_image(str(p), mode=ImageReadMode.RGB) for p in chunk]
        images, mask, _ = collate([(transform(im), {}) for im in originals])
        outputs = module.model(images.to(device), mask.to(device))
        sizes = torch.tensor([im.shape[-2:] for im in originals], device=device)
        for offset, (path, image, det) in enumerate(zip(chunk, originals, module.postprocess(outputs, sizes))):
            det = {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in det.items()}
            keep = det["scores"] >= cfg.score_threshold
            for box, score, label in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep]):
                x0, y0, x1, y1 = box.tolist()
                results.append({"image_id": start + offset, "file_name": path.name, "category_id": int(label),
                                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                "score": round(float(score), 4)})
            write_png(draw_detections(image, det, names, cfg.score_threshold), str(out_dir / "images" / f"{path.stem}.png"))
    target = out_dir / "detections.json"
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(results)))
    log.info("%d detections on %d images -> %s", len(results), len(paths), target)
    return target
