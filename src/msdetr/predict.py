"""Detections on a folder of images (or one image): COCO-style results, written as they are made,
and annotated PNGs.

Checkpoints: this project's .ckpt from train.py (it carries its Hydra config and class names), a
.ckpt from `python -m msdetr fit` (LightningCLI: the model is rebuilt from the class_path /
init_args config that run saved), or an official .pth with its experiment on the command line.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as TF

from . import visualize
from .checkpoints import load_weights
from .data import CocoDataModule, collate, read_coco_json
from .data.coco import UnreadableImageError, load_rgb
from .data.transforms import eval_transforms
from .files import atomic_write
from .official import read_checkpoint_file

log = logging.getLogger("msdetr")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"input '{path}' is neither an image nor a folder; pass input=<image or folder>."
        )
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(
            f"the folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})."
        )
    return images


def _save_png(picture: torch.Tensor, path: Path) -> None:
    write_png(picture, str(path))


def _readable_batches(paths: list[Path], batch_size: int, skipped: list[str], record):
    """Batches of (image id, path, RGB image), read as they are needed. A file that cannot be read
    gets one warning naming it, a line in the JSONL (`record`), an entry in `skipped`, and is left
    out."""
    batch = []
    for image_id, path in enumerate(paths):
        try:
            image = load_rgb(path)
        except UnreadableImageError as exc:
            log.warning("%s; skipped", exc)
            skipped.append(str(exc))
            record({"image_id": image_id, "file_name": path.name, "error": str(exc)})
            continue
        batch.append((image_id, path, image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool masks -> N COCO compressed RLE dicts {"size": [H, W], "counts": str} (the
    results format's `segmentation`; `pycocotools.mask.decode` reads them back once "counts" is
    encoded to bytes again)."""
    if len(masks) == 0:
        return []
    cells = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    return [
        {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in mask_utils.encode(cells)
    ]


class Predictor(NamedTuple):
    module: Any  # DetectionModule, weights loaded, in eval mode
    names: dict[int, str]  # {category id: name}; empty when unknown (labels are drawn as numbers)
    eval_size: int  # short side the images are resized to
    max_size: int  # cap on the long side
    resolution_from: str  # where eval_size / max_size came from, for the log


def _plain_args(section: Any) -> dict:
    """The keyword arguments of a config section, plain or LightningCLI's class_path / init_args."""
    if not isinstance(section, dict):
        return {}
    if "class_path" in section:
        return dict(section.get("init_args") or {})
    return {k: v for k, v in section.items() if k != "_instantiator"}


def _lightning_cli_config(
    ckpt: dict, ckpt_path: Path, cli_config: str | None
) -> tuple[dict, dict, str]:
    """(model section, data section, where they were found) of a checkpoint from `python -m msdetr
    fit`.

    The checkpoint's hyper_parameters hold the model's class_path / init_args config when the module
    saved it; otherwise the config.yaml LightningCLI saved in the run's log dir (the checkpoint's
    `lightning_logs/version_N/checkpoints/..` parent) or `cli_config` is read."""
    hparams = _plain_args(ckpt.get("hyper_parameters"))
    if not cli_config and isinstance(hparams.get("model"), dict):
        return hparams, _plain_args(ckpt.get("datamodule_hyper_parameters")), f"'{ckpt_path}'"
    candidates = (
        [Path(cli_config)]
        if cli_config
        else [ckpt_path.parent.parent / "config.yaml", ckpt_path.parent / "config.yaml"]
    )
    for path in candidates:
        if not path.is_file():
            continue
        with path.open() as f:
            config = yaml.safe_load(f)
        if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
            raise ValueError(
                f"'{path}' holds no 'model' section; set cli_config= to the config.yaml that "
                "`python -m msdetr fit` saved for the run of this checkpoint."
            )
        return _plain_args(config["model"]), _plain_args(config.get("data")), f"'{path}'"
    if cli_config:
        raise FileNotFoundError(
            f"cli_config '{cli_config}' does not exist; point it at the config.yaml that "
            "`python -m msdetr fit` saved for the run of this checkpoint."
        )
    raise FileNotFoundError(
        f"'{ckpt_path}' is a Lightning checkpoint without this project's run config, and no "
        f"LightningCLI config.yaml is beside it ({candidates[0]}); set cli_config=<the run's "
        "config.yaml> (LightningCLI saves it in lightning_logs/version_N/)."
    )


def _build_from_lightning_cli(model_args: dict, source: str):
    """DetectionModule from its LightningCLI config, through Lightning's own instantiator."""
    from lightning.pytorch.cli import instantiate_module

    from .lit import DetectionModule

    config = copy.deepcopy(model_args)
    detector = config.get("model")
    backbone = (
        (detector.get("init_args") or {}).get("backbone") if isinstance(detector, dict) else None
    )
    backbone_args = backbone.get("init_args") if isinstance(backbone, dict) else None
    if isinstance(backbone_args, dict) and "pretrained" in backbone_args:
        backbone_args["pretrained"] = False  # the checkpoint brings every weight
    try:
        return instantiate_module(DetectionModule, config)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"the model config in {source} does not build a DetectionModule ({first}); it should "
            "be the `model:` section `python -m msdetr fit` saved."
        ) from exc


