"""Compile the Triton MSDA kernels ahead of time for sm_80 and sm_90 (no GPU needed) with every
autotune config the autotuner may pick there, and print registers, spills, shared memory, CTA-wide
barriers (`bar.sync` in the PTX) and the theoretical occupancy (warps per SM) that these allow.

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
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DTYPES = ("fp32", "bf16", "fp16")

# Per-SM limits of the compute capabilities compiled here (CUDA C Programming Guide, "Compute
# Capabilities"): 64K 32-bit registers, 2048 threads (64 warps), 32 resident CTAs, and 164 KB
# (sm_80) / 228 KB (sm_90) of shared memory, of which each CTA also takes 1 KB for the system.
# Registers are allocated per warp in units of 256.
SM_LIMITS = {
    80: dict(regs=65536, warps=64, ctas=32, shared=164 * 1024),
    90: dict(regs=65536, warps=64, ctas=32, shared=228 * 1024),
}
REG_UNIT = 256  # registers per warp are rounded up to this
SHARED_PER_CTA_RESERVED = 1024


def occupancy(arch: int, n_regs: int, num_warps: int, shared: int) -> dict:
    """Theoretical occupancy of a kernel on `arch` (as the CUDA occupancy calculator): resident CTAs
    and warps per SM, and which limit binds ("regs", "warps", "ctas" or "shared")."""
    lim = SM_LIMITS[min(SM_LIMITS, key=lambda a: (a > arch, abs(a - arch)))]
    regs_per_warp = -(-max(n_regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by = {
        "regs": (lim["regs"] // regs_per_warp) // num_warps,
        "warps": lim["warps"] // num_warps,
        "ctas": lim["ctas"],
        "shared": lim["shared"] // (shared + SHARED_PER_CTA_RESERVED),
    }
    limit = min(by, key=lambda k: by[k])
    ctas = by[limit]
    return dict(ctas=ctas, warps=ctas * num_warps, limit=limit, occupancy=ctas * num_warps / 64)


def barriers(ptx: str) -> int:
    """CTA-wide barriers in the PTX: `bar.sync` / `barrier.sync` (Triton emits them around shared
    memory used to move values between register layouts)."""
    return len(re.findall(r"^\s*(?:bar|barrier)(?:\.cta)?\.sync\b", ptx, flags=re.M))


def cases(archs, dtypes, levels, head_dim, num_points, kernels=("fwd", "bwd")):
    """(kernel, arch, dtype, levels, config) for every config the autotuner may pick on `arch`."""
    from msdetr.kernels.triton_msda import candidate_configs

    return [
        (kernel, arch, dtype, num_levels, config)
        for arch in archs
        for kernel in kernels
        for config in candidate_configs(arch, head_dim, num_points, kernel)
        for num_levels in levels
        for dtype in dtypes
    ]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def compile_case(case, head_dim, num_points) -> dict:
    from msdetr.kernels.triton_msda import aot_compile

    kernel, arch, dtype, num_levels, config = case
    t0 = time.perf_counter()
    r = aot_compile(
        kernel, dtype, arch, config, head_dim=head_dim, num_levels=num_levels, num_points=num_points
    )
    ptx_text = r.compiled.asm["ptx"]
    ptx = ptx_text.splitlines()
    occ = occupancy(arch, r.n_regs, r.num_warps, r.shared)
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
        # elements of one (BLOCK_Q, points, channels) corner gather per thread
        per_thread=r.block_q * _pow2(num_points) * _pow2(head_dim) // (32 * r.num_warps),
        n_regs=r.n_regs,
        n_spills=r.n_spills,
        shared=r.shared,
        barriers=barriers(ptx_text),
        warps_per_sm=occ["warps"],
        occupancy=occ["occupancy"],
        occupancy_limit=occ["limit"],
        ptx_target=next((ln.split()[1] for ln in ptx if ln.startswith(".target")), None),
        # 64- or 128-bit gathers (bf16 at 4 elements per thread: 8 bytes, ld.global.v2.b32)
        vector_loads=sum("ld.global" in ln and (".v4." in ln or ".v2." in ln) for ln in ptx),
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
    p.add_argument("--kernels", nargs="+", choices=("fwd", "bwd"), default=["fwd", "bwd"])
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

    todo = cases(args.archs, args.dtypes, args.levels, args.head_dim, args.points, args.kernels)
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
        "| kernel | target | dtype | levels | config | elements / thread | barriers | registers "
        "| spills | shared memory bytes | warps / SM (limit) | occupancy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
            f"BLOCK_Q={r['block_q']}, {r['num_warps']} warps | {r['per_thread']} | "
            f"{r['barriers']} | {r['n_regs']} | {r['n_spills']} | {r['shared']} | "
            f"{r['warps_per_sm']} ({r['occupancy_limit']}) | {r['occupancy']:.0%} |"
        )
    spilled = [r for r in rows if r["n_spills"]]
    print()
    print(f"{len(spilled)} of {len(rows)} compiles spill registers.")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
