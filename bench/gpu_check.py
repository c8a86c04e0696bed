"""What only a GPU can show, in one run: environment, Triton kernel correctness on CUDA,
    bench/msda.py
timings and bench/train_step.py with the Triton and reference attention, written to
OUT/RESULTS-gpu.md.

python bench/gpu_check.py [--out bench/gpu-out] [--dry-run]
Each step runs on its own, timed; its output goes to OUT/<step>.log, and a failed step is recorded
and the next one runs. OUT also gets summary.json and RESULTS-gpu.md. The exit status is 1 if a step
failed. --dry-run runs every step on the CPU with tiny shapes and the Triton interpreter
(TRITON_INTERPRET=1): what it measures means nothing; it checks that the script works (CI runs it,
tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    # Must be set before triton is imported (msdetr.kernels.triton_msda reads it at import).
    os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

import torch  # noqa: E402

# Tolerances of tests/test_kernels_triton.py: fp32 against the reference, half precision against the
# float64 answer for the same rounded inputs. (rtol, atol) for the output and for the gradients.
TOLERANCES = {
    "fp32": {"out": (1e-5, 1e-5), "grad": (1e-4, 1e-4)},
    "bf16": {"out": (2e-2, 2e-2), "grad": (2e-2, 5e-2)},
    "fp16": {"out": (2e-2, 2e-2), "grad": (2e-2, 5e-2)},
}
KERNEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (name, n, lq, m, d, level shapes (H, W), points)
KERNEL_SHAPES_GPU = [
    ("decoder 300q", 2, 300, 8, 32, ((100, 167), (50, 84), (25, 42), (13, 21)), 4),
    ("odd sizes", 3, 37, 3, 17, ((7, 9), (3, 5), (1, 1)), 3),
    ("encoder-like 1 level", 1, 1000, 8, 32, ((25, 40),), 4),
    ("d=3, 5 levels", 2, 129, 2, 3, ((8, 4), (4, 8), (2, 2), (1, 2), (1, 1)), 2),
    # DETA at 1333 px: 5 levels of strides 4-64, a 900-query decoder call (batch 2: the float64
    # reference's grid_sample temporaries stay small).
    (
        "DETA 5 levels 900q",
        2,
        900,
        8,
        32,
        ((200, 334), (100, 167), (50, 84), (25, 42), (13, 21)),
        4,
    ),
]
KERNEL_SHAPES_DRY = [
    ("odd sizes", 1, 5, 2, 3, ((3, 5), (1, 2)), 2),
    ("1 level", 1, 3, 1, 4, ((2, 3),), 1),
]
# Multiples of 2**-10: loc * W - 0.5 is then exact in fp32 as in fp64, so the kernel and the float64
# reference take the same floor and the location gradient (which jumps at pixel centres) is
# comparable.
LOC_GRID = 1024


class StepFailed(Exception):
    """A step ran to the end but found something wrong (a tolerance exceeded, a command failed)."""


# ----------------------------------------------------------------------------------------------
# steps


def step_environment(args, device):
    import triton

    rows = [
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        ("host", platform.node()),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("git commit", _git_commit()),
    ]
    for name in ("lightning", "hydra", "omegaconf", "pycocotools", "torchdata", "timm"):
        try:
            module = __import__(name)
            rows.append((name, getattr(module, "__version__", "present")))
        except ImportError as exc:
            rows.append((name, f"missing ({exc})"))
    import msdetr

    rows.append(("msdetr from", str(Path(msdetr.__file__).parent)))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [
            ("device", props.name),
            ("compute capability", f"{props.major}.{props.minor}"),
            ("multiprocessors", str(props.multi_processor_count)),
            ("memory", f"{props.total_memory / 2**30:.1f} GiB"),
        ]
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            rows.append(("driver, max SM / mem clock", smi.stdout.strip() or smi.stderr.strip()))
        except (OSError, subprocess.TimeoutExpired) as exc:
            rows.append(("nvidia-smi", f"not run ({exc})"))
    else:
        rows.append(
            (
                "device",
                f"cpu ({platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads) -- dry run",
            )
        )
    for name, value in rows:
        print(f"{name}: {value}")
    return {"header": ["what", "value"], "rows": [list(r) for r in rows]}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if out.returncode != 0:
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def _kernel_inputs(n, lq, m, d, shapes, p, dtype, device, generator):
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    s = int(shapes_t.prod(1).sum())
    value = torch.randn(n, s, m, d, generator=generator).to(dtype)
    # Spills outside [0, 1] so the zero padding is exercised; on the 2**-10 grid (LOC_GRID).
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=generator) * 1.4 - 0.2
    loc = (loc * LOC_GRID).round() / LOC_GRID
    weights = torch.rand(n, lq, m, len(shapes), p, generator=generator).to(dtype)
    upstream = torch.randn(n, lq, m * d, generator=generator).to(dtype)
    to = dict(device=device)
    return (
        value.to(**to),
        shapes_t.to(**to),
        starts.to(**to),
        loc.float().to(**to),
        weights.to(**to),
        upstream.to(**to),
    )


def _out_and_grads(backend, value, shapes, starts, loc, weights, upstream):
    from msdetr.kernels import ms_deform_attn

    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], backend=backend)
    return out, torch.autograd.grad(out, inputs, upstream)


def _compare(got, want, rtol, atol):
    """max |got - want| and the worst |got - want| / (atol + rtol |want|) (<= 1 passes)."""
    got, want = got.detach().double(), want.detach().double()
    if not got.numel():
        return 0.0, 0.0
    err = (got - want).abs()
    return float(err.max()), float((err / (atol + rtol * want.abs())).max())


def step_kernel(args, device):
    from msdetr.kernels import triton_msda

    shapes = KERNEL_SHAPES_DRY if args.dry_run else KERNEL_SHAPES_GPU
    generator = torch.Generator().manual_seed(0)
    rows, failures = [], []
    for name, n, lq, m, d, levels, p in shapes:
        for dtype_name, dtype in KERNEL_DTYPES.items():
            value, sh, st, loc, weights, upstream = _kernel_inputs(
                n, lq, m, d, levels, p, dtype, device, generator
            )
            t0 = time.perf_counter()
            out, grads = _out_and_grads("triton", value, sh, st, loc, weights, upstream)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            # The exact answer for the same (rounded) inputs: only the kernel's own rounding is
            # measured.
            ref, ref_grads = _out_and_grads(
                "reference",
                value.double(),
                sh,
                st,
                loc.double(),
                weights.double(),
                upstream.double(),
            )
            tol = TOLERANCES[dtype_name]
            checks = [("out", out, ref, tol["out"])] + [
                (f"grad {g}", got, want, tol["grad"])
                for g, got, want in zip(("value", "loc", "weight"), grads, ref_grads)
            ]
            for what, got, want, (rtol, atol) in checks:
                max_err, ratio = _compare(got, want, rtol, atol)
                ok = ratio <= 1.0 and bool(torch.isfinite(got).all())
                shape_txt = f"{name}: N={n} Lq={lq} M={m} D={d} L={len(levels)} P={p}"
                rows.append(
                    [
                        shape_txt,
                        dtype_name,
                        what,
                        f"{max_err:.2e}",
                        f"{ratio:.3f}",
                        f"{rtol:g} / {atol:g}",
                        "pass" if ok else "FAIL",
                    ]
                )
                print(" | ".join(rows[-1]) + f" | first call {seconds:.2f} s", flush=True)
                if not ok:
                    failures.append(
                        f"{shape_txt} {dtype_name} {what}: max err {max_err:.2e}, ratio {ratio:.2f}"
                    )
    notes = []
    if torch.float64 in getattr(triton_msda, "_SUPPORTED", ()):
        value, sh, st, _, weights, _ = _kernel_inputs(
            1, 2, 1, 2, ((2, 3), (1, 2)), 2, torch.float64, device, generator
        )
        # Off the grid: a location at a pixel centre (where its gradient jumps) would fail the
        # check.
        loc = (
            torch.rand(1, 2, 1, 2, 2, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
        ).to(device)
        from msdetr.kernels import ms_deform_attn

        inputs = tuple(t.detach().clone().requires_grad_(True) for t in (value, loc, weights))
        t0 = time.perf_counter()
        ok = torch.autograd.gradcheck(
            lambda v, lc, w: ms_deform_attn(v, sh, st, lc, w, backend="triton"),
            inputs,
            eps=1e-6,
            atol=1e-5,
            rtol=1e-4,
            raise_exception=False,
        )
        line = (
            "torch.autograd.gradcheck, float64, N=1 Lq=2 M=1 D=2 L=2 P=2: "
            f"{'pass' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f} s)"
        )
        if not ok:
            failures.append(line)
    else:
        line = "torch.autograd.gradcheck skipped: the triton backend does not take float64 values"
    print(line)
    notes.append(line)
    notes.append(
        "Inputs: values and upstream N(0, 1), weights U(0, 1), locations U(-0.2, 1.2) on a "
        f"1/{LOC_GRID} grid; reference = PyTorch reference in float64 on the same rounded inputs. "
        "ratio = max |err| / (atol + rtol |ref|), pass if <= 1 (tolerances of "
        "tests/test_kernels_triton.py)."
    )
    result = {
        "header": ["shape", "dtype", "tensor", "max abs err", "ratio", "rtol / atol", "result"],
        "rows": rows,
        "notes": notes,
    }
    if failures:
        raise StepFailed("; ".join(failures), result)
    return result


def _markdown_table(text: str) -> dict:
    """The first markdown table in `text` as header + rows."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    cells = [c for c in cells if not all(set(x) <= {"-", ":"} for x in c)]
    return {"header": cells[0], "rows": cells[1:]} if cells else {"header": [], "rows": []}


