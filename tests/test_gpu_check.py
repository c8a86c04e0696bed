"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU (tiny shapes, Triton
interpreter) and RESULTS-gpu.md gets every section."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "## Environment",
    "## Kernel correctness",
    "## bench/msda.py",
    "## bench/msda.py --case deta-large",
    "## bench/train_step.py",
    "## bench/infer.py",
    "## Failures",
]


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu-out"
    env = dict(os.environ, PYTHON=sys.executable, TRITON_INTERPRET="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == [
        "environment",
        "kernel",
        "msda",
        "msda_large",
        "train_step",
        "infer",
    ]
    for step in summary["steps"]:
        assert step["status"] == "ok", step
        assert step["result"]["rows"], step
        assert (out / f"{step['step']}.log").read_text().strip()
    kernel = summary["steps"][1]["result"]
    assert {row[1] for row in kernel["rows"]} == {"fp32", "bf16", "fp16"}
    assert all(row[-1] == "pass" for row in kernel["rows"])
    assert any("gradcheck" in note and "pass" in note for note in kernel["notes"])
    for msda in summary["steps"][2:4]:  # the gather backend is timed beside Triton
        assert {row[2] for row in msda["result"]["rows"]} == {"triton", "reference", "gather"}
    assert {row[0] for row in summary["steps"][4]["result"]["rows"]} == {"reference", "bf16-triton"}
    assert {row[0] for row in summary["steps"][5]["result"]["rows"]} == {
        "model=deformable_detr_two_stage_refine",
        "experiment=ms_detr_pp_900",
        "model=deta",
    }
    results = (out / "RESULTS-gpu.md").read_text()
    assert "Device: " in results and "Date: " in results
    for section in SECTIONS:
        assert section in results, section
    assert "None." in results.split("## Failures")[1]


def test_failed_step_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def broken(args, device):
        raise RuntimeError("boom")

    monkeypatch.setattr(
        gpu_check,
        "STEPS",
        [("msda", "bench/msda.py", broken), ("environment", "Environment", gpu_check.STEPS[0][2])],
    )
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["error", "ok"]
    assert "boom" in (tmp_path / "msda.log").read_text()
    assert "- msda (error): RuntimeError: boom" in (tmp_path / "RESULTS-gpu.md").read_text()
