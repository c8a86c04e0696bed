"""The sweep report (python -m msdetr.report, report=true): table, labels, figures, W&B table, bad
directories."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import compose
from msdetr.report import Job, SweepReport, label_jobs, main, write_report


def _job(
    sweep: Path,
    name: str,
    overrides: list[str],
    rows: list[dict] | None = None,
    summary: dict | None = None,
    config: dict | None = None,
) -> Path:
    """A hand-made job directory of a multirun: .hydra/, csv/version_0/metrics.csv,
    run_summary.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump(config or {"logger": {"csv": {"version": 0}}})
    )
    if rows is not None:
        header = sorted({k for row in rows for k in row})
        (job / "csv" / "version_0").mkdir(parents=True)
        with open(job / "csv" / "version_0" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    if summary is not None:
        (job / "run_summary.json").write_text(json.dumps(summary))
    return job


def _val(epoch: int, step: int, ap: float) -> dict:
    # APl is absent, as when the validation set has no large objects (NaN is not logged)
    return {
        "epoch": epoch,
        "step": step,
        "val/AP": ap,
        "val/AP50": 2 * ap,
        "val/AP75": ap / 2,
        "val/APs": ap,
        "val/APm": ap,
        "val/AR100": 0.5,
    }


def _rows(
    ap_per_epoch: list[float], speeds=(10.0, 30.0, 20.0), peaks=(1.0, 1.5, 1.25)
) -> list[dict]:
    rows, step = [], 0
    for epoch, ap in enumerate(ap_per_epoch):
        for _ in range(2):
            rows.append({"epoch": epoch, "step": step, "train/loss": 40.0 - step})
            step += 1
        rows.append(_val(epoch, step - 1, ap))
    for i, (speed, peak) in enumerate(zip(speeds, peaks)):
        rows.append({"step": i, "perf/images_per_sec": speed, "perf/peak_mem_gib": peak})
    return rows


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    _job(
        sweep,
        "0",
        ["data.batch_size=4", "matcher=hungarian", "seed=1"],
        _rows([0.125, 0.25]),
        summary={"status": "completed", "wall_time_s": 65.0, "epochs": 2, "metrics": {"AP": 0.25}},
    )
    # no summary: killed
    _job(sweep, "1", ["data.batch_size=4", "matcher=ms_detr", "seed=1"], _rows([0.5]))
    # failed before logging anything
    _job(sweep, "2", ["data.batch_size=4", "matcher=ms_detr", "seed=2"])
    (sweep / "multirun.yaml").write_text("{}\n")
    return sweep


def test_table_of_hand_made_jobs(tmp_path):
    sweep = _sweep(tmp_path)
    written = write_report(sweep)
    out = sweep / "report"
    assert written["csv"] == out / "report.csv" and written["wandb"] is None  # no job used W&B
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    # labelled by the overrides that differ; the common one is left out of the label
    assert [r["overrides"] for r in rows] == [
        "matcher=hungarian, seed=1",
        "matcher=ms_detr, seed=1",
        "matcher=ms_detr, seed=2",
    ]
    assert rows[0]["all_overrides"] == "data.batch_size=4 matcher=hungarian seed=1"
    assert [r["status"] for r in rows] == ["completed", "no summary", "no metrics"]
    done, killed, failed = rows
    # the final validation's values (the last epoch's), as logged; a metric never logged is blank
    assert float(done["AP"]) == 0.25 and float(done["AP50"]) == 0.5 and float(done["AR100"]) == 0.5
    assert done["APl"] == ""
    assert done["epochs"] == "2" and float(done["wall_time_s"]) == 65.0
    assert float(done["images_per_s"]) == 20.0 and float(done["peak_mem_gib"]) == 1.5  # median, max
    # epochs from the metrics themselves
    assert float(killed["AP"]) == 0.5 and killed["epochs"] == "1"
    assert float(killed["wall_time_s"]) >= 0.0  # from the file times
    assert all(
        failed[c] == "" for c in ("AP", "epochs", "wall_time_s", "images_per_s", "peak_mem_gib")
    )

    md = (out / "report.md").read_text()
    assert (
        "| job | overrides | status | AP | AP50 | AP75 | APs | APm | APl | AR100 | epochs | wall "
        "time |" in md
    )
    assert "| 0 | matcher=hungarian, seed=1 | completed | 25.0 |" in md  # in %
    # the best AP is a job that did not finish: never in bold (one completed job: nothing to
    # compare)
    assert (
        "| 1 | matcher=ms_detr, seed=1 | no summary | 50.0 |" in md
        and "**" not in md.split("Overrides")[0]
    )
    assert "1m 05s" in md
    assert "Overrides common to every job: `data.batch_size=4`." in md
    assert "![train_loss](train_loss.png)" in md and "![val_AP](val_AP.png)" in md
    for png in (out / "train_loss.png", out / "val_AP.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_diverged_failed_and_stopped_jobs_are_marked_and_never_bold(tmp_path):
    """Issue 20: a diverged job validated a broken model to the sweep's best AP and was bolded."""
    sweep = tmp_path / "sweep"
    for name, status, ap in [
        ("0", "completed", 0.25),
        ("1", "diverged", 0.43),
        ("2", "completed", 0.125),
        ("3", "failed", 0.5),
        ("4", "stopped", 0.75),
    ]:
        _job(sweep, name, [f"seed={name}"], _rows([ap]), summary={"status": status, "epochs": 1})
    (sweep / "multirun.yaml").write_text("{}\n")
    write_report(sweep)
    md = (sweep / "report" / "report.md").read_text()
    assert "| 0 | seed=0 | completed | **25.0** |" in md  # the best of the completed jobs
    for line in (
        "| 1 | seed=1 | diverged | 43.0 |",
        "| 3 | seed=3 | failed | 50.0 |",
        "| 4 | seed=4 | stopped | 75.0 |",
    ):
        assert line in md
    assert "*diverged*: training stopped on steps that were not finite" in md


def test_other_metric_and_out_dir(tmp_path):
    sweep = _sweep(tmp_path)
    assert (
        main(
            [str(sweep), "--out", str(tmp_path / "elsewhere"), "--metric", "val/AP50", "--no-wandb"]
        )
        == 0
    )
    assert (tmp_path / "elsewhere" / "val_AP50.png").stat().st_size > 5000
    assert not (sweep / "report").exists()


def _bare(name: str, overrides: list[str]) -> Job:
    return Job(name, Path(name), overrides, "completed")


def test_labels_name_only_what_differs():
    jobs = [
        _bare("0", ["a=1", "b=x"]),
        _bare("1", ["a=2", "b=x"]),
        _bare("2", ["a=2", "b=x", "+c=3"]),
    ]
    label_jobs(jobs)
    # a key that only some jobs have differs too
    assert [j.label for j in jobs] == ["a=1", "a=2", "a=2, +c=3"]
    twins = [_bare("0", ["a=1"]), _bare("1", ["a=1"]), _bare("2", ["a=2"])]
    label_jobs(twins)
    assert [j.label for j in twins] == ["a=1 (job 0)", "a=1 (job 1)", "a=2"]
    same = [_bare("0", ["a=1"]), _bare("1", ["a=1"])]
    label_jobs(same)
    assert [j.label for j in same] == ["job 0", "job 1"]


def test_many_jobs_stay_readable(tmp_path):
    sweep = tmp_path / "sweep"
    for i in range(14):
        _job(
            sweep,
            str(i),
            [f"seed={i}"],
            _rows([0.01 * i, 0.02 * i]),
            summary={"status": "completed", "wall_time_s": 1.0, "epochs": 2},
        )
    written = write_report(sweep)
    with open(written["csv"], newline="") as f:
        assert [r["job"] for r in csv.DictReader(f)] == [str(i) for i in range(14)]  # numeric order
    assert written["metric_figure"].stat().st_size > 5000


def test_not_a_sweep_directory_in_one_sentence(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("unless hydra.sweep.dir is set).")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a Hydra multirun directory" in err and err.count("\n") == 0
    single = tmp_path / "single"
    (single / ".hydra").mkdir(parents=True)
    (single / ".hydra" / "overrides.yaml").write_text("[]\n")
    assert main([str(single)]) == 2
    assert "is a single run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    cli = subprocess.run(
        [sys.executable, "-m", "msdetr.report", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
    )
    assert (
        cli.returncode == 2
        and cli.stderr.startswith("msdetr.report: ")
        and cli.stderr.count("\n") == 1
    )


def test_report_true_configures_the_hydra_callback(tmp_path):
    off = compose(hydra=True)
    on = compose("report=true", hydra=True)
    assert not instantiate(off.hydra.callbacks.sweep_report).enabled  # listed, idle by default
    assert instantiate(on.hydra.callbacks.sweep_report).enabled
    sweep = _sweep(tmp_path)
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep)}}, "optimized_metric": "val/AP50"}
    )
    SweepReport(enabled=False).on_multirun_end(config=config)
    assert not (sweep / "report").exists()
    SweepReport(enabled=True).on_multirun_end(config=config)
    assert (sweep / "report" / "report.csv").is_file() and (
        sweep / "report" / "val_AP50.png"
    ).is_file()


def test_wandb_table_in_the_sweeps_group(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = tmp_path / "sweep"
    config = {"logger": {"wandb": {"project": "msdetr-test", "group": None}}}
    for i in range(2):
        _job(
            sweep,
            str(i),
            [f"seed={i}", "logger=[csv,wandb]"],
            _rows([0.1 * (i + 1)]),
            config=config,
            summary={
                "status": "completed",
                "wall_time_s": 3.0,
                "epochs": 1,
                "wandb_group": str(sweep),
            },
        )
    written = write_report(sweep)
    run_dir = Path(written["wandb"])
    assert run_dir.is_relative_to(sweep / "report" / "wandb")
    (table,) = run_dir.glob("media/table/sweep_report_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:4] == ["job", "overrides", "status", "AP"]
    assert [row[:3] for row in logged["data"]] == [
        ["0", "seed=0", "completed"],
        ["1", "seed=1", "completed"],
    ]
    assert logged["data"][1][3] == pytest.approx(0.2)


# The end-to-end sweep with report=true runs in tests/test_logging.py (one sweep for both).
