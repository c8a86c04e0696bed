"""DetectionModule: the LightningModule that trains and evaluates any detector + criterion pair."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from ..evaluation import CocoMetric
from ..losses import SetCriterion
from ..models import DeformableDETR
from ..naming import official_names
from ..postprocess import TopKPostProcess
from ..seeded import Seeded
from . import loopstate, rng

log = logging.getLogger("msdetr")

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class DivergedError(FloatingPointError):
    """Training stopped after `max_consecutive_skipped_steps` non-finite steps in a row."""


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(k in name for k in keywords)


def _plain(settings) -> dict | None:
    """A settings dataclass as plain values (tuples as lists), as checkpoints and loggers keep
    them."""
    if settings is None:
        return None
    values = dataclasses.asdict(settings)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class ParamGroups:
    """The optimizer's parameter groups, as the official main.py makes them (its flags' names): a
    trainable parameter whose *official* name (`msdetr.naming.official_names`) contains one of
    `lr_backbone_names` goes to the "backbone" group at `lr_backbone`, else one containing one of
    `lr_linear_proj_names` to the "linear_proj" group at `lr * lr_linear_proj_mult`, every other one
    to the "default" group at `lr`."""

    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_backbone_names: Sequence[str] = ("backbone.0",)
    lr_linear_proj_mult: float = 0.1
    lr_linear_proj_names: Sequence[str] = ("reference_points", "sampling_offsets")

    def __post_init__(self) -> None:  # lists from a config become tuples: the settings stay frozen
        object.__setattr__(self, "lr_backbone_names", tuple(self.lr_backbone_names))
        object.__setattr__(self, "lr_linear_proj_names", tuple(self.lr_linear_proj_names))

    def lrs(self) -> dict[str, float]:
        """{group name: its learning rate}."""
        return {
            "default": self.lr,
            "backbone": self.lr_backbone,
            "linear_proj": self.lr * self.lr_linear_proj_mult,
        }


@dataclass(frozen=True)
class LRSchedule:
    """The LR scheduler: `scheduler` is called with the optimizer (a `_partial_` config) and stepped
    every `interval` ("epoch" or "step")."""

    scheduler: SchedulerFactory
    interval: str = "epoch"

    def __post_init__(self) -> None:
        if self.interval not in ("epoch", "step"):
            raise ValueError(
                f"the LR scheduler's interval is {self.interval!r} "
                "(schedule.lr_interval); use 'epoch' or 'step'."
            )


@dataclass(frozen=True)
class CompileOptions:
    """torch.compile of the detector's forward: its `mode`, `backend` and `dynamic` (True: symbolic
    batch and image sizes from the first compilation on, so batches of other sizes reuse it;
    None: torch's automatic dynamic shapes; False: static)."""

    mode: str | None = None
    dynamic: bool | None = True
    backend: str = "inductor"


