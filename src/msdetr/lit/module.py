"""DetectionModule: the LightningModule that trains and evaluates any detector + criterion pair."""
from __future__ import annotations

import time
from typing import Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from ..losses import SetCriterion
from ..postprocess import TopKPostProcess


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


class DetectionModule(L.LightningModule):
    """Official Deformable-DETR optimisation: AdamW with backbone / linear-projection lr groups,
    LR steps per epoch, COCO evaluation every validation epoch (gradient clipping is the Trainer's
    `gradient_clip_val`)."""

    def __init__(
        self,
        model: nn.Module,
        criterion: SetCriterion,
        postprocess: nn.Module | None = None,
        lr: float = 2e-4,
        lr_backbone: float = 2e-5,
        lr_backbone_names: Sequence[str] = ("backbone.",),
        lr_linear_proj_mult: float = 0.1,
        lr_linear_proj_names: Sequence[str] = ("sampling_offsets", "reference_points"),
        weight_decay: float = 1e-4,
        lr_drop_epochs: Sequence[int] = (40,),
        lr_gamma: float = 0.1,
        eval_backend: str = "pycocotools",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "criterion", "postprocess"])
        if hasattr(model, "output_streams"):
            criterion.check_model(model.output_streams)  # a matcher that cannot fit the model fails here
        self.model = model
        self.criterion = criterion
        self.postprocess = postprocess if postprocess is not None else TopKPostProcess()
        self.evaluator = None
        self.last_metrics: dict[str, float] = {}
        # Set by the runner and saved in every checkpoint, so predict.py needs nothing but the file.
        self.run_config: dict | None = None
        self.category_names: dict[int, str] = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["msdetr_config"] = self.run_config
        checkpoint["category_names"] = self.category_names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run keeps the config it was started with now; a bare module adopts the saved one.
        self.run_config = self.run_config or checkpoint.get("msdetr_config")
        self.category_names = self.category_names or checkpoint.get("category_names") or {}

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        return self.model(images, padding_mask)

    # -- training ---------------------------------------------------------------------------
    # The Throughput callback sets this so that the criterion time excludes queued forward work.
    sync_timing = False
    criterion_seconds = 0.0

    def _clock(self) -> float:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def training_step(self, batch, batch_idx):
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        start = self._clock()
        losses = self.criterion(outputs, targets)
        self.criterion_seconds = self._clock() - start
        total = self.criterion.total(losses)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"the training loss is {total.item()} at step {self.global_step}; lower the learning "
                "rate or check the data (the per-term losses are logged under train/)."
            )
        bs = images.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        weights = self.criterion.weight_dict
        # Per-term logging of the final layer and of the non-layer metrics keeps the logger readable.
        for name, value in losses.items():
            if name in weights and not name.split("_")[-1].isdigit():
                self.log(f"train/{name}", value.detach(), batch_size=bs)
            elif name.startswith("class_error"):
                self.log(f"train/{name}", value, batch_size=bs)
        return total

    def configure_optimizers(self):
        hp = self.hparams
        groups = {"default": [], "backbone": [], "linear_proj": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if _matches(name, hp.lr_backbone_names):
                groups["backbone"].append(p)
            elif _matches(name, hp.lr_linear_proj_names):
                groups["linear_proj"].append(p)
            else:
                groups["default"].append(p)
        lrs = {"default": hp.lr, "backbone": hp.lr_backbone, "linear_proj": hp.lr * hp.lr_linear_proj_mult}
        param_groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
        optimizer = torch.optim.AdamW(param_groups, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.lr_drop_epochs), gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- evaluation -------------------------------------------------------------------------
    def _coco_gt(self):
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None or not hasattr(dataset, "coco"):
            raise RuntimeError("COCO evaluation needs a datamodule with a `val_dataset.coco` (CocoDataModule).")
        return dataset.coco

    def on_validation_epoch_start(self) -> None:
        from ..evaluation import CocoEvaluator

        self.evaluator = CocoEvaluator(self._coco_gt(), backend=self.hparams.eval_backend)

    def validation_step(self, batch, batch_idx):
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        self.evaluator.update({int(t["image_id"]): {k: v.cpu() for k, v in d.items()}
                               for t, d in zip(targets, detections)})

    def on_validation_epoch_end(self) -> None:
        self.evaluator.synchronize()
        stats = [None]
        if self.global_rank == 0:
            stats = [self.evaluator.summarize()]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(stats, src=0)
        self.last_metrics = stats[0]
        for name, value in self.last_metrics.items():
            # Every rank logs the same (broadcast) value, so no further reduction is needed.
            self.log(f"val/{name}", float(value), prog_bar=name in ("AP", "AP50"), rank_zero_only=False, sync_dist=False)
        self.evaluator = None

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end