def _names_from_annotations(data_args: dict) -> dict[int, str]:
    """Category names from the run's validation annotation file, if it is still there."""
    ann = data_args.get("val_ann") or (
        data_args.get("root")
        and str(Path(data_args["root"]) / "annotations" / "instances_val.json")
    )
    if not ann or not Path(ann).is_file():
        return {}
    try:
        return {int(c["id"]): str(c["name"]) for c in read_coco_json(ann)["categories"]}
    except (ValueError, OSError):
        return {}


def build_predictor(cfg: DictConfig) -> Predictor:
    """The module (weights loaded), category names and resolution for `cfg.ckpt_path`.

    The images are resized as the checkpoint's run evaluated them (its data.eval_size and
    data.max_size) unless `cfg.eval_size` / `cfg.max_size` are set."""
    from .run.build import build_module

    path = Path(cfg.ckpt_path)
    ckpt = read_checkpoint_file(path)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    saved = ckpt.get("msdetr_config")
    names = {int(k): v for k, v in (ckpt.get("category_names") or {}).items()}
    if saved:  # train.py's checkpoint
        model_cfg = OmegaConf.create(saved)
        assert isinstance(model_cfg, DictConfig), "a saved run config is a mapping"
        model_cfg.model.detector.backbone.pretrained = False  # the checkpoint brings every weight
        module = build_module(model_cfg)
        data_args, origin = _plain_args(saved.get("data")), f"the data config saved in '{path}'"
    elif "pytorch-lightning_version" in ckpt:  # python -m msdetr fit (LightningCLI)
        model_args, data_args, source = _lightning_cli_config(ckpt, path, cfg.get("cli_config"))
        module = _build_from_lightning_cli(model_args, source)
        names = names or _names_from_annotations(data_args)
        origin = f"the data config in {source}"
    else:  # an official .pth: the experiment given on the command line
        model_cfg = cfg.copy()
        model_cfg.model.detector.backbone.pretrained = False
        module = build_module(model_cfg)
        data_args = {k: cfg.data.get(k) for k in ("eval_size", "max_size") if "data" in cfg}
        origin = "the data config (experiment=...)"
    load_weights(module, str(path), ckpt or None)
    defaults = inspect.signature(CocoDataModule).parameters
    resolution = {}
    for key in ("eval_size", "max_size"):
        given, trained = cfg.get(key), data_args.get(key)
        resolution[key] = int(
            given
            if given is not None
            else trained
            if trained is not None
            else defaults[key].default
        )
    if cfg.get("eval_size") is not None and cfg.get("max_size") is not None:
        origin = "eval_size= and max_size= given"
    elif cfg.get("eval_size") is not None or cfg.get("max_size") is not None:
        given = "eval_size" if cfg.get("eval_size") is not None else "max_size"
        origin = f"{given}= given, the other from {origin}"
    return Predictor(module.eval(), names, resolution["eval_size"], resolution["max_size"], origin)


