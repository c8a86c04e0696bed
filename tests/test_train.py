"""End to end through the Hydra configs: train, predictions picture, resume, config errors, DDP."""

import math
import random
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch

from helpers import ROOT
from helpers.runs import E2E, clean_env, config, train_e2e
from msdetr.run import evaluate, train
from msdetr.run.build import build_datamodule, build_module, build_trainer


def test_train_writes_checkpoint_metrics_and_picture(tmp_path):
    cfg = config(tmp_path, "schedule.epochs=1", "trainer.check_val_every_n_epoch=1")
    metrics = train(cfg)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    # Undefined ranges (no large shapes in the synthetic data) are NaN, never a fake 0.
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in metrics.values())
    assert not math.isnan(metrics["AP"])
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list((run / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temporaries
    png = run / "predictions" / "predictions_final.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert list((run / "csv").rglob("metrics.csv"))
    # The same checkpoint evaluates through evaluate.py's code path.
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    again = evaluate(
        config(tmp_path, ckpt, "experiment=synthetic_cpu", "callbacks=none", name="evaluate")
    )
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    with pytest.raises(ValueError, match="trained with another architecture"):
        evaluate(
            config(
                tmp_path,
                ckpt,
                "experiment=synthetic_cpu",
                "model.dim_feedforward=32",
                "callbacks=none",
                name="evaluate",
            )
        )


class _Kill(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated kill after epoch 1")


class _Capture(L.Callback):
    python_rng = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.python_rng is None:  # the random state is put back for the first resumed step
            self.python_rng = random.getstate()

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.epoch = trainer.current_epoch
        self.step = trainer.global_step
        self.sched_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.opt_state = {k: v["step"].clone() for k, v in opt.state.items()}
        self.lrs = [g["lr"] for g in opt.param_groups]


def test_resume_restores_optimizer_scheduler_and_epoch(tmp_path):
    cfg = config(
        tmp_path,
        "schedule.epochs=3",
        "schedule.optim.lr_drop_epochs=[1]",
        "callbacks.predictions=null",
        "trainer.check_val_every_n_epoch=1",
        "matcher=ms_detr",
    )
    L.seed_everything(0)
    dm, module = build_datamodule(cfg), build_module(cfg)
    trainer = build_trainer(cfg)
    trainer.callbacks.append(_Kill())
    with pytest.raises(RuntimeError, match="simulated kill"):
        trainer.fit(module, datamodule=dm)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 2

    dm, module = build_datamodule(cfg), build_module(cfg)
    trainer = build_trainer(cfg)
    capture = _Capture()
    trainer.callbacks.append(capture)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last))
    assert capture.epoch == 1 and capture.step == 2
    assert capture.sched_epoch == 1
    assert capture.lrs == [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]]
    assert capture.lrs[0] == pytest.approx(cfg.schedule.optim.lr * 0.1)  # dropped after epoch 1
    assert all(int(v) == 2 for v in capture.opt_state.values())
    # The random state of the process comes back as saved (with the o2m assigner's generator; the
    # kill-and-resume test shows the losses continue exactly).
    (state,) = saved["msdetr_rng"]
    assert len(state["generators"]) == 1
    assert list(capture.python_rng[1]) == state["python"]["internal"]
    assert trainer.current_epoch == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.detector.not_an_option=1", "Key 'not_an_option' is not in struct"),
        ("matcher=not_a_matcher", "Could not find 'matcher/not_a_matcher'"),
    ],
)
def test_unknown_config_option_is_one_clear_error(tmp_path, override, message):
    result = train_e2e(tmp_path, override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path):
    # a port taken between choosing and binding it is retried, nothing else
    for _attempt in range(3):
        result = train_e2e(
            tmp_path,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "matcher=ms_detr",
            "schedule.epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.predictions=null",
            env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())},
        )
        if "EADDRINUSE" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = list((tmp_path / "run" / "csv").rglob("metrics.csv"))
    assert metrics and "val/AP" in metrics[0].read_text()
    # Each rank draws from seed + rank (the official per-process seed): the checkpoint holds both
    # ranks' random states, and their o2m assigner generators differ.
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    rank0, rank1 = saved["msdetr_rng"]
    assert not torch.equal(rank0["generators"][0], rank1["generators"][0])
    assert not torch.equal(rank0["torch"], rank1["torch"])


@pytest.mark.slow
def test_ddp_jobs_of_a_sweep_do_not_reenter_the_sweep(tmp_path):
    # Lightning starts rank 1 by rerunning the job's saved config in the job's absolute directory.
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "matcher=hungarian,ms_detr",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "schedule.epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.predictions=null",
        *E2E,
        f"paths.data_root={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    clean = clean_env()
    for _attempt in range(3):
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=900,
            env={**clean, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())},
        )
        if "EADDRINUSE" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no nested sweeps
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        # rank 1 ran this job, in this directory
        assert (sweep / job / "train_ddp_rank1.log").is_file()
        assert not list((sweep / job).glob("*/multirun.yaml"))
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_matcher_sweep_fast_dev_run(tmp_path):
    matchers = [
        "hungarian",
        "ms_detr",
        "deta",
        "h_detr",
        "group_detr",
        "ms_detr_h_detr",
        "ms_detr_deta",
        "dn_detr",
        "ms_detr_dino",
    ]
    # Mixed query selection for all: Group DETR's groups need learned content on a two-stage model.
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "matcher=" + ",".join(matchers),
        "model.detector.queries.mixed_selection=true",
        "trainer.fast_dev_run=true",
        *E2E,
        f"paths.data_root={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "callbacks.predictions=null",
    ]
    clean = clean_env()
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=clean
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == [str(i) for i in range(len(matchers))]
    for i, matcher in enumerate(matchers):  # every job really ran its matcher to the end
        overrides = (tmp_path / "sweep" / str(i) / ".hydra" / "overrides.yaml").read_text()
        assert f"matcher={matcher}" in overrides
        # a smoke test writes no checkpoint
        assert not list((tmp_path / "sweep" / str(i)).rglob("*.ckpt"))
    assert result.stderr.count("`Trainer.fit` stopped: `max_steps=1` reached") == len(matchers)
