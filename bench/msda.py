"""Milliseconds, GB/s against the DRAM floor and peak memory of multi-scale deformable attention:
the Triton kernels beside the PyTorch reference (and the original CUDA extension when importable).

python bench/msda.py [--case deformable|deta-large] [--iters 100] [--warmup 20] [--dtypes fp32 bf16]
    [--locations local|uniform] [--impls triton reference gather]
Cases (M=8, D=32, P=4):
- deformable (default): the encoder call (B=2, levels 100x167, 50x84, 25x42, 13x21: S = Lq =
  22,223; L=4) and decoder calls with 300 and 900 queries on the same value; Triton, the reference
  and the gather backend (the deterministic fallback on CUDA).
- deta-large: what stresses memory and time: B=16 images per GPU at 1333 px with 5 levels (strides
  4-64: 200x334 ... 13x21, S = Lq = 89,023) and a 900-query decoder call. The value is 1.46 GB in
  fp32 (0.73 in bf16), the locations 1.82 GB, the fp32 value-gradient buffer 1.46 GB; the encoder
  call's forward + backward peaks near 17 GB in fp32. The reference (grid_sample, (N*M, D, Lq, P)
  temporaries of 5.8 GB per level) is left out, and so is the gather backend where its
  N*Lq*M*L*P*4 corner indices pass GATHER_MAX_ENTRIES (the encoder call: 7.3 GB of int64 indices).
The DRAM floor counts every input read once and every output written once; GB/s = floor bytes /
median time. Peak memory is what the call allocates above its inputs. L2 is flushed before each
timed call unless --no-flush.

python bench/msda.py --device cpu [--backends reference,gather] [--iters 3] [--warmup 1] [--dtypes
fp32] CPU comparison of the PyTorch backends (no CUDA needed): the same cases, each (query count,
backend, mode) in a fresh subprocess. Times are medians of perf_counter: fwd (no grad), bwd (one
retained graph) and fwd+bwd; peak memory is the growth of the process's peak resident set
(ru_maxrss) over its value just before the first call, for a forward-only process and for a forward
+ backward one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
# --case: (levels, batch, implementations timed on CUDA, decoder query counts)
CASES = {
    "deformable": (LEVELS, BATCH, ("triton", "reference", "gather"), (300, 900)),
    "deta-large": (
        ((200, 334), (100, 167), (50, 84), (25, 42), (13, 21)),
        16,
        ("triton", "gather"),
        (900,),
    ),
}
# The gather backend's corner indices (int64) and weights: 12 bytes per entry.
GATHER_MAX_ENTRIES = 1 << 28
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# 256 MiB: larger than the L2 of any current GPU.
FLUSH_BYTES = 256 << 20


def level_shapes(device):
    shapes = torch.tensor(LEVELS, dtype=torch.int64, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return shapes, starts


def reference_points(num_queries: int, device, generator) -> torch.Tensor:
    """(num_queries, 2) normalized points: the encoder's pixel centres of every level (each query
    samples around itself) or, for the decoder, uniform random boxes' centres."""
    if num_queries != sum(h * w for h, w in LEVELS):
        return torch.rand(num_queries, 2, generator=generator).to(device)
    centres = []
    for h, w in LEVELS:
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        centres.append(torch.stack([xs, ys], -1).flatten(0, 1))
    return torch.cat(centres).to(device)


