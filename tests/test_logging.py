"""Every run fully described in its loggers: logger configs that combine, the whole config and the
parameter counts as every logger's hyperparameters, W&B runs grouped by sweep and named by their
overrides, the optimised metric as a config key, the optimizer and LR scheduler as `_partial_`
configs, and the one guarded use of a private Lightning function (DDP ranks under Hydra)."""

import csv
import inspect
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from helpers import ROOT
from helpers.config import compose
from helpers.runs import E2E, clean_env, config
from msdetr.config_schema import ConfigValidationError, validate
from msdetr.lit import DetectionModule
from msdetr.lit import loggers as msdetr_loggers
from msdetr.official import official_optimization, parse_flags
from msdetr.run import build, launch, train
from msdetr.run.summary import optimized_value

# -- logger configs --------------------------------------------------------------------------


def test_logger_configs_combine():
    cfg = compose("logger=[csv,tensorboard,wandb]")
    assert list(cfg.logger) == ["csv", "tensorboard", "wandb"]
    # a resume appends to the same history
    assert cfg.logger.csv.version == cfg.logger.tensorboard.version == 0
    assert cfg.logger.wandb._target_ == "msdetr.lit.loggers.wandb_logger"
    assert list(compose("logger=none").logger) == []
    assert list(compose("logger=[none,csv]").logger) == ["csv"]


def test_build_loggers_skips_null_and_keeps_order(tmp_path):
    cfg = config(tmp_path, "logger=[csv,tensorboard]", "callbacks=none")
    built = build.build_loggers(cfg)
    assert [type(logger).__name__ for logger in built] == ["CSVLogger", "TensorBoardLogger"]
    with open_dict(cfg):
        cfg.logger.tensorboard = None  # logger.tensorboard=null
    assert [type(logger).__name__ for logger in build.build_loggers(cfg)] == ["CSVLogger"]
    trainer = build.build_trainer(config(tmp_path, "logger=none", "callbacks=none"))
    assert trainer.loggers == []


def test_missing_tensorboard_is_one_sentence(tmp_path, monkeypatch):
    real = msdetr_loggers.importlib.util.find_spec
    monkeypatch.setattr(
        msdetr_loggers.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a),
    )
    cfg = config(tmp_path, "logger=[csv,tensorboard]", "callbacks=none")
    with pytest.raises(
        ImportError,
        match=r"^logger=tensorboard needs the tensorboard package; install it with "
        r"pip install 'msdetr\[tensorboard\]'",
    ):
        build.build_trainer(cfg)


# -- the run described in its loggers --------------------------------------------------------


def test_every_logger_gets_the_whole_config_and_parameter_counts(tmp_path):
    cfg = config(
        tmp_path,
        "logger=[csv,tensorboard]",
        "callbacks=none",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "schedule.epochs=1",
        "trainer.check_val_every_n_epoch=1",
    )
    # first: the model's class count may come from the data
    datamodule = build.build_datamodule(cfg)
    module = build.build_module(cfg)
    module.run_config = build.plain_config(cfg)
    trainer = build.build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    # Plain values: `${...}` resolved; only Hydra's own, outside a Hydra app, would stay as written.
    assert module.run_config["trainer"]["max_epochs"] == 1
    (hparams,) = (tmp_path / "run" / "csv").rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert (
        logged["matcher"] == module.run_config["matcher"]
        and logged["model"] == module.run_config["model"]
    )
    assert logged["schedule"]["optim"]["lr"] == cfg.schedule.optim.lr
    counts = logged["num_params"]
    assert counts["total"] == sum(p.numel() for p in module.parameters()) >= counts["trainable"] > 0
    assert counts["parts"]["backbone"] > 0 and sum(counts["parts"].values()) == counts["total"]
    # the module's own hyperparameters are not logged a second time
    assert "lr_backbone" not in logged
    tensorboard = trainer.loggers[1]
    assert tensorboard.hparams["schedule"]["optim"]["lr"] == cfg.schedule.optim.lr
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))