@torch.no_grad()
def predict(cfg: DictConfig) -> Path:
    """Detections for every image of `cfg.input`, written as they are made.

    `<output_dir>/detections.jsonl` gets one line per image as soon as it is done (its detections,
    or the reason it was skipped), so an interrupted run keeps what it did; `detections.json` (COCO
    results with file_name) is written at the end, and `images/<file name>.png` (`a.jpg.png`,
    `a.png.png`: inputs that differ only in extension stay apart) shows the boxes. Boxes are clipped
    to their image. With a mask model each detection also carries `segmentation`, its instance mask
    at the image's size as COCO compressed RLE (`masks_to_rle`), and the pictures show the masks.
    A file that cannot be read is named, skipped and listed at the end; an input with no readable
    image at all is an error."""
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path '{cfg.ckpt_path}' does not exist; point it at a .ckpt or official .pth."
        )
    paths = list_images(cfg.input)
    predictor = build_predictor(cfg)
    module, names = predictor.module, predictor.names
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    module.to(device)
    log.info(
        "images resized to short side %d, long side at most %d (%s)",
        predictor.eval_size,
        predictor.max_size,
        predictor.resolution_from,
    )
    transform = eval_transforms(predictor.eval_size, predictor.max_size)
    out_dir = Path(cfg.output_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    done, skipped = 0, list[str]()
    with (out_dir / "detections.jsonl").open("w") as lines:

        def record(entry: dict) -> None:
            lines.write(json.dumps(entry) + "\n")
            lines.flush()

        for batch in _readable_batches(paths, cfg.batch_size, skipped, record):
            originals = [TF.pil_to_tensor(image) for _, _, image in batch]
            images, mask, _ = collate([(transform(im), {}) for im in originals])
            outputs = module.model(images.to(device), mask.to(device))
            sizes = torch.tensor([im.shape[-2:] for im in originals], device=device)
            for (image_id, path, _), image, det in zip(
                batch, originals, module.postprocess(outputs, sizes)
            ):
                h, w = image.shape[-2:]
                det = {
                    k: v.float().cpu() if k not in ("labels", "masks") else v.cpu()
                    for k, v in det.items()
                }
                det["boxes"][:, 0::2] = det["boxes"][:, 0::2].clamp(0, w)
                det["boxes"][:, 1::2] = det["boxes"][:, 1::2].clamp(0, h)
                keep = det["scores"] >= cfg.score_threshold
                found = []
                for box, score, label in zip(
                    det["boxes"][keep], det["scores"][keep], det["labels"][keep]
                ):
                    x0, y0, x1, y1 = box.tolist()
                    found.append(
                        {
                            "image_id": image_id,
                            "file_name": path.name,
                            "category_id": int(label),
                            "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                            "score": round(float(score), 4),
                        }
                    )
                if "masks" in det:
                    for entry, rle in zip(found, masks_to_rle(det["masks"][keep])):
                        entry["segmentation"] = rle
                picture = visualize.draw_detections(image, det, names, cfg.score_threshold)
                atomic_write(
                    out_dir / "images" / f"{path.name}.png",
                    functools.partial(_save_png, picture),
                )
                record(
                    {
                        "image_id": image_id,
                        "file_name": path.name,
                        "width": int(w),
                        "height": int(h),
                        "detections": found,
                    }
                )
                results.extend(found)
                done += 1
    if not done:
        raise ValueError(
            f"none of the {len(paths)} file(s) of input '{cfg.input}' could be read as an image "
            f"({'; '.join(skipped[:5])}{' and more' if len(skipped) > 5 else ''}); pass images "
            f"({', '.join(IMAGE_SUFFIXES)}) that PIL can open."
        )
    target = out_dir / "detections.json"
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(results)))
    log.info("%d detections on %d images -> %s", len(results), done, target)
    if skipped:
        log.warning(
            "%d of %d file(s) could not be read and were skipped: %s",
            len(skipped),
            len(paths),
            "; ".join(skipped),
        )
    return target