def make_inputs(num_queries: int, dtype, locations: str, device, generator):
    shapes, starts = level_shapes(device)
    s = sum(h * w for h, w in LEVELS)
    value = torch.randn(BATCH, s, HEADS, CHANNELS, generator=generator).to(device, dtype)
    shape = (BATCH, num_queries, HEADS, len(LEVELS), POINTS)
    if locations == "uniform":
        loc = torch.rand(*shape, 2, generator=generator).to(device)
    else:
        # Offsets of a few pixels of each level around the query's reference point, like a trained
        # model.
        sizes = torch.tensor([[w, h] for h, w in LEVELS], dtype=torch.float32, device=device)
        offsets = torch.randn(*shape, 2, generator=generator).to(device) * 2.0 / sizes[:, None, :]
        loc = (
            reference_points(num_queries, device, generator)[None, :, None, None, None, :] + offsets
        )
    logits = torch.randn(BATCH, num_queries, HEADS, len(LEVELS) * POINTS, generator=generator).to(
        device
    )
    weights = logits.softmax(-1).view(shape).to(dtype)
    grad_out = torch.randn(BATCH, num_queries, HEADS * CHANNELS, generator=generator).to(
        device, dtype
    )
    return value, shapes, starts, loc, weights, grad_out


def floor_bytes(value, loc, weights, grad_out) -> dict[str, int]:
    def size(t):
        return t.numel() * t.element_size()

    inputs = size(value) + size(loc) + size(weights)
    out = size(grad_out)  # the output has grad_out's shape and dtype
    grads = size(value) + size(loc) + size(weights)
    return {"fwd": inputs + out, "bwd": out + inputs + grads, "fwd+bwd": inputs + 2 * out + grads}


def autograd_impl(op, value, shapes, starts, loc, weights, grad_out):
    """fwd / bwd / fwd+bwd callables of a differentiable op; bwd replays one retained graph."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]

    def fwd():
        with torch.no_grad():
            return op(inputs[0], shapes, starts, inputs[1], inputs[2])

    out = op(inputs[0], shapes, starts, inputs[1], inputs[2])

    def bwd():
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(
            op(inputs[0], shapes, starts, inputs[1], inputs[2]), inputs, grad_out
        )

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def original_impl(ext, value, shapes, starts, loc, weights, grad_out):
    """The Deformable-DETR CUDA extension, called directly (it has no autograd of its own)."""
    im2col_step = 64

    def fwd():
        return ext.ms_deform_attn_forward(value, shapes, starts, loc, weights, im2col_step)

    def bwd():
        return ext.ms_deform_attn_backward(
            value, shapes, starts, loc, weights, grad_out, im2col_step
        )

    def fwd_bwd():
        return fwd(), bwd()

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def measure(fn, warmup: int, iters: int, flush: torch.Tensor | None) -> tuple[float, int]:
    """Median milliseconds over `iters` timed calls, and the peak bytes one call allocates."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() - baseline


# --------------------------------------------------------------------------------------------- CPU


def gather_op(value, shapes, starts, loc, weights):
    """The gather backend with the (value, shapes, starts, loc, weights) call; the level sizes
    from LEVELS (on the host: no device read)."""
    from msdetr.kernels.gather import ms_deform_attn_gather

    return ms_deform_attn_gather(value, LEVELS, loc, weights)


def cpu_backends() -> dict:
    """The differentiable CPU implementations, all with the (value, shapes, starts, loc, weights)
    call."""
    from msdetr.kernels import ms_deform_attn_reference

    def gather(value, shapes, starts, loc, weights):
        from msdetr.kernels.gather import ms_deform_attn_gather

        return ms_deform_attn_gather(value, shapes, loc, weights)

    return {"reference": ms_deform_attn_reference, "gather": gather}


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_case(
    lq: int, backend: str, dtype_name: str, mode: str, iters: int, warmup: int, locations: str
) -> dict:
    """One case in this process: median ms of fwd / bwd / fwd+bwd (mode "train") or of fwd only
    (mode "fwd"), and the peak RSS growth over the value just before the first call."""
    op = cpu_backends()[backend]
    generator = torch.Generator().manual_seed(0)
    value, shapes, starts, loc, weights, grad_out = make_inputs(
        lq, DTYPES[dtype_name], locations, "cpu", generator
    )
    # Before autograd_impl: it runs one forward to keep a graph for bwd.
    before = peak_rss_bytes()
    calls = (
        autograd_impl(op, value, shapes, starts, loc, weights, grad_out)
        if mode == "train"
        else None
    )
    ms = {}
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return op(value, shapes, starts, loc, weights)

        calls = {"fwd": fwd}
    for name, fn in calls.items():
        if name == "fwd" and mode == "train":
            continue  # timed without autograd in the "fwd" process
        times = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        ms[name] = statistics.median(times)
    return {"ms": ms, "peak_mib": (peak_rss_bytes() - before) / 2**20}