def _run_bench(script: str, cli: list[str], timeout: float, interpret: bool = False) -> dict:
    """bench/<script> in a subprocess -> its markdown table and '#' notes; the rows it printed
    before a timeout are kept, and a failure or an empty table fails the step."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *cli]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:

        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        proc = subprocess.CompletedProcess(
            cmd,
            f"timed out after {timeout} s",
            text(exc.stdout),
            text(exc.stderr) + f"\nstopped after {timeout} s",
        )
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    result = _markdown_table(proc.stdout)
    result["notes"] = [ln for ln in proc.stdout.splitlines() if ln.startswith(("#", "DRAM"))]
    if proc.returncode != 0 or not result["rows"]:  # returncode is a string after a timeout
        raise StepFailed(
            f"bench/{script} exited {proc.returncode}: {proc.stderr.strip()[-500:]}", result
        )
    return result


def step_infer(args, device):
    """bench/infer.py: images/s at batch 4, fp32 / bf16, eager / compiled (full size on the GPU)."""
    if args.dry_run:
        return _run_bench(
            "infer.py", ["--tiny", "--device", "cpu", "--modes", "eager"], args.infer_timeout
        )
    # GPU time is short: every model eager, one of them compiled as well.
    return _run_bench(
        "infer.py",
        [
            "--device",
            "cuda",
            "--iters",
            "10",
            "--warmup",
            "2",
            "--compile-models",
            "ms_detr_pp_900",
        ],
        args.infer_timeout,
    )


def step_msda(args, device):
    """bench/msda.py --case deformable: B=2, S=22k, 4 levels; Triton, reference and gather."""
    if not args.dry_run:
        return _run_bench(
            "msda.py",
            ["--iters", str(args.msda_iters), "--warmup", str(args.msda_warmup)],
            args.msda_timeout,
        )
    return _msda_dry(device, ((4, 5), (2, 3)), 1)


def step_msda_large(args, device):
    """bench/msda.py --case deta-large: bf16 and fp32, B=16, S=89k, 5 levels, 900 queries; Triton
    and gather."""
    if not args.dry_run:
        return _run_bench(
            "msda.py",
            [
                "--case",
                "deta-large",
                "--iters",
                str(args.msda_large_iters),
                "--warmup",
                str(args.msda_large_warmup),
            ],
            args.msda_timeout,
        )
    return _msda_dry(device, ((4, 6), (2, 3), (1, 2), (1, 1), (1, 1)), 2)


def _msda_dry(device, levels, batch):
    """Dry run: bench/msda.py's own input, floor and autograd helpers at tiny shapes, timed with
    perf_counter on the CPU (its main() needs CUDA events)."""
    import msda

    from msdetr.kernels import ms_deform_attn_reference
    from msdetr.kernels.triton_msda import ms_deform_attn_triton

    saved = {k: getattr(msda, k) for k in ("LEVELS", "BATCH", "HEADS", "CHANNELS", "POINTS")}
    msda.LEVELS, msda.BATCH, msda.HEADS, msda.CHANNELS, msda.POINTS = levels, batch, 2, 4, 2
    try:
        generator = torch.Generator().manual_seed(0)
        encoder_queries = sum(h * w for h, w in msda.LEVELS)
        header = [
            "Lq",
            "dtype",
            "impl",
            "fwd ms",
            "bwd ms",
            "fwd+bwd ms",
            "fwd GB/s",
            "bwd GB/s",
            "fwd+bwd GB/s",
            "fwd / bwd / fwd+bwd peak MiB",
        ]
        print("| " + " | ".join(header) + " |")
        rows = []
        for lq in (encoder_queries, 3):
            for dtype_name in ("fp32", "bf16"):
                inputs = msda.make_inputs(lq, msda.DTYPES[dtype_name], "local", device, generator)
                floors = msda.floor_bytes(inputs[0], inputs[3], inputs[4], inputs[5])
                for impl, op in (
                    ("triton", ms_deform_attn_triton),
                    ("reference", ms_deform_attn_reference),
                    ("gather", msda.gather_op),
                ):
                    calls = msda.autograd_impl(op, *inputs)
                    ms = {}
                    for mode, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        ms[mode] = (time.perf_counter() - t0) * 1e3
                    rows.append(
                        [str(lq), dtype_name, impl]
                        + [f"{ms[k]:.3f}" for k in calls]
                        + [f"{floors[k] / (ms[k] * 1e6):.3f}" for k in calls]
                        + ["n/a (cpu)"]
                    )
                    print("| " + " | ".join(rows[-1]) + " |", flush=True)
    finally:
        for k, v in saved.items():
            setattr(msda, k, v)
    return {
        "header": header,
        "rows": rows,
        "notes": [
            f"dry run: bench/msda.py helpers at B={batch} M=2 D=4 levels "
            f"{', '.join(f'{h}x{w}' for h, w in levels)}, P=2, one call each"
        ],
    }


def _build_train_module(backbone: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from msdetr.run.build import build_module

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "~experiment",
                "model=deformable_detr_two_stage_refine",
                "matcher=hungarian",
                "data=coco",
                "data.num_classes=91",
                f"model.detector.backbone.name={backbone}",
                "model.detector.backbone.pretrained=false",
                *overrides,
            ],
        )
    return build_module(cfg)


def step_train(args, device):
    import train_step

    if args.dry_run:
        backbone, steps, warmup, gts = "resnet18", 1, 0, 3
        overrides = [
            "model.detector.encoder.num_layers=1",
            "model.detector.decoder.num_layers=1",
            "model.num_queries=10",
            "model.dim_feedforward=64",
        ]
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 64, 64, generator=generator)
        mask = torch.zeros(2, 64, 64, dtype=torch.bool)
        mask[1, 56:, :] = True
        targets = [
            {
                "labels": torch.randint(1, 91, (gts,), generator=generator),
                "boxes": torch.cat(
                    [
                        torch.rand(gts, 2, generator=generator) * 0.6 + 0.2,
                        torch.rand(gts, 2, generator=generator) * 0.3 + 0.05,
                    ],
                    1,
                ),
            }
            for _ in range(2)
        ]
        batch_txt = "2 images 64x64, 3 GTs each, 1 encoder + 1 decoder layer, 10 queries"
    else:
        backbone, steps, warmup, gts = "resnet50", args.train_steps, args.train_warmup, 20
        overrides = []
        images, mask, targets = train_step.synthetic_batch(
            gts, 91, device, torch.Generator().manual_seed(0)
        )
        batch_txt = "2 images (384x512, 352x480), 20 GTs each, 300 queries, 6 + 6 layers"
    images, mask = images.to(device), mask.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    # The dry run goes through the Triton and the bf16 code paths in 2 variants (a step of the
    # Triton interpreter costs ~10 s even on the tiny model; compilation is
    # tests/test_compile.py's).
    variants = ["reference", "bf16-triton"] if args.dry_run else list(TRAIN_VARIANTS)
    print(
        f"# {backbone} two-stage + refine, {batch_txt}; median of {steps} steps after {warmup} "
        "warm-up (compiled: at least 2)"
    )
    header = [
        "variant",
        "forward s",
        "criterion s",
        "backward s",
        "step s",
        "speed-up vs reference",
        "peak memory GiB",
        "warm-up s",
    ]
    print("| " + " | ".join(header) + " |")
    rows, failed, base = [], [], None
    for variant in variants:
        try:
            torch.manual_seed(0)
            module = _build_train_module(
                backbone, [*overrides, *train_step.variant_overrides(variant)]
            )
            module = module.to(device).train()
            module.configure_model()  # compiles the detector for the compiled variants
            autocast = train_step.variant_autocast(variant)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            n_warm = max(warmup, 2) if module.detector_compiled else warmup
            train_step.time_step(module, images, mask, targets, 0, n_warm, device, autocast)
            warm_s = time.perf_counter() - start
            med = train_step.time_step(module, images, mask, targets, steps, 0, device, autocast)
        except Exception as exc:  # one variant failing (a compile error) leaves the others measured
            failed.append(
                f"{variant}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[
                    :300
                ]
            )
            rows.append([variant, "failed", "", "", "", "", "", ""])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
            continue
        step_s = sum(med.values())
        base = step_s if variant == "reference" else base
        peak = (
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
            if device.type == "cuda"
            else "n/a (cpu)"
        )
        rows.append(
            [
                variant,
                *(f"{med[k]:.3f}" for k in ("forward", "criterion", "backward")),
                f"{step_s:.3f}",
                "",
                peak,
                f"{warm_s:.1f}",
            ]
        )
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
        del module
    for row in rows:  # the ratio column once the reference row is known
        if base and row[1] != "failed":
            row[5] = f"{base / float(row[4]):.2f}"
    result = {
        "header": header,
        "rows": rows,
        "notes": [
            f"{backbone} two-stage + refine, {batch_txt}; median of {steps} steps after {warmup} "
            "warm-up; bf16 = forward and criterion under bf16 autocast "
            "(trainer.precision=bf16-mixed); compiled = model.compile=true (dynamic shapes); peak "
            "= torch.cuda.max_memory_allocated over warm-up and steps",
            *failed,
        ],
    }
    if failed:
        raise StepFailed(f"{len(failed)} of {len(variants)} variants failed", result)
    return result


# The training-step variants of bench/train_step.py's --compare that the GPU check measures.
TRAIN_VARIANTS = (
    "reference",
    "triton",
    "bf16-reference",
    "bf16-triton",
    "compiled-triton",
    "bf16-compiled-triton",
)


STEPS = [
    ("environment", "Environment", step_environment),
    ("kernel", "Kernel correctness: Triton vs float64 reference", step_kernel),
    ("msda", "bench/msda.py", step_msda),
    (
        "msda_large",
        "bench/msda.py --case deta-large: B=16, S=89k, 5 levels, 900 queries, fp32 / bf16",
        step_msda_large,
    ),
    (
        "train_step",
        "bench/train_step.py: fp32 / bf16, eager / compiled, Triton vs reference attention",
        step_train,
    ),
    ("infer", "bench/infer.py: images per second", step_infer),
]


# --------------------------------------------------------------------------------------------
# driver


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def run_step(key, fn, args, device, out_dir: Path) -> dict:
    record = {"step": key, "status": "ok", "seconds": 0.0, "error": None, "result": None}
    t0 = time.perf_counter()
    with (
        open(out_dir / f"{key}.log", "w") as log,
        contextlib.redirect_stdout(_Tee(sys.__stdout__, log)),
        contextlib.redirect_stderr(_Tee(sys.__stderr__, log)),
    ):
        print(f"=== step {key} ===", flush=True)
        try:
            record["result"] = fn(args, device)
        except StepFailed as exc:
            record.update(
                status="failed",
                error=str(exc.args[0]),
                result=exc.args[1] if len(exc.args) > 1 else None,
            )
            print(f"step {key} FAILED: {exc.args[0]}")
        except BaseException as exc:  # noqa: BLE001 -- keep going past anything a step raises, Ctrl-C aside
            if isinstance(exc, KeyboardInterrupt):
                raise
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"=== step {key}: {record['status']} in {record['seconds']:.1f} s ===", flush=True)
    return record


def write_results(
    records: list[dict], device_name: str, date: str, dry_run: bool, path: Path
) -> None:
    lines = [
        "# GPU check" + (" (DRY RUN on CPU: numbers are meaningless)" if dry_run else ""),
        "",
        f"Device: {device_name}  ",
        f"Date: {date}  ",
        "Written by `bench/gpu_check.py`"
        + (" --dry-run" if dry_run else "")
        + "; logs of each step beside it.",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.1f} |" for r in records]
    titles = {key: title for key, title, _ in STEPS}
    for r in records:
        lines += [
            "",
            f"## {titles[r['step']]}",
            "",
            f"Status: {r['status']} ({r['seconds']:.1f} s)",
        ]
        result = r["result"] or {}
        if result.get("header"):
            lines += [
                "",
                "| " + " | ".join(result["header"]) + " |",
                "|" + "---|" * len(result["header"]),
            ]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in result["rows"]]
        for note in result.get("notes", []):
            lines += ["", note]
    failed = [r for r in records if r["status"] != "ok"]
    lines += ["", "## Failures", ""]
    lines += [f"- {r['step']} ({r['status']}): {r['error']}" for r in failed] or ["None."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "gpu-out"), help="folder for logs and RESULTS-gpu.md"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="every step on the CPU, tiny shapes, Triton interpreter",
    )
    p.add_argument(
        "--steps", nargs="+", choices=[k for k, _, _ in STEPS], default=[k for k, _, _ in STEPS]
    )
    p.add_argument("--msda-iters", type=int, default=50)
    p.add_argument("--msda-warmup", type=int, default=10)
    p.add_argument("--msda-large-iters", type=int, default=10)
    p.add_argument("--msda-large-warmup", type=int, default=2)
    p.add_argument(
        "--msda-timeout", type=int, default=300, help="seconds before bench/msda.py is stopped"
    )
    p.add_argument(
        "--infer-timeout", type=int, default=240, help="seconds before bench/infer.py is stopped"
    )
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        p.error(
            "--dry-run must be on the command line (it sets TRITON_INTERPRET=1 before triton is "
            "imported)"
        )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.dry_run:
        device, device_name = torch.device("cpu"), f"cpu ({platform.machine()}), dry run"
    elif torch.cuda.is_available():
        device, device_name = torch.device("cuda"), torch.cuda.get_device_name()
    else:
        print(
            "bench/gpu_check.py: no CUDA GPU (torch.cuda.is_available() is False); use --dry-run "
            "on a CPU.",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    records = [
        run_step(key, fn, args, device, out_dir) for key, _, fn in STEPS if key in args.steps
    ]
    write_results(records, device_name, date, args.dry_run, out_dir / "RESULTS-gpu.md")
    summary = {
        "device": device_name,
        "date": date,
        "dry_run": args.dry_run,
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": records,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(
        f"gpu_check: {sum(r['status'] == 'ok' for r in records)}/{len(records)} steps ok in "
        f"{summary['seconds']:.0f} s; wrote {out_dir / 'RESULTS-gpu.md'}"
    )
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
