"""Compile the Triton MSDA kernels ahead of time for sm_80 and sm_90 (no GPU needed) with every
autotune config the autotuner may pick there, and print registers, spills and shared memory.

    python bench/aot.py                      # markdown table (bench/RESULTS.md)
    python bench/aot.py --json --jobs 2      # one JSON object per compile
    (tests/test_kernels_aot.py)

Shapes: D=32 (head dim), 4 points, 4 levels (Deformable-DETR / MS-DETR) and 5 (DETA); the number of
heads (8) is a runtime argument and does not change the code. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DTYPES = ("fp32", "bf16", "fp16")


def cases(archs, dtypes, levels, head_dim, num_points):
    """(kernel, arch, dtype, levels, config) for every config the autotuner may pick on `arch`."""
    from msdetr.kernels.triton_msda import candidate_configs

    return [
        (kernel, arch, dtype, num_levels, config)
        for arch in archs
        for config in candidate_configs(arch, head_dim, num_points)
        for num_levels in levels
        for dtype in dtypes
        for kernel in ("fwd", "bwd")
    ]


def compile_case(case, head_dim, num_points) -> dict:
    from msdetr.kernels.triton_msda import aot_compile

    kernel, arch, dtype, num_levels, config = case
    t0 = time.perf_counter()
    r = aot_compile(
        kernel, dtype, arch, config, head_dim=head_dim, num_levels=num_levels, num_points=num_points
    )
    ptx = r.compiled.asm["ptx"].splitlines()
    return dict(
        kernel=kernel,
        arch=arch,
        dtype=dtype,
        levels=num_levels,
        head_dim=head_dim,
        points=num_points,
        block_q=r.block_q,
        num_warps=r.num_warps,
        num_stages=config.num_stages,
        n_regs=r.n_regs,
        n_spills=r.n_spills,
        shared=r.shared,
        ptx_target=next((ln.split()[1] for ln in ptx if ln.startswith(".target")), None),
        vector_loads=sum("ld.global" in ln and ".v4." in ln for ln in ptx),
        atomics=sum(("atom.global" in ln or "red.global" in ln) for ln in ptx),
        seconds=round(time.perf_counter() - t0, 2),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--levels", nargs="+", type=int, default=[4, 5])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line instead of a table"
    )
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("bench/aot.py: unset TRITON_INTERPRET; the interpreter has no compiler to run.")

    import triton

    todo = cases(args.archs, args.dtypes, args.levels, args.head_dim, args.points)
    t0 = time.perf_counter()
    if args.jobs > 1:
        # fork: the workers inherit the imported modules (no CUDA is initialized here).
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(
                pool.map(compile_case, todo, [args.head_dim] * len(todo), [args.points] * len(todo))
            )
    else:
        rows = [compile_case(case, args.head_dim, args.points) for case in todo]
    seconds = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(dict(triton=triton.__version__, cases=len(todo), seconds=round(seconds, 1)))
        )
        for row in rows:
            print(json.dumps(row))
        return 0
    print(
        f"# Triton {triton.__version__}; D={args.head_dim}, {args.points} points; {len(rows)} "
        f"compiles in {seconds:.0f} s ({args.jobs} jobs)"
    )
    print()
    print(
        "| kernel | target | dtype | levels | config | registers | spills | shared memory bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    order = {k: i for i, k in enumerate(("fwd", "bwd"))}
    for r in sorted(
        rows,
        key=lambda r: (
            order[r["kernel"]],
            r["arch"],
            DTYPES.index(r["dtype"]),
            r["levels"],
            r["block_q"],
            r["num_warps"],
        ),
    ):
        print(
            f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {r['levels']} | "
            f"BLOCK_Q={r['block_q']}, {r['num_warps']} warps | {r['n_regs']} | {r['n_spills']} | "
            f"{r['shared']} |"
        )
    spilled = [r for r in rows if r["n_spills"]]
    print()
    print(f"{len(spilled)} of {len(rows)} compiles spill registers.")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