def _wandb_records(path):
    """The records of an offline W&B run file (`run-<id>.wandb`: a LevelDB-style log of protobuf
    records in 32 KiB blocks, each chunk behind a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += (block - pos % block) % block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, or middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run(job_dir):
    """(group, display name, config) of the one offline W&B run in a job's directory."""
    (path,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    group = name = None
    config = {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group, name = record.run.run_group, record.run.display_name
        elif kind == "config":
            config.update({u.key: yaml.safe_load(u.value_json) for u in record.config.update})
    return group, name, config


@pytest.mark.slow
def test_sweep_jobs_describe_themselves_in_csv_and_wandb_and_report(tmp_path):
    """One 2-job sweep (the suite's only end-to-end sweep of the loggers and the report): every
    job's CSV hparams.yaml and offline W&B run hold the whole config and the parameter counts, the
    W&B runs share the sweep's group and are named by their overrides, and report=true writes the
    sweep's table and figures at the end."""
    pytest.importorskip("wandb")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "matcher=hungarian,ms_detr",
        *E2E,
        "logger=[csv,wandb]",
        "schedule.epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "callbacks.predictions=null",
        "report=true",
        f"paths.data_root={tmp_path / 'data'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    clean = clean_env()
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env={**clean, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    groups, names = set(), []
    for job, matcher in (("0", "hungarian"), ("1", "ms_detr")):
        run = tmp_path / "sweep" / job
        (hparams,) = (run / "csv").rglob("hparams.yaml")
        group, name, wandb_config = _wandb_run(run)
        for logged in (yaml.safe_load(hparams.read_text()), wandb_config):
            assert logged["seed"] == 42 and logged["matcher"]["weights"]["ce"] > 0
            assert ("o2m" in logged["matcher"]["criterion"]["branches"]) == (matcher == "ms_detr")
            assert logged["model"]["num_queries"] == 10  # from E2E
            assert logged["schedule"]["optim"]["lr"] > 0 and logged["optimized_metric"] == "val/AP"
            assert logged["paths"]["output_dir"] == str(run)  # resolved, Hydra's interpolations too
            assert logged["num_params"]["total"] >= logged["num_params"]["trainable"] > 0
        groups.add(group)
        names.append(name)
    assert groups == {str(tmp_path / "sweep")}  # one group: the sweep
    assert (
        "matcher=hungarian" in names[0]
        and names[0].replace("matcher=hungarian", "matcher=ms_detr") == names[1]
    )

    # The report (python -m msdetr.report, here through report=true at the end of the sweep).
    out = tmp_path / "sweep" / "report"
    assert f"sweep report: {out / 'report.md'}" in result.stdout
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["overrides"], r["status"], r["epochs"]) for r in rows] == [
        ("0", "matcher=hungarian", "completed", "1"),
        ("1", "matcher=ms_detr", "completed", "1"),
    ]
    for row in rows:
        assert 0.0 <= float(row["AP"]) <= 1.0 and row["AP50"] != "" and row["AR100"] != ""
        assert (
            float(row["wall_time_s"]) > 0
            and float(row["images_per_s"]) > 0
            and float(row["peak_mem_gib"]) > 0
        )
        summary = json.loads((tmp_path / "sweep" / row["job"] / "run_summary.json").read_text())
        assert summary["metrics"]["AP"] == pytest.approx(float(row["AP"]), abs=1e-6)
    for png in (out / "train_loss.png", out / "val_AP.png"):
        assert png.stat().st_size > 5000
    assert "| 0 | matcher=hungarian | completed |" in (out / "report.md").read_text()


def test_wandb_run_name_and_group_outside_and_inside_a_sweep(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    seen = {}

    class FakeWandbLogger:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", FakeWandbLogger)
    msdetr_loggers.wandb_logger(str(tmp_path), name="")
    assert seen["name"] is None and seen["group"] is None  # outside Hydra: W&B picks the name
    cfg = compose("logger=wandb", hydra=True)
    with _hydra_config(cfg, tmp_path, multirun=False):
        msdetr_loggers.wandb_logger(str(tmp_path), name="")
        # a plain run: its job name, no group
        assert seen["name"] == "train" and seen["group"] is None
    with _hydra_config(cfg, tmp_path, multirun=True):
        msdetr_loggers.wandb_logger(str(tmp_path), name="seed=1")
        assert seen["name"] == "seed=1" and seen["group"] == str(tmp_path / "sweep")
        msdetr_loggers.wandb_logger(str(tmp_path), name="seed=1", group="mine")
        assert seen["group"] == "mine"


# -- the optimised metric --------------------------------------------------------------------


def test_optimized_metric_is_a_config_key():
    cfg = compose()
    assert cfg.optimized_metric == "val/AP"
    final = {"AP": 0.25, "AP50": 0.5}
    assert optimized_value(cfg, final) == 0.25
    assert optimized_value(compose("optimized_metric=val/AP50"), final) == 0.5
    with pytest.raises(
        ConfigValidationError,
        match=r"^optimized_metric=val/ap is not a metric of this run; "
        r"its final validation gave val/AP, val/AP50\.$",
    ):
        optimized_value(compose("optimized_metric=val/ap"), final)
    assert optimized_value(cfg, {}) is None  # a single run that never validated: a warning


# -- optimizer and LR scheduler as _partial_ configs -----------------------------------------


def _module(cfg):
    build.build_datamodule(cfg)  # first: the model's class count may come from the data
    return build.build_module(cfg)


def _optimizers(cfg):
    module = _module(cfg)
    configured = module.configure_optimizers()
    return module, configured["optimizer"], configured.get("lr_scheduler")


def _lrs_per_epoch(optimizer, scheduler, epochs: int) -> list[list[float]]:
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_the_schedule_config_is_the_official_optimisation(tmp_path):
    """The schedule's `_partial_` configs (the module's only optimizer path) build what the
    official main.py builds: AdamW over the official parameter groups, x0.1 after --lr_drop
    epochs."""
    cfg = config(
        tmp_path,
        "schedule=12ep",
        "schedule.optim.lr=2e-4",
        "schedule.optim.lr_backbone=1e-5",
        "schedule.optim.lr_drop_epochs=[11]",
    )
    module, optimizer, scheduler = _optimizers(cfg)
    # plain hyperparameters
    assert "optimizer" not in module.hparams and "lr_scheduler" not in module.hparams
    assert module.hparams.param_groups == {
        "lr": 2e-4,
        "lr_backbone": 1e-5,
        "lr_backbone_names": ["backbone.0"],
        "lr_linear_proj_mult": 0.1,
        "lr_linear_proj_names": ["reference_points", "sampling_offsets"],
    }
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 1e-4
    assert [g["name"] for g in optimizer.param_groups] == ["default", "backbone", "linear_proj"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 1e-5, 2e-5])
    assert type(scheduler["scheduler"]) is torch.optim.lr_scheduler.MultiStepLR
    assert scheduler["interval"] == "epoch" and dict(scheduler["scheduler"].milestones) == {11: 1}
    # The official flags' translation (from_official): StepLR(--lr_drop 11), the same in 12 epochs.
    flags = parse_flags(["--lr", "2e-4", "--lr_backbone", "1e-5", "--lr_drop", "11"])
    twin = DetectionModule(
        module.model, module.criterion, **official_optimization(flags, lr_linear_proj_mult=0.1)
    )
    official = twin.configure_optimizers()
    official_optimizer = official["optimizer"]
    official_scheduler = official["lr_scheduler"]["scheduler"]

    def strip(groups):
        return [{k: v for k, v in g.items() if k != "params"} for g in groups]

    assert strip(optimizer.param_groups) == strip(official_optimizer.param_groups)
    assert type(official_scheduler) is torch.optim.lr_scheduler.StepLR
    ours = _lrs_per_epoch(optimizer, scheduler["scheduler"], 12)
    assert ours == _lrs_per_epoch(official_optimizer, official_scheduler, 12)
    assert ours[10] == pytest.approx([2e-4, 1e-5, 2e-5])
    assert ours[11] == pytest.approx([2e-5, 1e-6, 2e-6])


def test_another_optimizer_and_scheduler_from_the_config(tmp_path):
    cfg = config(
        tmp_path,
        "schedule.optimizer._target_=torch.optim.SGD",
        "+schedule.optimizer.momentum=0.9",
        "schedule.lr_scheduler._target_=torch.optim.lr_scheduler.StepLR",
        "~schedule.lr_scheduler.milestones",
        "+schedule.lr_scheduler.step_size=3",
        "schedule.lr_interval=step",
    )
    validate(cfg)  # the schema lets another optimizer's keys through
    _, optimizer, scheduler = _optimizers(cfg)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert [g["name"] for g in optimizer.param_groups] == ["default", "backbone", "linear_proj"]
    assert (
        type(scheduler["scheduler"]) is torch.optim.lr_scheduler.StepLR
        and scheduler["interval"] == "step"
    )
    assert scheduler["scheduler"].step_size == 3
    # schedule.lr_scheduler=null: constant learning rates
    _, optimizer, scheduler = _optimizers(config(tmp_path, "schedule.lr_scheduler=null"))
    assert scheduler is None and type(optimizer) is torch.optim.AdamW
    with pytest.raises(
        ValueError,
        match=r"^the LR scheduler's interval is 'week' "
        r"\(schedule.lr_interval\); use 'epoch' or 'step'.$",
    ):
        _module(config(tmp_path, "schedule.lr_interval=week"))
    # A module built without an optimizer evaluates, and refuses to train in one sentence.
    module = _module(cfg)
    bare = DetectionModule(module.model, module.criterion)
    with pytest.raises(
        ValueError,
        match=r"built without an optimizer, so it cannot train; pass "
        r"optimizer=",
    ):
        bare.configure_optimizers()


def test_checkpoint_hyperparameters_stay_plain(tmp_path):
    cfg = config(
        tmp_path,
        "schedule.epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.predictions=null",
        "callbacks.throughput=null",
        "schedule.optimizer._target_=torch.optim.SGD",
    )
    train(cfg)
    # no pickled callables
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["name"] == "default"
    assert "optimizer" not in saved["hyper_parameters"]
    assert saved["msdetr_config"]["schedule"]["optimizer"]["_target_"] == "torch.optim.SGD"


# -- DDP ranks under Hydra: the one private Lightning function, guarded ----------------------


class _hydra_config:
    """HydraConfig set as inside a job of a Hydra app (single run or multirun), then restored."""

    def __init__(self, cfg, tmp_path, multirun: bool):
        from hydra.types import RunMode

        self.cfg = cfg.copy()
        with open_dict(self.cfg):
            hydra_cfg = self.cfg.hydra
            hydra_cfg.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            hydra_cfg.sweep.dir = str(tmp_path / "sweep")
            hydra_cfg.runtime.output_dir = str(tmp_path / "run")
            hydra_cfg.runtime.cwd = str(tmp_path)
            hydra_cfg.job.name = "train"

    def __enter__(self):
        self.saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(self.cfg)
        return self.cfg

    def __exit__(self, *exc):
        HydraConfig.instance().cfg = self.saved


def test_lightning_starts_ddp_ranks_with_this_jobs_command(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers import subprocess_script

    module_name, attribute = launch._LIGHTNING_RANK_COMMAND
    assert module_name == subprocess_script.__name__
    original = getattr(subprocess_script, attribute)
    # what the patch relies on
    assert list(inspect.signature(original).parameters) == ["local_rank"]
    assert L.__version__.startswith(launch._LIGHTNING_TESTED + ".")  # pyproject pins this minor

    started = []
    monkeypatch.setattr(
        subprocess_script.subprocess,
        "Popen",
        lambda command, env, cwd: started.append((command, env["LOCAL_RANK"], cwd)),
    )
    # The launcher writes its variables into os.environ: into a copy, dropped after the test.
    monkeypatch.setattr(os, "environ", clean_env())
    cfg = compose("trainer=ddp", hydra=True)
    (tmp_path / "run").mkdir()
    with _hydra_config(cfg, tmp_path, multirun=True):
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        with launch._rank_launch_patch(job_cfg):
            launcher = subprocess_script._SubprocessScriptLauncher(
                LightningEnvironment(), num_processes=2, num_nodes=1
            )
            launcher._call_children_scripts()
        expected = launch._rank_command(job_cfg)(1)
    assert getattr(subprocess_script, attribute) is original  # put back
    ((command, local_rank, cwd),) = started
    assert (command, cwd) == (expected[0], expected[1]) and local_rank == "1"
    assert (
        f"hydra.run.dir={tmp_path / 'run'}" in command
        and "hydra.job.name=train_ddp_rank1" in command
    )
    assert command[command.index("--config-path") + 1] == str(tmp_path / "run" / ".ddp")
    assert OmegaConf.load(tmp_path / "run" / ".ddp" / "config.yaml").trainer.strategy == "ddp"


def test_a_changed_lightning_launcher_is_one_sentence(monkeypatch):
    from lightning.pytorch.strategies.launchers import subprocess_script

    monkeypatch.setattr(
        subprocess_script, launch._LIGHTNING_RANK_COMMAND[1], lambda rank, cwd: None
    )
    with pytest.raises(
        RuntimeError,
        match=r"this Lightning version .* changed how it starts DDP ranks under Hydra.*"
        r"pin lightning==2\.6\.\* or start the ranks with torchrun",
    ):
        with launch._rank_launch_patch(compose()):
            pass
    monkeypatch.delattr(subprocess_script, launch._LIGHTNING_RANK_COMMAND[1])
    with pytest.raises(RuntimeError, match="is gone or different"):
        with launch._rank_launch_patch(compose()):
            pass


def test_only_a_ddp_launch_patches_lightning(tmp_path):
    single = build.build_trainer(config(tmp_path, "logger=none", "callbacks=none"))
    assert not launch._launches_rank_processes(single)
    ddp = build.build_trainer(
        config(
            tmp_path,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "logger=none",
            "callbacks=none",
        )
    )
    assert launch._launches_rank_processes(ddp)