def cpu_main(args) -> int:
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(cpu_backends()))
    if unknown:
        sys.exit(
            f"bench/msda.py: unknown CPU backend(s) {unknown}; choose from "
            f"{sorted(cpu_backends())}."
        )
    encoder_queries = sum(h * w for h, w in LEVELS)
    queries = args.queries or [encoder_queries, 300, 900]
    dtypes = args.dtypes or ["fp32"]
    print(
        f"# ms_deform_attn on CPU ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"B={BATCH} M={HEADS} D={CHANNELS} L={len(LEVELS)} P={POINTS} S={encoder_queries}; "
        f"locations={args.locations}; median of {args.iters} after {args.warmup} warm-up; every "
        f"case in a fresh process; peak = growth of ru_maxrss over its value before the first call"
    )
    print()
    print(
        "| Lq | dtype | impl | fwd ms | bwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | "
        "fwd+bwd x first |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for lq in queries:
        for dtype_name in dtypes:
            first = None
            for backend in backends:
                results = {}
                for mode in ("fwd", "train"):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--cpu-case",
                        str(lq),
                        backend,
                        dtype_name,
                        mode,
                        "--iters",
                        str(args.iters),
                        "--warmup",
                        str(args.warmup),
                        "--locations",
                        args.locations,
                        "--threads",
                        str(torch.get_num_threads()),
                    ]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(
                            f"bench/msda.py: case {lq} {backend} {dtype_name} {mode} "
                            f"failed:\n{proc.stderr[-2000:]}"
                        )
                    results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
                train = results["train"]["ms"]
                first = first or train["fwd+bwd"]
                print(
                    f"| {lq} | {dtype_name} | {backend} | {results['fwd']['ms']['fwd']:.1f} | "
                    f"{train['bwd']:.1f} | {train['fwd+bwd']:.1f} | "
                    f"{results['fwd']['peak_mib']:.0f} | {results['train']['peak_mib']:.0f} | "
                    f"{train['fwd+bwd'] / first:.2f} |",
                    flush=True,
                )
    return 0