class DetectionModule(L.LightningModule):
    """Official Deformable-DETR optimisation: the optimizer is built from parameter groups selected
    by official name (`ParamGroups`: backbone, linear projections, the rest), the LR scheduler steps
    every epoch (or step), COCO evaluation runs every validation epoch (gradient clipping is the
    Trainer's `gradient_clip_val`; the pre-clip gradient norm is logged as `train/grad_norm`).

    When fitting or evaluating starts, every logger gets the run's whole config (`run_config`, set
    by `msdetr.run`; this module's hyperparameters without one) and the parameter counts
    (`num_params`) as its hyperparameters.

    Args:
        model, criterion, postprocess: the detector, its SetCriterion and the post-processing of its
            main stream (None: TopKPostProcess()).
        optimizer: called with the parameter groups (a list of {"params", "lr", "name"}), returns
            the optimizer (Hydra's `_partial_` config `schedule.optimizer`: AdamW with the official
            weight decay). The only way an optimizer is made; None: a module that only evaluates
            (configure_optimizers refuses).
        lr_scheduler: the LR scheduler and how often it steps (`LRSchedule`; configs
            `schedule.lr_scheduler`, `schedule.lr_interval`); None: the learning rates stay
            constant.
        param_groups: the groups' members and learning rates (`ParamGroups`; `msdetr.run.build`
            gives it schedule.optim's lr, lr_backbone and lr_linear_proj_mult).
        compile_options: torch.compile the detector's forward (`configure_model`, the hook a Trainer
            calls before fitting or evaluating) with these options (`CompileOptions`); None: eager.
            The criterion's matching and the post-processing stay eager. The detector is compiled
            in place (`nn.Module.compile`), so parameter names, checkpoints and official
            conversions are the same as without.
        seed: the run's seed. Training process `rank` > 0 reseeds torch, numpy, python and the
            assigners' generators with seed + rank when fit starts (the official per-process seed),
            so ranks draw different augmentations and positives; rank 0 keeps the run's stream.
            Checkpoints carry every rank's random state, and a resume puts it back.
        eval_backend: CocoMetric's backend (pycocotools or faster_coco_eval).
        max_consecutive_skipped_steps: a step whose loss or gradients are not finite (or whose
            matching costs are) is skipped: its gradients are dropped before the optimizer steps, so
            the weights and the optimizer state stay as they were; it is named in the log and
            counted (`train/skipped_steps`). This many skips in a row stop the run with
            `DivergedError`. The decision is one host read per step (the loss and the gradient norm,
            which the all-reduced gradients make the same on every rank, folded into one flag; under
            DDP the flag is all-reduced too), made where the gradient norm is computed anyway.

    Neither callable is saved with the hyperparameters (checkpoints stay plain data; the settings
    objects are saved as dicts): a module loaded from a checkpoint is built with them again.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: SetCriterion,
        postprocess: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: LRSchedule | None = None,
        param_groups: ParamGroups = ParamGroups(),
        compile_options: CompileOptions | None = None,
        seed: int | None = None,
        eval_backend: str = "pycocotools",
        max_consecutive_skipped_steps: int = 5,
    ):
        super().__init__()
        settings = ["optimizer", "lr_scheduler", "param_groups", "compile_options"]
        # Plain values only (checkpoints load without unpickling code); the loggers get the whole
        # run config instead (`log_run_description`), so Lightning's own hparams logging is off.
        self.save_hyperparameters(
            ignore=["model", "criterion", "postprocess", *settings], logger=False
        )
        self.hparams.update(
            param_groups=_plain(param_groups), compile_options=_plain(compile_options)
        )
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_scheduler
        self.param_groups = param_groups
        self.compile_options = compile_options
        self.seed = seed
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        streams = getattr(model, "output_streams", None)
        if streams is not None:
            # a matcher that cannot fit the model fails here
            criterion.check_model(streams)
        self.model = model
        self.criterion = criterion
        self.postprocess = postprocess if postprocess is not None else TopKPostProcess()
        # COCO AP over the validation set; its states are not persistent, so checkpoints do not
        # carry it.
        self.coco_metric = CocoMetric(backend=eval_backend)
        self.last_metrics: dict[str, float] = {}
        # Set by `msdetr.run` and saved in every checkpoint, so predict.py needs nothing but the
        # file.
        self.run_config: dict | None = None
        # the Hydra group choices (matcher, model, ...), set by `msdetr.run`
        self.config_choices: dict[str, str] = {}
        self.category_names: dict[int, str] = {}
        self._rng_to_restore: dict | None = None
        self._step_loss: torch.Tensor | None = None
        self._skip_reason: str | None = None
        self.skipped_steps = 0  # in all (saved in checkpoints)
        self.optimizer_steps = 0  # taken or skipped by this process's fits
        self.replaced_images: set[str] = set()  # unreadable training images (data.skip_bad_images)
        self.consecutive_skips = 0

    def _seeded(self) -> list[Seeded]:
        """Everything that may draw from a generator of its own (`Seeded`): the assigners and the
        detector's denoising blocks."""
        blocks = getattr(self.model, "training_queries", {})
        found = [*self.criterion.assigners(), *(blocks.values() if blocks else ())]
        return [s for s in found if isinstance(s, Seeded)]

    def _generators(self) -> list[torch.Generator]:
        return [s.generator for s in self._seeded() if s.generator is not None]

    @property
    def detector_compiled(self) -> bool:
        """Whether `self.model`'s calls go through torch.compile (`configure_model` compiled it)."""
        return getattr(self, "_detector_compiled", False)

    def configure_model(self) -> None:
        """Lightning calls this before fit / validate / test / predict (and a benchmark may call it
        itself): compile the detector with `compile_options`, once. Compilation itself happens
        lazily, at the first forward, for the shapes and mode (train / eval) it sees."""
        options = self.compile_options
        if options is None or self.detector_compiled:
            return
        # In place: `self.model` stays the DeformableDETR (state-dict keys without `_orig_mod.`).
        # dynamic=True marks the batch and image sizes dynamic (`detect`) rather than passing
        # dynamic=True, which would also make every float attribute (dropout p, eps) and size
        # symbolic and makes the first compilation ~2.5x slower for the same graph.
        dynamic = options.dynamic
        self.model.compile(
            mode=options.mode, dynamic=None if dynamic else dynamic, backend=options.backend
        )
        self._detector_compiled = True

    def detect(self, images: torch.Tensor, padding_mask: torch.Tensor, targets=None) -> dict:
        """The detector's outputs; compiled with `CompileOptions.dynamic`, the batch size, height
        and width are symbolic from the first compilation on, so batches of other shapes do not
        recompile. `targets` reach the detector only in training and only if its query blocks
        need them."""
        if self.detector_compiled and self.compile_options and self.compile_options.dynamic:
            torch._dynamo.maybe_mark_dynamic(images, (0, 2, 3))
            torch._dynamo.maybe_mark_dynamic(padding_mask, (0, 1, 2))
        if (
            targets is not None
            and self.model.training
            and getattr(self.model, "needs_targets", False)
        ):
            return self.model(images, padding_mask, targets)
        return self.model(images, padding_mask)

    def num_params(self) -> dict:
        """Parameter counts: total, trainable, and per top-level part of the detector (backbone,
        transformer, heads, ...)."""
        parts = {
            name: sum(p.numel() for p in child.parameters())
            for name, child in self.model.named_children()
        }
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "parts": {k: v for k, v in parts.items() if v},
        }

    def log_run_description(self) -> None:
        """Every logger gets the run's whole config (or, without one, this module's
        hyperparameters) and `num_params`, as hyperparameters: CSV's hparams.yaml, TensorBoard's
        hparams, the W&B run's config (so runs filter by matcher, model, lr). Rank 0 writes."""
        if not self.loggers:
            return
        described = dict(self.run_config) if self.run_config else dict(self.hparams)
        described["num_params"] = self.num_params()
        for logger in self.loggers:
            logger.log_hyperparams(described)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.log_run_description()
        rank = self.global_rank
        if stage == "fit" and self.seed is not None and rank > 0:
            rng.seed_process(self.seed + rank)
            for seeded in self._seeded():
                seeded.seed_rank(rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["msdetr_config"] = self.run_config
        checkpoint["msdetr_choices"] = self.config_choices
        checkpoint["category_names"] = self.category_names
        # Every rank runs this hook; rank 0 writes the file, so it collects all ranks' states.
        states = [rng.capture(self._generators())]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states[0])
            states = gathered
        checkpoint["msdetr_rng"] = states
        checkpoint["msdetr_skipped_steps"] = [self.skipped_steps, self.consecutive_skips]
        try:
            trainer = self.trainer
        except RuntimeError:  # saved outside a Trainer
            trainer = None
        if trainer is not None and trainer.state.fn == "fit" and "loops" in checkpoint:
            # A save between the epoch's last step and its end resumes into the next epoch
            # (loopstate.py).
            settled = loopstate.settle_epoch_end(
                checkpoint["loops"], trainer.num_training_batches, loopstate.validation_due(trainer)
            )
            if settled:
                checkpoint[loopstate.KEY] = settled

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run keeps the config it was started with now; a bare module adopts the saved
        # one.
        self.run_config = self.run_config or checkpoint.get("msdetr_config")
        self.category_names = self.category_names or checkpoint.get("category_names") or {}
        self.skipped_steps, self.consecutive_skips = checkpoint.get("msdetr_skipped_steps", (0, 0))
        states = checkpoint.get("msdetr_rng")
        try:
            resuming = self.trainer.training
        # load_from_checkpoint outside a Trainer: leave the caller's random state alone
        except RuntimeError:
            resuming = False
        if states is None or not resuming:
            return
        world = self.trainer.world_size
        if len(states) != world:
            warnings.warn(
                f"the checkpoint holds the random state of {len(states)} process(es) but this run "
                f"has {world}; the random streams restart from the seed, so the run will not "
                "continue bit for bit.",
                stacklevel=2,
            )
            return
        # Put back just before the first resumed step: what Lightning does in between (a sanity
        # check, new loader iterators) draws from the global generator, the interrupted run did not.
        self._rng_to_restore = states[self.global_rank]

    def on_train_start(self) -> None:
        self.last_metrics = {}  # the sanity check's numbers are not the run's

    def on_train_end(self) -> None:
        """With data.skip_bad_images: the training images that could not be read, all ranks'."""
        found = [sorted(self.replaced_images)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            found = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(found, sorted(self.replaced_images))
        files = sorted({f for rank in found for f in rank})
        if files and self.global_rank == 0:
            log.warning(
                "data.skip_bad_images=true: %d training image(s) could not be read and were "
                "replaced by the next readable image each time: %s",
                len(files),
                ", ".join(files),
            )

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            rng.restore(self._rng_to_restore, self._generators())
            self._rng_to_restore = None

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        return self.detect(images, padding_mask)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, padding_mask, targets = batch
        self.replaced_images.update(t["replaced"] for t in targets if "replaced" in t)
        outputs = self.detect(images, padding_mask, targets)
        bs = images.shape[0]
        try:
            losses = self.criterion(outputs, targets)
        # non-finite predictions: the matching costs are not finite
        except FloatingPointError as exc:
            self._skip_reason = str(exc).split(";")[0]
            # A NaN loss over every trainable weight: backward gives NaN gradients everywhere (under
            # DDP too, where every rank must run backward), and the step is skipped like any other.
            trainable = [p.sum() for p in self.parameters() if p.requires_grad]
            total = torch.stack(trainable).sum() * float("nan")
            self._step_loss = total.detach()
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
            return total
        total = self.criterion.total(losses)
        self._step_loss = total.detach()
        self._skip_reason = None
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        weights = self.criterion.weight_dict
        # Per-term logging of the final layer and of the non-layer metrics keeps the logger
        # readable.
        for name, value in losses.items():
            if name in weights and not name.split("_")[-1].isdigit():
                self.log(f"train/{name}", value.detach(), batch_size=bs)
            elif name.startswith("class_error"):
                self.log(f"train/{name}", value, batch_size=bs)
        return total

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called before the Trainer clips: the total norm official logs show as grad_norm.
        self.optimizer_steps += 1
        grads = [
            p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        self.log("train/grad_norm", norm, batch_size=1)
        if self._fp16_scaled():
            return  # fp16's GradScaler skips steps with inf gradients itself, and lowers its scale
        finite = torch.isfinite(norm)
        if self._step_loss is not None:
            finite = finite & torch.isfinite(self._step_loss).to(finite.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = finite.to(torch.int32)
            # one rank's non-finite loss skips the step everywhere
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        if bool(finite):  # the step's one host read for this check
            self.consecutive_skips = 0
        else:
            # Without gradients the optimizer leaves every parameter and its state alone (and the
            # Trainer's clipping has nothing to clip).
            optimizer.zero_grad(set_to_none=True)
            self._skip(norm)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def _fp16_scaled(self) -> bool:
        try:
            return str(self.trainer.precision).startswith("16")
        except RuntimeError:  # no Trainer
            return False

    def _skip(self, norm: torch.Tensor) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        loss = float(self._step_loss) if self._step_loss is not None else float("nan")
        why = self._skip_reason or f"the loss is {loss:.4g} and the gradient norm {float(norm):.4g}"
        limit = self.max_consecutive_skipped_steps
        if self.consecutive_skips >= limit:
            raise DivergedError(
                f"training diverged: {self.consecutive_skips} steps in a row up to step "
                f"{self.global_step} were not finite ({why}); the last checkpoint written stands. "
                "Lower the learning rate (schedule.optim.lr) or check the data, then resume from "
                "it or start again."
            )
        if self.global_rank == 0:
            log.warning(
                "step %d skipped: %s; the weights and the optimizer state are unchanged (%d in a "
                "row, max_consecutive_skipped_steps=%d; %d skipped in all).",
                self.global_step,
                why,
                self.consecutive_skips,
                limit,
                self.skipped_steps,
            )

    def param_group_names(self) -> dict[str, str]:
        """{parameter name: "default" | "backbone" | "linear_proj"} for every trainable parameter,
        selected by the official name as the official main.py does."""
        groups = self.param_groups
        official = official_names(self.model) if isinstance(self.model, DeformableDETR) else {}
        out = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            key = official.get(name, name)
            if _matches(key, groups.lr_backbone_names):
                out[name] = "backbone"
            elif _matches(key, groups.lr_linear_proj_names):
                out[name] = "linear_proj"
            else:
                out[name] = "default"
        return out

    def configure_optimizers(self):
        """`optimizer` called with the parameter groups (`ParamGroups`), and `lr_scheduler`'s
        scheduler called with the optimizer, stepped every `lr_scheduler.interval`."""
        if self.optimizer_factory is None:
            raise ValueError(
                "this DetectionModule was built without an optimizer, so it cannot "
                "train; pass optimizer= (the _partial_ config schedule.optimizer, "
                "e.g. torch.optim.AdamW)."
            )
        members: dict[str, list] = {"default": [], "backbone": [], "linear_proj": []}
        params = dict(self.model.named_parameters())
        for name, group in self.param_group_names().items():
            members[group].append(params[name])
        lrs = self.param_groups.lrs()
        groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in members.items() if ps]
        optimizer = self.optimizer_factory(groups)
        if self.lr_schedule is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.lr_schedule.scheduler(optimizer),
                "interval": self.lr_schedule.interval,
            },
        }

    # -- evaluation -------------------------------------------------------------------------
    def _coco_gt(self):
        """(the validation set's COCO ground truth, its annotation file)."""
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "val_dataset", None)
        if dataset is None or not hasattr(dataset, "coco"):
            raise RuntimeError(
                "COCO evaluation needs a datamodule with a `val_dataset.coco` (CocoDataModule)."
            )
        return dataset.coco, str(getattr(dataset, "ann_file", "the validation annotations"))

    def on_validation_epoch_start(self) -> None:
        self.coco_metric.set_ground_truth(*self._coco_gt())
        self.coco_metric.reset()

    def validation_step(self, batch, batch_idx):
        images, padding_mask, targets = batch
        outputs = self.detect(images, padding_mask)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        # A mask model's detections carry "masks" (n, H, W) at the original size: CocoMetric scores
        # them as `segm` too, logged as val/mask_AP, val/mask_AP50, ... beside the box metrics.
        self.coco_metric.update({int(t["image_id"]): d for t, d in zip(targets, detections)})

    def on_validation_epoch_end(self) -> None:
        # Every rank gets the same numbers (gathered by torchmetrics, scored on rank 0, broadcast).
        self.last_metrics = self.coco_metric.compute()
        for name, value in self.last_metrics.items():
            if math.isnan(value):
                # undefined (no ground truth in that size range): a logged NaN would poison monitors
                continue
            self.log(
                f"val/{name}",
                value,
                prog_bar=name in ("AP", "AP50"),
                rank_zero_only=False,
                sync_dist=False,
            )
        self.coco_metric.reset()

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end
