"""Tiny training runs: train.py in a subprocess, for the tests that stop, kill and resume it (tests/
is on the subprocess's PYTHONPATH, so a test can inject `helpers.signals.SignalAtStep`), and the
config of the end-to-end tests that run in the test's own process (E2E, `config`)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import ROOT
from .config import compose

TESTS = ROOT / "tests"
# 8 training images in batches of 2: 4 steps an epoch, 2 epochs, validation after each.
RUN = [
    "model.num_queries=12",
    "model.hidden_dim=32",
    "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=2",
    "model.dim_feedforward=32",
    "model.postprocess.num_select=12",
    "model.detector.backbone.pretrained=false",
    "data.synthetic_train=8",
    "data.synthetic_val=2",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.train_scales=[64,80]",
    "data.max_size=96",
    "data.crop_resize=[64]",
    "data.crop_size=[48,64]",
    "data.eval_size=64",
    "schedule.epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "logger=csv",
    "callbacks.predictions=null",
    "callbacks.throughput=null",
]
# The same run on ResNet-18: the kill-and-resume matrix runs it many times.
SMALL = [*RUN, "model.detector.backbone.name=resnet18"]
# MS-DETR: its one-to-many assigner draws from a generator of its own, which a resume puts back too.
MS_DETR = [*SMALL, "matcher=ms_detr"]
# The tiny model and data of the end-to-end tests (test_train, test_logging, test_workflow, ...):
# 8 training and 4 validation images in batches of 4, the one list to update.
E2E = [
    "model.num_queries=10",
    "model.hidden_dim=64",
    "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=2",
    "model.dim_feedforward=64",
    "model.postprocess.num_select=10",
    "data.synthetic_train=8",
    "data.synthetic_val=4",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.train_scales=[64,80]",
    "data.max_size=96",
    "data.crop_resize=[64]",
    "data.crop_size=[48,64]",
    "data.eval_size=64",
    "model.detector.backbone.pretrained=false",
    "logger=csv",
]
# Variables that tell Lightning it was launched by a cluster or by torchrun: inherited from an
# earlier in-process distributed test they would make a fresh run wait for ranks nobody starts.
LAUNCHER_VARS = {
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
}


def config(tmp_path: Path, *overrides: str, name: str = "train") -> DictConfig:
    """conf/<name>.yaml at the E2E sizes, its data and output under `tmp_path`, then `overrides`."""
    return compose(
        *E2E,
        f"paths.data_root={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
        *overrides,
        name=name,
    )


def clean_env() -> dict[str, str]:
    """This process's environment without the LAUNCHER_VARS, for a run of its own."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def train(
    tmp_path: Path, run_dir: Path, *args: str, base=RUN, env=None, preexec_fn=None
) -> subprocess.CompletedProcess:
    clean = clean_env()
    clean.update(
        {
            "PYTHONPATH": os.pathsep.join(
                [str(TESTS), str(ROOT / "src"), clean.get("PYTHONPATH", "")]
            ),
            "HYDRA_FULL_ERROR": "0",
            **(env or {}),
        }
    )
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *base,
        f"paths.data_root={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        *args,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=clean,
        preexec_fn=preexec_fn,
    )


def train_e2e(tmp_path: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """train.py at the E2E sizes, its data under `tmp_path`, its run in `tmp_path / "run"`."""
    return train(tmp_path, tmp_path / "run", *args, base=E2E, env=env)


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """{step: value} of `key` in the run's CSV history; a step logged twice fails."""
    (path,) = (run_dir / "csv").rglob("metrics.csv")
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                step = int(row["step"])
                assert step not in out, f"{key} at step {step} logged twice"
                out[step] = float(row[key])
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def validate_in_process(module, datamodule, times: int = 1) -> dict:
    """Validate `module` on `datamodule` `times` times with one CPU Trainer in this process (no
    logger, checkpoints or progress bar); the metrics it logged last (`callback_metrics`)."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for _ in range(times):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return trainer.callback_metrics