def load_original_extension():
    try:
        import MultiScaleDeformableAttention as ext
    except ImportError:
        return None
    return ext


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed calls (default 100 on CUDA, 3 on CPU)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first (default 20 on CUDA, 1 on CPU)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="default: fp32 bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--queries",
        nargs="+",
        type=int,
        default=None,
        help="query counts to run (default: the encoder's 22223, then 300 and 900)",
    )
    p.add_argument(
        "--locations",
        choices=("local", "uniform"),
        default="local",
        help="local: a few pixels around each query's reference point; uniform: anywhere",
    )
    p.add_argument("--no-flush", action="store_true", help="keep L2 warm between timed calls")
    p.add_argument(
        "--case",
        choices=sorted(CASES),
        default="deformable",
        help="deformable: B=2, S=22k, 4 levels; deta-large: B=16, S=89k, 5 levels (CUDA)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=("triton", "reference", "gather"),
        default=None,
        help="CUDA implementations to time (default: the case's)",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: Triton vs reference (the default); cpu: --backends compared on the CPU",
    )
    p.add_argument(
        "--backends",
        default="reference,gather",
        help="CPU backends, comma-separated (--device cpu)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)"
    )
    p.add_argument(
        "--cpu-case", nargs=4, metavar=("LQ", "BACKEND", "DTYPE", "MODE"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    cpu = args.device == "cpu" or args.cpu_case
    args.iters = args.iters if args.iters is not None else (3 if cpu else 100)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_case:
        lq, backend, dtype_name, mode = args.cpu_case
        print(
            json.dumps(
                cpu_case(
                    int(lq), backend, dtype_name, mode, args.iters, args.warmup, args.locations
                )
            )
        )
        return 0
    if args.device == "cpu":
        return cpu_main(args)
    args.dtypes = args.dtypes or ["fp32", "bf16"]

    if not torch.cuda.is_available():
        sys.exit(
            "bench/msda.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was "
            "measured."
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit(
            "bench/msda.py: unset TRITON_INTERPRET, the interpreter would time numpy on the CPU."
        )

    from msdetr.kernels import ms_deform_attn_reference
    from msdetr.kernels.triton_msda import ms_deform_attn_triton

    global LEVELS, BATCH
    LEVELS, BATCH, case_impls, decoder_queries = CASES[args.case]
    impl_names = args.impls or list(case_impls)
    device = torch.device("cuda")
    encoder_queries = sum(h * w for h, w in LEVELS)
    queries = args.queries or [encoder_queries, *decoder_queries]
    flush = None if args.no_flush else torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    ext = load_original_extension()
    generator = torch.Generator().manual_seed(0)
    floor_notes: list[str] = []
    skipped: list[str] = []

    print(
        f"# ms_deform_attn on {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}; case {args.case}: B={BATCH} M={HEADS} "
        f"D={CHANNELS} levels {'/'.join(f'{h}x{w}' for h, w in LEVELS)} "
        f"L={len(LEVELS)} P={POINTS} S={encoder_queries}; locations={args.locations}; median of "
        f"{args.iters} after {args.warmup} warm-up; L2 {'warm' if args.no_flush else 'flushed'}; "
        f"original CUDA op {'present' if ext else 'not importable'}"
    )
    print()
    print(
        "| Lq | dtype | impl | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | fwd+bwd GB/s "
        "| fwd / bwd / fwd+bwd peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lq in queries:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            value, shapes, starts, loc, weights, grad_out = make_inputs(
                lq, dtype, args.locations, device, generator
            )
            floors = floor_bytes(value, loc, weights, grad_out)
            floor_notes.append(
                f"Lq={lq} {dtype_name} " + " / ".join(f"{b / 1e6:.1f}" for b in floors.values())
            )
            ops = {
                "triton": ms_deform_attn_triton,
                "reference": ms_deform_attn_reference,
                "gather": gather_op,
            }
            impls = {}
            for name in impl_names:
                entries = BATCH * lq * HEADS * len(LEVELS) * POINTS * 4
                if name == "gather" and entries > GATHER_MAX_ENTRIES:
                    skipped.append(
                        f"# Lq={lq} {dtype_name}: gather skipped ({entries / 1e6:.0f} M corner "
                        f"indices, {entries * 12 / 1e9:.1f} GB with their weights)"
                    )
                    continue
                impls[name] = autograd_impl(
                    ops[name], value, shapes, starts, loc, weights, grad_out
                )
            # The extension dispatches on fp32 / fp64 only.
            if ext is not None and dtype == torch.float32:
                impls["original CUDA"] = original_impl(
                    ext, value, shapes, starts, loc, weights, grad_out
                )
            for name, calls in impls.items():
                ms, peak, rate = {}, {}, {}
                for mode, fn in calls.items():
                    ms[mode], peak[mode] = measure(fn, args.warmup, args.iters, flush)
                    rate[mode] = floors[mode] / (ms[mode] * 1e6)
                modes = list(calls)
                print(
                    f"| {lq} | {dtype_name} | {name} | "
                    + " | ".join(f"{ms[m]:.3f}" for m in modes)
                    + " | "
                    + " | ".join(f"{rate[m]:.0f}" for m in modes)
                    + " | "
                    + " / ".join(f"{peak[m] / 2**20:.0f}" for m in modes)
                    + " |",
                    flush=True,
                )
            del impls
            torch.cuda.empty_cache()
    print()
    print("DRAM floor per call (MB, fwd / bwd / fwd+bwd): " + "; ".join(floor_notes))
    for line in skipped:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
