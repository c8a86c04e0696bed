"""Research workflow: W&B offline runs and resumes, requeue auto-resume, LightningCLI (predict.py:
    test_predict.py),
bf16-mixed with gradient accumulation and throughput logging, the Optuna and SLURM configs."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT
from helpers.config import compose
from helpers.detectors import batch, tiny_detector
from helpers.runs import E2E, clean_env, config, train_e2e
from msdetr.losses import Branch, SetCriterion
from msdetr.matching import HungarianMatcher
from msdetr.run import train


def _metrics_rows(run_dir: Path) -> list[dict]:
    (path,) = run_dir.rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_wandb_offline_run_keeps_its_id_for_resume(tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = train_e2e(
        tmp_path,
        "logger=wandb",
        "schedule.epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.predictions.every_n_epochs=1",
        env=env,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    run_id = (run / "wandb_id.txt").read_text().strip()
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    log = (offline / f"run-{run_id}.wandb").read_bytes()
    assert b"val/AP" in log and b"train/loss" in log and b"val/predictions" in log

    resumed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *E2E,
            f"paths.data_root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
            "logger=wandb",
            "schedule.epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.predictions=null",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**clean_env(), **env},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The resume writes into the run it continues: same directory, same W&B run.
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert not (tmp_path / "resumed" / "wandb").exists()


def test_requeued_run_resumes_from_its_own_last_checkpoint(tmp_path):
    first = train_e2e(tmp_path, "schedule.epochs=1", "callbacks.predictions=null")
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # 8 images, 4 per batch
    # The same job again in the same directory (what a SLURM requeue does), now for 2 epochs.
    again = train_e2e(tmp_path, "schedule.epochs=2", "callbacks.predictions=null")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming this run from" in again.stdout + again.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 4  # continued, not restarted


def test_lightning_cli_fit_fast_dev_run(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "msdetr",
        "fit",
        "--config",
        str(ROOT / "configs" / "cli" / "synthetic.yaml"),
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path / 'cli'}",
        f"--data.root={tmp_path / 'synthetic'}",
        "--data.synthetic_train=8",
        "--data.synthetic_val=4",
    ]
    clean = clean_env()
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=clean
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in result.stderr


def test_bf16_forward_backward_keeps_costs_and_losses_fp32():
    torch.manual_seed(0)
    model = tiny_detector("model=deformable_detr_two_stage_refine")
    crit = SetCriterion(
        5,
        [
            Branch("main", HungarianMatcher()),
            Branch("enc_outputs", HungarianMatcher(), suffix="_enc", aux=False, binary=True),
        ],
    )
    targets = [
        {
            "labels": torch.tensor([1, 3]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]]),
        },
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])},
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch())
        losses = crit(out, targets)
        total = crit.total(losses)
    assert out["pred_logits"].dtype == torch.bfloat16  # the network really ran in bf16
    assert all(v.dtype == torch.float32 for v in losses.values())
    costs = HungarianMatcher().cost_matrices(out, targets)
    assert all(c.dtype == torch.float32 for c in costs)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_mixed_training_with_accumulation_logs_throughput(tmp_path):
    cfg = config(
        tmp_path,
        "schedule.epochs=1",
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=2",
        "data.synthetic_train=16",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.log_every_n_steps=1",
        "callbacks.predictions=null",
        "trainer.check_val_every_n_epoch=1",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["AP"] <= 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2  # 4 batches, 2 per optimizer step
    rows = _metrics_rows(tmp_path / "run")
    perf = [r for r in rows if r.get("perf/images_per_sec")]
    assert len(perf) == 2  # one row per optimizer step
    for r in perf:
        assert float(r["perf/images_per_sec"]) > 0 and float(r["perf/peak_mem_gib"]) > 0
        assert 0 < float(r["perf/criterion_share"]) < 1


def test_optuna_sweep_maximizes_validation_ap(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "trainer.fast_dev_run=true",
        *E2E,
        f"paths.data_root={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "callbacks.predictions=null",
    ]
    clean = clean_env()
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=clean
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "schedule.optim.lr" in best and "best_value" in best


def test_slurm_config_runs_one_task_per_gpu():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose(
        "cluster=slurm", "experiment=ms_detr_300", "hydra.launcher.partition=gpu", hydra=True
    )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 8
    assert launcher.nodes == cfg.trainer.num_nodes and launcher.max_num_timeout > 0
    assert cfg.trainer.strategy == "ddp" and cfg.auto_resume


def test_missing_wandb_is_one_sentence(tmp_path, monkeypatch):
    from msdetr.lit.loggers import wandb_logger

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'msdetr\[wandb\]'"):
        wandb_logger(str(tmp_path))
