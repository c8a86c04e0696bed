"""bench/infer.py --tiny: a smoke run that prints one row per (model, dtype, mode), a failed compile
being a row with its error instead of a crash."""

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def infer():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import infer
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return infer


def rows(text: str) -> list[list[str]]:
    lines = [
        ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| model |")
    ]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def test_tiny_run_has_every_row(infer, capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise RuntimeError("compile refused in this test\nsecond line")

    # Compiling even the tiny models takes minutes on a small CPU: the compiled rows here check that
    # a failure is reported as a row; the eager rows run the models for real.
    monkeypatch.setattr(torch, "compile", no_compile)
    assert infer.main(["--tiny", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("# inference: device cpu")
    assert f"torch {torch.__version__}" in header and "threads 1" in header
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", header)
    table = rows(out)
    models = ["model=deformable_detr_two_stage_refine", "experiment=ms_detr_pp_900", "model=deta"]
    assert [(r[0], r[1], r[2]) for r in table] == [
        (m, dt, mode) for m in models for mode in ("eager", "compiled") for dt in ("fp32", "bf16")
    ]
    for r in table:
        if r[2] == "eager":
            assert float(r[5]) > 0 and r[6] == "", r
        else:
            assert (
                r[3:6] == ["-", "-", "-"]
                and r[6] == "failed: RuntimeError: compile refused in this test"
            ), r


def test_compile_models_limits_compiled_rows(infer, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # "compiled" = eager, fast
    assert (
        infer.main(
            ["--tiny", "--models", "two_stage,deta", "--dtypes", "fp32", "--compile-models", "deta"]
        )
        == 0
    )
    table = rows(capsys.readouterr().out)
    assert [(r[0], r[2]) for r in table] == [
        ("model=deformable_detr_two_stage_refine", "eager"),
        ("model=deta", "eager"),
        ("model=deta", "compiled"),
    ]
    assert all(float(r[5]) > 0 for r in table)


def test_bad_size_is_an_argument_error(infer):
    with pytest.raises(SystemExit):
        infer.main(["--size", "384by512"])
