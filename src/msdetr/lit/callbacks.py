"""Callbacks and plugins: prediction pictures, training throughput, atomic checkpoint writes."""
from __future__ import annotations

import resource
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchvision.io import write_png
from torchvision.transforms.v2.functional import InterpolationMode, resize
from torchvision.utils import draw_bounding_boxes, make_grid

from ..box_ops import cxcywh_to_xyxy
from ..data import collate
from ..files import atomic_write

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it: a killed job never leaves a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                       storage_options))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized float (3, H, W) -> uint8."""
    img = image.detach().float().cpu() * _STD + _MEAN
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_detections(image_u8: torch.Tensor, det: dict, names: dict[int, str] | None, score_threshold: float,
                    gt_boxes: torch.Tensor | None = None) -> torch.Tensor:
    """Boxes (xyxy, pixels of image_u8) with 'label score' captions; GT boxes, if given, in white."""
    if gt_boxes is not None and len(gt_boxes):
        image_u8 = draw_bounding_boxes(image_u8, gt_boxes, colors="white", width=1)
    keep = det["scores"] >= score_threshold
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    if len(boxes) == 0:
        return image_u8
    captions = [f"{(names or {}).get(int(l), int(l))} {float(s):.2f}" for l, s in zip(labels, scores)]
    palette = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple"]
    colors = [palette[int(l) % len(palette)] for l in labels]
    return draw_bounding_boxes(image_u8, boxes, labels=captions, colors=colors, width=2)


class Throughput(L.Callback):
    """Logs training speed every `log_every_n_steps` optimizer steps: `perf/images_per_sec` (all ranks),
    `perf/peak_mem_gb` (CUDA: peak allocated; CPU: peak resident set) and `perf/criterion_share`,
    the fraction of the step spent in the criterion (matching + losses). On CUDA it synchronizes
    around the step and the criterion, which costs a little speed; leave it out of production runs
    if that matters (callbacks.throughput=null)."""

    def __init__(self, log_every_n_steps: int = 50):
        self.log_every_n_steps = log_every_n_steps
        self._start = 0.0
        self._logged_step = -1
        self._window = self._empty_window()

    @staticmethod
    def _empty_window() -> dict[str, float]:
        return {"images": 0, "seconds": 0.0, "criterion": 0.0}

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.sync_timing = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = pl_module._clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        w = self._window
        w["seconds"] += pl_module._clock() - self._start
        w["criterion"] += pl_module.criterion_seconds
        w["images"] += batch[0].shape[0] * trainer.world_size
        step = trainer.global_step  # optimizer steps: with gradient accumulation, several batches each
        if step == self._logged_step or (step % self.log_every_n_steps and not trainer.fast_dev_run):
            return
        self._logged_step = step
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        pl_module.log_dict({
            "perf/images_per_sec": w["images"] / max(w["seconds"], 1e-9),
            "perf/peak_mem_gb": float(peak),
            "perf/criterion_share": w["criterion"] / max(w["seconds"], 1e-9),
        }, on_step=True, on_epoch=False, rank_zero_only=True)
        self._window = self._empty_window()


class PredictionImages(L.Callback):
    """Saves a PNG grid of predictions on the first validation images (GT in white)."""

    def __init__(self, dirpath: str, num_images: int = 4, score_threshold: float = 0.3, every_n_epochs: int = 0,
                 min_side: int = 320):
        self.dirpath = Path(dirpath)
        self.min_side = min_side
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n > 0 and not trainer.sanity_checking and (trainer.current_epoch + 1) % n == 0:
            self.render(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.render(trainer, pl_module, "final")

    @torch.no_grad()
    def render(self, trainer, pl_module, tag: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        names = getattr(dm, "category_names", None)
        batch = collate([dataset[i] for i in range(min(self.num_images, len(dataset)))])
        images, mask, targets = batch
        was_training = pl_module.training
        pl_module.eval()
        outputs = pl_module.model(images.to(pl_module.device), mask.to(pl_module.device))
        pl_module.train(was_training)
        # Boxes at the transformed (unpadded) size so they land on the tensor we draw.
        sizes = torch.stack([t["size"] for t in targets]).to(pl_module.device)
        dets = pl_module.postprocess(outputs, sizes)
        tiles = []
        for img, det, tgt in zip(images, dets, targets):
            h, w = (int(v) for v in tgt["size"])
            # Small validation images are enlarged so captions stay legible.
            zoom = max(1, round(self.min_side / min(h, w)))
            tile = denormalize(img[:, :h, :w])
            if zoom > 1:
                tile = resize(tile, [h * zoom, w * zoom], interpolation=InterpolationMode.NEAREST)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32) * zoom
            gt = cxcywh_to_xyxy(tgt["boxes"].float()) * scale if len(tgt["boxes"]) else None
            det = {k: v.cpu() for k, v in det.items()}
            det["boxes"] = det["boxes"] * zoom
            tiles.append(draw_detections(tile, det, names, self.score_threshold, gt))
        # Tiles differ in size: pad each to the largest before the grid.
        th, tw = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
        tiles = [torch.nn.functional.pad(t, (0, tw - t.shape[2], 0, th - t.shape[1])) for t in tiles]
        grid = make_grid(tiles, nrow=min(len(tiles), 4), padding=4)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"predictions_{tag}.png"
        write_png(grid, str(path))
        self._log_to_loggers(trainer, grid, tag)
        return path

    @staticmethod
    def _log_to_loggers(trainer, grid: torch.Tensor, tag: str) -> None:
        """The picture also goes to loggers that take images (W&B, TensorBoard)."""
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key="val/predictions", images=[grid.permute(1, 2, 0).numpy()], caption=[tag],
                                 step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("val/predictions", grid, trainer.global_step)
