"""The sweep report (python -m msdetr.report, report=true): the jobs' table, labels, figures, W&B
tables, bad directories; configurations over seeds, the bootstrap comparison with a baseline, the
banded figures, mask columns and the Optuna section."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers.config import compose
from msdetr.report import (
    Job,
    Options,
    ReportOptionError,
    SweepReport,
    bootstrap_difference,
    configurations,
    label_jobs,
    main,
    plot_metric,
    read_job,
    write_report,
)


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
    # the two seeds are one configuration, in a second table
    (configs,) = run_dir.glob("media/table/sweep_configurations_*.table.json")
    logged = json.loads(configs.read_text())
    row = dict(zip(logged["columns"], logged["data"][0]))
    assert len(logged["data"]) == 1 and row["configuration"] == "all jobs" and row["n"] == 2
    assert row["AP_mean"] == pytest.approx(0.15)


# -- configurations over seeds ------------------------------------------------------------------


def _done(ap: float, **summary) -> dict:
    return {"status": "completed", "wall_time_s": 10.0, "epochs": 2, **summary}


def _seeded(tmp_path: Path, aps: dict[str, dict[int, float]], statuses=None, common=()) -> Path:
    """A sweep of matcher x seed, one job per (matcher, seed) with its final AP."""
    sweep = tmp_path / "sweep"
    statuses = statuses or {}
    i = 0
    for matcher, by_seed in aps.items():
        for seed, ap in by_seed.items():
            status = statuses.get((matcher, seed), "completed")
            _job(
                sweep,
                str(i),
                [*common, f"matcher={matcher}", f"seed={seed}"],
                _rows([0.0625, ap]),
                summary={"status": status, "wall_time_s": 10.0, "epochs": 2},
            )
            i += 1
    (sweep / "multirun.yaml").write_text("{}\n")
    return sweep


def _configs_csv(sweep: Path) -> dict[str, dict]:
    with open(sweep / "report" / "configs.csv", newline="") as f:
        return {row["configuration"]: row for row in csv.DictReader(f)}


def test_jobs_differing_only_in_seed_keys_are_one_configuration():
    jobs = [
        _bare("0", ["data.batch_size=4", "matcher=a", "seed=1", "data.seed=7"]),
        _bare("1", ["data.batch_size=4", "matcher=a", "seed=2", "data.seed=8"]),
        _bare("2", ["data.batch_size=4", "matcher=b", "+seed=1", "data.seed=7"]),
        _bare("3", ["data.batch_size=4", "matcher=b", "seed=2", "data.seed=8", "lr=2"]),
    ]
    # by default only `seed` repeats (a `+seed` too): data.seed separates the jobs
    assert [c.label for c in configurations(jobs, Options())] == [
        "matcher=a, data.seed=7",
        "matcher=a, data.seed=8",
        "matcher=b, data.seed=7",
        "matcher=b, data.seed=8, lr=2",
    ]
    configs = configurations(jobs, Options.parse(seed_keys="seed,data.seed"))
    assert [(c.label, [j.name for j in c.jobs]) for c in configs] == [
        ("matcher=a", ["0", "1"]),
        ("matcher=b", ["2"]),
        ("matcher=b, lr=2", ["3"]),  # another learning rate: another configuration
    ]
    assert jobs[0].repeat == ("seed=1", "data.seed=7")
    # --group-by: exactly these keys define a configuration, everything else repeats it
    configs = configurations(jobs, Options.parse(group_by="matcher"))
    assert [(c.label, [j.name for j in c.jobs]) for c in configs] == [
        ("matcher=a", ["0", "1"]),
        ("matcher=b", ["2", "3"]),
    ]
    assert jobs[3].repeat == ("data.batch_size=4", "seed=2", "data.seed=8", "lr=2")
    assert [c.label for c in configurations(jobs, Options.parse(group_by="data.batch_size"))] == [
        "all jobs"
    ]
    with pytest.raises(ReportOptionError) as err:
        configurations(jobs, Options.parse(group_by="matcher,model"))
    assert str(err.value) == (
        "--group-by model: no job of the sweep overrides this key; the keys its jobs override are "
        "data.batch_size, matcher, seed, data.seed, lr."
    )


def test_configuration_mean_std_and_n(tmp_path):
    sweep = _seeded(
        tmp_path,
        {"hungarian": {1: 0.25, 2: 0.5, 3: 0.375}, "ms_detr": {1: 0.5}},
        common=["data.batch_size=4"],
    )
    written = write_report(sweep)
    assert written["configs_csv"] == sweep / "report" / "configs.csv"
    rows = _configs_csv(sweep)
    assert list(rows) == ["matcher=hungarian", "matcher=ms_detr"]
    hungarian, ms_detr = rows.values()
    assert hungarian["overrides"] == "data.batch_size=4 matcher=hungarian"
    assert (hungarian["n"], hungarian["jobs"], hungarian["excluded_jobs"]) == ("3", "0 1 2", "")
    # mean, sample std (ddof=1), n; AP50 is 2 AP in _val
    assert float(hungarian["AP_mean"]) == 0.375 and float(hungarian["AP_std"]) == 0.125
    assert float(hungarian["AP50_mean"]) == 0.75 and float(hungarian["AP50_std"]) == 0.25
    assert hungarian["AP_n"] == "3" and hungarian["APl_n"] == "0" and hungarian["APl_mean"] == ""
    assert float(hungarian["images_per_s"]) == 20.0 and float(hungarian["peak_mem_gib"]) == 1.5
    # one seed: a mean, no spread
    assert float(ms_detr["AP_mean"]) == 0.5 and ms_detr["AP_std"] == "" and ms_detr["n"] == "1"
    assert "baseline" not in hungarian  # no baseline, no comparison columns
    md = (sweep / "report" / "report.md").read_text()
    assert "| matcher=hungarian | 3 | 37.5 ± 12.5 | 75.0 ± 25.0 |" in md
    assert "| matcher=ms_detr | 1 | 50.0 ± — | 100.0 ± — |" in md
    # the baseline is never guessed, even with a matcher=hungarian configuration
    assert "No baseline given: --baseline KEY=VALUE (e.g. matcher=hungarian)" in md
    # the per-job table stays, as its own section after the configurations
    assert md.index("## Configurations") < md.index("## Figures") < md.index("## Jobs")
    assert "| 0 | matcher=hungarian, seed=1 | completed | 25.0 |" in md


def test_failed_diverged_and_unfinished_jobs_are_left_out_and_listed(tmp_path):
    sweep = _seeded(
        tmp_path,
        {"hungarian": {1: 0.25, 2: 0.5, 3: 0.875}, "ms_detr": {1: 0.5, 2: 0.75, 3: 0.125}},
        statuses={("hungarian", 3): "diverged", ("ms_detr", 3): "failed"},
    )
    _job(sweep, "6", ["matcher=ms_detr", "seed=4"], _rows([0.9]))  # no summary: still running
    write_report(sweep)
    rows = _configs_csv(sweep)
    assert float(rows["matcher=hungarian"]["AP_mean"]) == 0.375  # 0.875 (diverged) left out
    assert rows["matcher=hungarian"]["excluded_jobs"] == "2"
    assert float(rows["matcher=ms_detr"]["AP_mean"]) == 0.625
    assert (rows["matcher=ms_detr"]["n"], rows["matcher=ms_detr"]["excluded_jobs"]) == ("2", "5 6")
    md = (sweep / "report" / "report.md").read_text()
    listed = md.split("Left out of the means, comparisons and figures")[1].split("##")[0]
    assert "| job | configuration | status |" in listed
    for line in (
        "| 2 | matcher=hungarian | diverged |",
        "| 5 | matcher=ms_detr | failed |",
        "| 6 | matcher=ms_detr | no summary |",
    ):
        assert line in listed
    assert "| 0 | matcher=hungarian | completed |" not in listed


# -- the bootstrap comparison -------------------------------------------------------------------


def _seeds(*values: float) -> list[tuple[tuple[str, ...], float]]:
    return [((f"seed={i}",), v) for i, v in enumerate(values, start=1)]


def test_paired_bootstrap_of_a_constant_difference_is_that_difference():
    base = _seeds(0.25, 0.5, 0.375)
    other = _seeds(0.375, 0.625, 0.5)  # each seed 0.125 better
    d = bootstrap_difference(base, other)
    assert d.paired and d.n == (3, 3)
    assert (d.diff, d.low, d.high) == (0.125, 0.125, 0.125) and d.beyond_noise
    # pairs match by seed, not by order
    d = bootstrap_difference(base, list(reversed(other)))
    assert d.paired and (d.low, d.high) == (0.125, 0.125)


def test_bootstrap_excludes_zero_only_beyond_seed_noise():
    base = _seeds(0.25, 0.5, 0.375)
    far = bootstrap_difference(base, _seeds(0.375, 0.5625, 0.5))  # +1/8, +1/16, +1/8
    assert far.paired and 0.0625 <= far.low < far.diff < far.high <= 0.125 and far.beyond_noise
    noisy = bootstrap_difference(base, _seeds(0.3125, 0.4375, 0.40625))  # +1/16, -1/16, +1/32
    assert noisy.low < 0 < noisy.high and not noisy.beyond_noise
    assert noisy.diff == pytest.approx(1 / 96)
    # the fixed generator: the same interval every time
    assert bootstrap_difference(base, _seeds(0.3125, 0.4375, 0.40625)) == noisy


def test_unpaired_when_the_seeds_differ_and_no_interval_with_one_seed():
    base = [(("seed=1",), 0.25), (("seed=2",), 0.25)]
    other = [(("seed=3",), 0.5), (("seed=4",), 0.5), (("seed=5",), 0.5)]
    d = bootstrap_difference(base, other)
    assert not d.paired and (d.diff, d.low, d.high) == (0.25, 0.25, 0.25)
    spread = bootstrap_difference(base, [(("seed=3",), 0.0), (("seed=4",), 1.0)])
    assert not spread.paired and spread.low < 0.25 < spread.high  # each side resampled alone
    assert spread.low >= -0.25 and spread.high <= 0.75
    one = bootstrap_difference(base, [(("seed=1",), 0.5)])
    assert one.diff == 0.25 and one.low is None and not one.beyond_noise


def test_comparison_with_a_baseline_in_the_report(tmp_path):
    sweep = _seeded(
        tmp_path,
        {
            "hungarian": {1: 0.25, 2: 0.5, 3: 0.375},
            "ms_detr": {1: 0.375, 2: 0.625, 3: 0.5},  # +0.125 on every seed: paired
            "deta": {1: 0.5, 2: 0.5, 4: 0.5},  # seed 4: unpaired
            "h_detr": {1: 0.5},  # one seed: no interval
        },
    )
    assert main([str(sweep), "--baseline", "matcher=hungarian", "--no-wandb"]) == 0
    rows = _configs_csv(sweep)
    assert rows["matcher=hungarian"]["baseline"] == "True"
    assert rows["matcher=hungarian"]["AP_diff"] == ""  # the baseline is not compared to itself
    ms_detr = rows["matcher=ms_detr"]
    assert float(ms_detr["AP_diff"]) == 0.125 and float(ms_detr["AP_ci_low"]) == 0.125
    assert ms_detr["AP_paired"] == "True" and ms_detr["AP_beyond_noise"] == "True"
    assert rows["matcher=deta"]["AP_paired"] == "False"
    assert rows["matcher=h_detr"]["AP_ci_low"] == "" and float(rows["matcher=h_detr"]["AP_diff"])
    md = (sweep / "report" / "report.md").read_text()
    assert "## Compared with matcher=hungarian" in md
    assert "| matcher=ms_detr | 3 | paired | +12.5 [+12.5, +12.5] \\* |" in md
    assert "| matcher=deta | 3 | unpaired | +12.5 [" in md
    assert "| matcher=h_detr | 1 | — | +12.5 (no CI) |" in md
    assert "a screen for what to rerun with more seeds, not as a significance test" in md
    assert "No CI: one side has a single completed seed" in md
    # repeated flags and comma-separated pairs name the same baseline
    assert Options.parse(baseline=["matcher=hungarian", "seed=1"]).baseline == (
        ("matcher", "hungarian"),
        ("seed", "1"),
    )
    assert Options.parse(baseline="matcher=hungarian,seed=1") == Options.parse(
        baseline=["matcher=hungarian", "seed=1"]
    )


def test_unknown_or_ambiguous_baseline_is_refused_in_one_sentence(tmp_path, capsys):
    sweep = _seeded(
        tmp_path, {"hungarian": {1: 0.25}, "ms_detr": {1: 0.5}}, common=["data.batch_size=4"]
    )
    assert main([str(sweep), "--baseline", "matcher=hungrian", "--no-wandb"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "msdetr.report: --baseline matcher=hungrian matches no configuration of the sweep; its "
        "configurations are: matcher=hungarian; matcher=ms_detr.\n"
    )
    assert main([str(sweep), "--baseline", "data.batch_size=4", "--no-wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matches 2 configurations" in err
    assert main([str(sweep), "--baseline", "hungarian", "--no-wandb"]) == 2
    assert "--baseline takes KEY=VALUE overrides" in capsys.readouterr().err
    assert not (sweep / "report").exists()  # nothing written


# -- banded figures -----------------------------------------------------------------------------


def test_banded_figures_one_mean_per_configuration(tmp_path):
    sweep = _seeded(
        tmp_path,
        {"hungarian": {1: 0.25, 2: 0.5, 3: 0.375}, "ms_detr": {1: 0.5, 2: 0.625}},
        statuses={("ms_detr", 2): "diverged"},
    )
    # a completed job whose validations stopped an epoch early: out of the band
    _job(sweep, "5", ["matcher=ms_detr", "seed=3"], _rows([0.75]), summary=_done(0.75))
    jobs = [read_job(p) for p in sorted(sweep.iterdir()) if p.is_dir()]
    configs = configurations(jobs, Options())
    for band in ("minmax", "std"):
        drawing = plot_metric(configs, "val/AP", tmp_path / f"{band}.png", "t", band)
        assert drawing.drawn == 2 and drawing.path.stat().st_size > 5000
        assert [(j.name, c.label) for j, c in drawing.shorter] == [("5", "matcher=ms_detr")]
    written = write_report(sweep, options=Options.parse(band="std"))
    for figure in (written["loss_figure"], written["metric_figure"]):
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    md = written["markdown"].read_text()
    assert "mean ± 1 sample standard deviation" in md
    assert "their curves being shorter than the rest of their configuration's: job 5" in md


def test_more_configurations_than_a_figure_reads_well_are_said(tmp_path):
    sweep = tmp_path / "sweep"
    for i in range(10):
        _job(sweep, str(i), [f"model.hidden_dim={8 * (i + 1)}"], _rows([0.01 * i]), _done(0))
    written = write_report(sweep)
    md = written["markdown"].read_text()
    assert "10 configurations: the figures are hard to read beyond 8" in md
    jobs = [read_job(sweep / str(i)) for i in range(10)]
    drawing = plot_metric(configurations(jobs, Options()), "val/AP", tmp_path / "m.png", "t")
    assert drawing.drawn == 10


# -- mask metrics -------------------------------------------------------------------------------


def test_mask_columns_only_when_a_job_logged_them(tmp_path):
    sweep = _seeded(tmp_path, {"hungarian": {1: 0.25}, "ms_detr": {1: 0.5}})
    write_report(sweep)
    assert "mask AP" not in (sweep / "report" / "report.md").read_text()
    assert "mask_" not in (sweep / "report" / "report.csv").read_text()
    assert "mask_" not in (sweep / "report" / "configs.csv").read_text()

    masked = tmp_path / "masked"
    for i, seed in enumerate((1, 2)):
        rows = _rows([0.25])
        rows[2].update({"val/mask_AP": 0.125 * seed, "val/mask_AR100": 0.5})
        _job(masked, str(i), [f"seed={seed}", "+parts=mask_head"], rows, summary=_done(0.25))
    _job(masked, "2", ["seed=3", "+parts=mask_head"], _rows([0.25]), summary={"status": "failed"})
    write_report(masked)
    with open(masked / "report" / "report.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        jobs = list(reader)
    assert header[header.index("AR100") + 1 : header.index("epochs")] == [
        "mask_AP",
        "mask_AP50",
        "mask_AP75",
        "mask_APs",
        "mask_APm",
        "mask_APl",
        "mask_AR100",
    ]
    assert float(jobs[1]["mask_AP"]) == 0.25 and jobs[2]["mask_AP"] == ""
    (config,) = _configs_csv(masked).values()
    assert float(config["mask_AP_mean"]) == 0.1875 and config["mask_AP_n"] == "2"
    md = (masked / "report" / "report.md").read_text()
    assert "| AR100 | mask AP | mask AP50 |" in md and "| 18.8 ± 8.8 |" in md


# -- Optuna sweeps ------------------------------------------------------------------------------

_SEARCH = {
    "schedule.optim.lr": "tag(log, interval(5.0e-5, 5.0e-4))",
    "matcher.weights.ce": "choice(1.0, 2.0)",
    "model.num_queries": "range(100, 300, 100)",
    "schedule.epochs": "12",  # fixed: not searched
}
# job: (lr, ce, queries, final AP)
_TRIALS = [
    (1.0e-4, 1.0, 100, 0.25),
    (3.0e-4, 2.0, 200, 0.5),
    (6.0e-5, 1.0, 300, 0.125),
    (4.5e-4, 2.0, 100, 0.625),
    (2.0e-4, 1.0, 200, 0.375),
    (1.5e-4, 2.0, 300, 0.4375),
]


def _optuna_sweep(tmp_path: Path, direction: str = "maximize", metric: str = "val/AP") -> Path:
    sweep = tmp_path / "optuna"
    for i, (lr, ce, queries, ap) in enumerate(_TRIALS):
        _job(
            sweep,
            str(i),
            [
                "hparams_search=optuna",
                f"schedule.optim.lr={lr}",
                f"matcher.weights.ce={ce}",
                f"model.num_queries={queries}",
                "schedule.epochs=12",
            ],
            _rows([0.0625, ap]),
            summary=_done(ap),
        )
    # a trial that failed: no value for Optuna
    _job(
        sweep,
        "6",
        ["hparams_search=optuna", "schedule.optim.lr=0.0004", "matcher.weights.ce=1.0"],
        summary={"status": "failed"},
    )
    sweeper = {
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "direction": direction,
        "study_name": "msdetr",
        "n_trials": 7,
        "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": "${seed}"},
        "params": _SEARCH,
    }
    multirun = {"hydra": {"sweeper": sweeper}, "seed": 42, "optimized_metric": metric}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun, sort_keys=False))
    best = max(_TRIALS, key=lambda t: t[3])
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "optuna",
                "best_params": {"schedule.optim.lr": best[0], "matcher.weights.ce": best[1]},
                "best_value": best[3],
            }
        )
    )
    return sweep


def _top_trials(md: str) -> list[list[str]]:
    section = md.split("## Optuna search")[1].split("##")[0]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\| \d+ \|", line)
    ]


def test_optuna_sweep_top_trials_and_importances(tmp_path):
    pytest.importorskip("sklearn")
    sweep = _optuna_sweep(tmp_path)
    assert main([str(sweep), "--top", "3", "--no-wandb"]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "6 of 7 trials completed with a value of `val/AP` (maximize); the top 3, in %:" in md
    assert (
        "| rank | job | val/AP | schedule.optim.lr | matcher.weights.ce | model.num_queries |" in md
    )
    assert _top_trials(md) == [
        ["1", "3", "62.50", "0.00045", "2.0", "100"],
        ["2", "1", "50.00", "0.0003", "2.0", "200"],
        ["3", "5", "43.75", "0.00015", "2.0", "300"],
    ]
    assert "optimization_results.yaml: best value 0.625" in md
    importances = {
        line.split("|")[1].strip(): float(line.split("|")[2])
        for line in md.split("| parameter | importance |")[1].split("\n\n")[0].splitlines()[2:]
    }
    # the searched params, not the fixed one, summing to 1
    assert set(importances) == {"schedule.optim.lr", "matcher.weights.ce", "model.num_queries"}
    assert sum(importances.values()) == pytest.approx(1.0, abs=2e-3)  # rounded to 3 decimals
    assert "Parameter importance: Optuna's" in md and "over the 6 completed trials" in md
    assert (sweep / "report" / "param_importance.png").stat().st_size > 5000
    assert "![param_importance](param_importance.png)" in md


def test_optuna_sweep_minimized_and_too_few_trials(tmp_path):
    sweep = _optuna_sweep(tmp_path, direction="minimize")
    write_report(sweep, options=Options.parse(top=2))
    md = (sweep / "report" / "report.md").read_text()
    assert [row[:3] for row in _top_trials(md)] == [["1", "2", "12.50"], ["2", "0", "25.00"]]
    few = tmp_path / "few"
    few.mkdir()
    for name in ("multirun.yaml", "optimization_results.yaml"):
        (few / name).write_text((sweep / name).read_text())
    (sweep / "0").rename(few / "0")
    write_report(few)
    assert (
        "Parameter importance needs at least 2 completed trials with a value; the sweep has 1."
        in (few / "report" / "report.md").read_text()
    ) or "needs scikit-learn" in (few / "report" / "report.md").read_text()


def test_optuna_importance_without_scikit_learn_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    sweep = _optuna_sweep(tmp_path)
    written = write_report(sweep)
    md = written["markdown"].read_text()
    assert (
        "Parameter importance needs scikit-learn, which is not installed here "
        "(pip install 'msdetr[sweep]')." in md
    )
    assert len(_top_trials(md)) == 5 and written["importance_figure"] is None


def test_a_plain_sweep_has_no_optuna_section(tmp_path):
    sweep = _sweep(tmp_path)
    write_report(sweep)
    assert "Optuna" not in (sweep / "report" / "report.md").read_text()


# -- the Hydra callback's options ---------------------------------------------------------------


def test_report_keys_configure_the_hydra_callback(tmp_path, capsys):
    cfg = compose(
        "report=true",
        "report_seed_keys=[seed,data.seed]",
        "report_group_by=[matcher]",
        "report_baseline='matcher=hungarian'",
        "report_band=std",
        "report_top=3",
        hydra=True,
    )
    callback = instantiate(cfg.hydra.callbacks.sweep_report)
    assert callback.options == Options(
        seed_keys=("seed", "data.seed"),
        group_by=("matcher",),
        baseline=(("matcher", "hungarian"),),
        band="std",
        top=3,
        cli=False,
    )
    # the defaults: report=true alone still works
    assert instantiate(compose("report=true", hydra=True).hydra.callbacks.sweep_report).options == (
        Options(cli=False)
    )
    # a mapping names the baseline too
    mapped = compose("report=true", "report_baseline={matcher:hungarian}", hydra=True)
    assert instantiate(mapped.hydra.callbacks.sweep_report).options.baseline == (
        ("matcher", "hungarian"),
    )

    sweep = _seeded(tmp_path, {"hungarian": {1: 0.25, 2: 0.5}, "ms_detr": {1: 0.5, 2: 0.75}})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReport(baseline="matcher=ms_detr").on_multirun_end(config=config)
    md = (sweep / "report" / "report.md").read_text()
    assert "## Compared with matcher=ms_detr" in md
    assert "| matcher=hungarian | 2 | paired | -25.0 [-25.0, -25.0] \\* |" in md

    # a malformed key stops the sweep before its first job; a baseline the sweep lacks leaves the
    # report unwritten, in one sentence naming the key
    with pytest.raises(ReportOptionError, match="report_band='wide' is not a band"):
        SweepReport(band="wide").on_multirun_start(config=config)
    SweepReport(band="wide", enabled=False).on_multirun_start(config=config)  # idle: unchecked
    (sweep / "report" / "report.md").unlink()
    SweepReport(baseline="matcher=deta").on_multirun_end(config=config)
    err = capsys.readouterr().err
    assert err.startswith("sweep report: not written: report_baseline matcher=deta matches no ")
    assert not (sweep / "report" / "report.md").exists()


# The end-to-end sweep with report=true runs in tests/test_logging.py (one sweep for both).
