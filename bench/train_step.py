"""Seconds per training step on CPU (or GPU), split into forward / criterion / backward.

python bench/train_step.py [--matcher hungarian] [--steps 5] [--device cpu] [--backbone resnet50]
python bench/train_step.py --matchers hungarian,ms_detr,deta,h_detr   # one table, cost x hungarian
python bench/train_step.py --compare reference,gather,compiled        # one table, cost x reference
python bench/train_step.py --masks --experiment ms_detr_pp_300        # boxes vs + mask head
Default: two-stage + box refinement, 2 images ~384x512, 300 queries, 20 GTs per image.

--masks compares the model with and without the mask head (`+parts=mask_head`: Mask DINO's head
and losses on every decoder branch, the Hungarian mask costs; the batch's targets carry masks, one
ellipse inside each box, at the image's size): two rows, `boxes` (the baseline) and `masks`.
--override KEY=VALUE (repeatable) passes a config override to every row (a smaller model:
model.num_queries=100); --image-scale shrinks the two images (0.5: 192x256 and 176x240).

--compare runs execution variants of one model: `reference` (= `eager`: eager, the grid_sample
attention, the official CPU algorithm), `gather`, `triton` or any other `attn_backend`, and
`compiled` (torch.compile of the detector, model.compile=true) combined with one of them (`compiled`
alone is `compiled-reference`; `compiled-gather`; add `static` for compile_dynamic=false, `bf16` for
bf16 autocast as trainer.precision=bf16-mixed: `bf16-compiled-triton`). A variant whose
backend this checkout does not accept is reported as unavailable. Its default model is section 4's:
experiment=ms_detr_pp_300 (MS-DETR on Deformable-DETR++, 300 queries, 6 + 6 layers) with ResNet-18,
random init.

--matchers and --compare start one worker process per variant (each keeps its own allocator state
and its own peak memory), warm each up once (compilation included; never timed), then time
`--steps` rounds, each one step of every variant in turn, so that a drifting machine speed (shared
CPUs) spreads over all variants alike. Peak memory: the worker's peak RSS over the timed steps on
CPU (Linux; over the whole process where the peak cannot be reset), torch.cuda.max_memory_allocated
on CUDA; step memory: that peak less the memory in use once the module is built (RSS / allocated,
before the warm-up), i.e. what a training step adds on top of the weights and libraries: the
column the paper's memory claim is about (the extra queries of H-DETR, Group DETR and DN-DETR
against MS-DETR's o2m stream of the same queries). Each step calls the module's `detect` with the
batch's targets, as training_step does, so matchers whose query blocks are built from the targets
(dn_detr, ms_detr_dn) run as in training.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("forward", "criterion", "backward")
# prefix of the worker's protocol lines (anything else on its stdout is ignored)
_REPLY = "@@msdetr-bench "


def build(
    matcher: str,
    model: str,
    backbone: str,
    num_classes: int,
    experiment: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
):
    """The module of an experiment, or of a model + matcher pair, with a random-init backbone."""
    from msdetr.run.build import build_module

    chosen = (
        [f"experiment={experiment}"]
        if experiment
        else ["~experiment", f"model={model}", f"matcher={matcher}"]
    )
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *chosen,
                "data=coco",
                f"data.num_classes={num_classes}",
                f"model.detector.backbone.name={backbone}",
                "model.detector.backbone.pretrained=false",
                *overrides,
            ],
        )
    if (
        "groups" in cfg.model.detector.training_queries
        and cfg.model.detector.queries.get("mixed_selection") is False
    ):
        # Group DETR's groups share the two-stage proposals, so they need learned content (the model
        # refuses otherwise): the one change to the model this row makes.
        cfg.model.detector.queries.mixed_selection = True
    return build_module(cfg)


def synthetic_batch(num_gts: int, num_classes: int, device, generator, scale: float = 1.0):
    """Two padded images (384x512, 352x480, times `scale`) with `num_gts` random boxes each, and
    for each box a mask (the ellipse inside it, at the image's unpadded size)."""
    sizes = [(round(384 * scale), round(512 * scale)), (round(352 * scale), round(480 * scale))]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.randn(len(sizes), 3, h, w, generator=generator)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    targets = []
    for i, (ih, iw) in enumerate(sizes):
        mask[i, :ih, :iw] = False
        centers = torch.rand(num_gts, 2, generator=generator) * 0.6 + 0.2
        wh = torch.rand(num_gts, 2, generator=generator) * 0.3 + 0.05
        ys = (torch.arange(ih) + 0.5)[None, :, None] / ih
        xs = (torch.arange(iw) + 0.5)[None, None, :] / iw
        dx = (xs - centers[:, 0, None, None]) / (wh[:, 0, None, None] / 2)
        dy = (ys - centers[:, 1, None, None]) / (wh[:, 1, None, None] / 2)
        targets.append(
            {
                "labels": torch.randint(1, num_classes, (num_gts,), generator=generator).to(device),
                "boxes": torch.cat([centers, wh], 1).to(device),
                "masks": (dx**2 + dy**2 <= 1).to(device),
            }
        )
    return images.to(device), mask.to(device), targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(
    module,
    images,
    mask,
    targets,
    steps: int,
    warmup: int,
    device,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Median seconds of forward, criterion and backward over `steps` steps after `warmup`.
    The forward is the module's (`DetectionModule.detect`: compiled where the module was configured
    so). `autocast` (e.g. torch.bfloat16): forward and criterion under autocast, as Lightning's
    bf16-mixed."""
    times = {part: [] for part in PARTS}
    for step in range(warmup + steps):
        module.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            # The module's training path: the batch's targets reach the detector where its training
            # query blocks are built from them (DN-DETR's denoising queries), as in training_step.
            out = module.detect(images, mask, targets)
            sync(device)
            t1 = time.perf_counter()
            total = module.criterion.total(module.criterion(out, targets))
        sync(device)
        t2 = time.perf_counter()
        total.backward()
        sync(device)
        t3 = time.perf_counter()
        if step >= warmup:
            for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(seconds)
    return {k: statistics.median(v) for k, v in times.items() if v}


# -- variants
# ----------------------------------------------------------------------------------------

_WORDS = ("compiled", "static", "eager", "bf16")
# The `masks` row of --masks: the mask head and its supervision on the same model.
MASK_OVERRIDES = ["+parts=mask_head"]


def variant_autocast(variant: str) -> torch.dtype | None:
    """A --compare variant with the word `bf16` runs forward and criterion under bf16 autocast."""
    return torch.bfloat16 if "bf16" in variant.split("-") else None


def variant_overrides(variant: str) -> list[str]:
    """Config overrides of a --compare variant: '-'-separated words, `compiled`, `static`, `eager`,
    `bf16` and at most one attention backend (default reference): `compiled-gather`,
    `bf16-triton`."""
    words = variant.split("-")
    backends = [w for w in words if w not in _WORDS]
    if (
        len(backends) > 1
        or ("static" in words and "compiled" not in words)
        or ("compiled" in words and "eager" in words)
    ):
        raise SystemExit(
            f"--compare variant {variant!r}: use [bf16-][compiled-[static-]]<attention backend> "
            "(reference, gather, triton, ...), or eager / compiled."
        )
    overrides = [f"model.attn_backend={backends[0] if backends else 'reference'}"]
    if "compiled" in words:
        overrides.append("model.compile=true")
        if "static" in words:
            overrides.append("model.compile_dynamic=false")
    return overrides


class PeakMemory:
    """Peak memory from `reset()` on: CUDA's allocator peak, or on CPU this process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs; where that fails, ru_maxrss since the start).
    `current()`: the memory in use now (allocated on CUDA, RSS on CPU), the baseline a step's peak
    is compared with (the worker takes it right after building the module, before any step)."""

    def __init__(self, device):
        self.device = device
        self.since_start = False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.since_start = True

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        if not self.since_start:
            hwm = _proc_status_gib("VmHWM")
            if hwm is not None:
                return hwm
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux

    def current(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        rss = _proc_status_gib("VmRSS")
        # No /proc: the high-water mark so far, which right after the build is about the RSS.
        return (
            rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )


def _proc_status_gib(field: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM, VmRSS) in GiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def _reply(**fields) -> None:
    print(_REPLY + json.dumps(fields), flush=True)


def worker(args, device, images, mask, targets) -> None:
    """One variant in its own process: build, warm up, then one timed step per 'step' line on
    stdin."""
    overrides = variant_overrides(args.variant) if args.variant else []
    overrides += [*args.override, *(MASK_OVERRIDES if args.with_masks else [])]
    try:
        torch.manual_seed(0)  # the same weights in every variant
        module = (
            build(args.matcher, args.model, args.backbone, 91, args.experiment, overrides)
            .to(device)
            .train()
        )
        # what the Trainer calls: compiles the detector with model.compile=true
        module.configure_model()
        built_gib = PeakMemory(device).current()  # weights, batch and libraries: before any step
        warmup = max(args.warmup, 2) if module.detector_compiled else args.warmup
        autocast = variant_autocast(args.variant) if args.variant else None
        start = time.perf_counter()
        if warmup:
            time_step(module, images, mask, targets, 0, warmup, device, autocast)
        warmup_s = time.perf_counter() - start
    # an attention backend this checkout lacks, a compile failure: one row says so
    except Exception as exc:
        _reply(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        return
    peak = PeakMemory(device)
    peak.reset()
    _reply(ready=True, warmup_s=warmup_s, warmup_steps=warmup, built_gib=built_gib)
    for line in sys.stdin:
        if line.strip() == "step":
            _reply(**time_step(module, images, mask, targets, 1, 0, device, autocast))
        elif line.strip() == "peak":
            _reply(peak_gib=peak.gib(), since_start=peak.since_start)


class Worker:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY) :])
        self.log.seek(0)
        tail = self.log.read()[-2000:]
        raise RuntimeError(f"the {self.name} worker ended (exit {self.proc.wait()}):\n{tail}")

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def interleaved(variants: dict[str, list[str]], common: list[str], steps: int) -> dict[str, dict]:
    """{variant: medians of its parts, peak memory, warm-up seconds} or {"unavailable": reason}.
    Workers start one after another, so a warm-up (a compilation) has the CPUs to itself."""
    results, workers = {}, {}
    try:
        for name, argv in variants.items():
            worker_ = Worker(name, [*common, *argv])
            ready = worker_.ask()
            if "error" in ready:
                results[name] = {"unavailable": ready["error"]}
                worker_.close()
                continue
            workers[name] = worker_
            results[name] = {
                "warmup_s": ready["warmup_s"],
                "built_gib": ready["built_gib"],
                **{part: [] for part in PARTS},
            }
        for _ in range(steps):
            for name, worker_ in workers.items():
                for part, seconds in worker_.ask("step").items():
                    results[name][part].append(seconds)
        for name, worker_ in workers.items():
            peak = worker_.ask("peak")
            results[name].update(peak_gib=peak["peak_gib"], peak_since_start=peak["since_start"])
            results[name].update({part: statistics.median(results[name][part]) for part in PARTS})
    finally:
        for worker_ in workers.values():
            worker_.close()
    return results


def print_table(results: dict[str, dict], label: str) -> None:
    base_name = next(n for n in results)
    base = (
        sum(results[base_name][p] for p in PARTS)
        if "unavailable" not in results[base_name]
        else None
    )
    base_mem = results[base_name].get("peak_gib")
    base_step_mem = _step_gib(results[base_name])
    print(
        f"| {label} | forward s | criterion s | backward s | step s | x {base_name} | peak memory "
        f"GiB | memory x {base_name} | step memory GiB | step memory x {base_name} | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "unavailable" in r:
            print(f"| `{name}` | unavailable: {r['unavailable']} | | | | | | | | | |")
            continue
        step_s = sum(r[p] for p in PARTS)
        ratio = f"{step_s / base:.2f}" if base else "-"
        mem_ratio = f"{r['peak_gib'] / base_mem:.2f}" if base_mem else "-"
        step_mem = _step_gib(r)
        step_mem_ratio = f"{step_mem / base_step_mem:.2f}" if base_step_mem else "-"
        print(
            f"| `{name}` | {r['forward']:.3f} | {r['criterion']:.3f} | {r['backward']:.3f} | "
            f"{step_s:.3f} | {ratio} | {r['peak_gib']:.2f}{'*' if r['peak_since_start'] else ''} "
            f"| {mem_ratio} | {step_mem:.2f} | {step_mem_ratio} | {r['warmup_s']:.1f} |"
        )
    print(
        "\npeak memory: the worker's peak over the timed steps (CUDA: max allocated; CPU: peak "
        "RSS, libraries and weights included); step memory: that peak less the memory in use "
        "right after the module was built, before any step (activations, gradients, the "
        "criterion's work)."
    )
    if any(r.get("peak_since_start") for r in results.values()):
        print(
            "\n*: peak over the whole process (warm-up included): the peak could not be reset here."
        )


def _step_gib(result: dict) -> float | None:
    """A variant's peak less its memory after the build (None for an unavailable one)."""
    if "peak_gib" not in result:
        return None
    return max(result["peak_gib"] - result["built_gib"], 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--matcher", default="hungarian")
    p.add_argument("--model", default="deformable_detr_two_stage_refine")
    p.add_argument(
        "--experiment",
        default=None,
        help="an experiment config instead of --model/--matcher "
        "(--compare: default ms_detr_pp_300)",
    )
    p.add_argument("--backbone", default=None, help="default resnet50 (--compare: resnet18)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (compiled variants: at least 2)"
    )
    p.add_argument("--gts", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the medians as JSON (one run)")
    p.add_argument(
        "--matchers",
        default=None,
        help="comma-separated matcher configs to compare on the same model and batch (first = "
        "baseline)",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="comma-separated execution variants (reference, gather, compiled, compiled-gather, "
        "...) of one model (first = baseline)",
    )
    p.add_argument("--variant", default=None, help="run one --compare variant in this process")
    p.add_argument(
        "--masks",
        action="store_true",
        help="two rows: the model without and with the mask head (+parts=mask_head)",
    )
    p.add_argument("--with-masks", action="store_true", help="the model with the mask head")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a config override for every row (repeatable), e.g. model.num_queries=100",
    )
    p.add_argument("--image-scale", type=float, default=1.0, help="scales the two images' sizes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if sum(map(bool, (args.matchers, args.compare, args.masks))) > 1:
        p.error("give one of --matchers, --compare and --masks")
    if args.compare or (args.variant and not args.worker):
        args.experiment = args.experiment or ("ms_detr_pp_300" if not args.matchers else None)
    args.backbone = args.backbone or ("resnet18" if args.compare or args.variant else "resnet50")
    device = torch.device(args.device)
    num_classes = 91
    gen = torch.Generator().manual_seed(0)
    images, mask, targets = synthetic_batch(args.gts, num_classes, device, gen, args.image_scale)
    if args.worker:
        worker(args, device, images, mask, targets)
        return
    what = f"experiment={args.experiment}" if args.experiment else f"model={args.model}"
    shapes = ", ".join(f"{ih}x{iw}" for ih, iw in _image_sizes(mask))
    header = (
        f"# train step: {what} backbone={args.backbone} device={device} "
        f"threads={torch.get_num_threads()} images=2 ({shapes}) gts/img={args.gts} median "
        f"of {args.steps} steps after {args.warmup} warm-up"
        + (f" overrides={' '.join(args.override)}" if args.override else "")
    )
    if not args.matchers and not args.compare and not args.masks:
        torch.manual_seed(0)
        overrides = variant_overrides(args.variant) if args.variant else []
        overrides += [*args.override, *(MASK_OVERRIDES if args.with_masks else [])]
        module = build(
            args.matcher, args.model, args.backbone, num_classes, args.experiment, overrides
        )
        module = module.to(device).train()
        module.configure_model()
        warmup = max(args.warmup, 2) if module.detector_compiled else args.warmup
        med = time_step(
            module,
            images,
            mask,
            targets,
            args.steps,
            warmup,
            device,
            variant_autocast(args.variant) if args.variant else None,
        )
        if args.json:
            print(json.dumps(med))
            return
        step_s = sum(med.values())
        print(header)
        print(f"# matcher={args.matcher}" + (f" variant={args.variant}" if args.variant else ""))
        print("| part | seconds | share |")
        print("|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.3f} | {100 * v / step_s:.1f}% |")
        print(f"| step | {step_s:.3f} | 100% |")
        return
    common = [
        "--model",
        args.model,
        "--backbone",
        args.backbone,
        "--gts",
        str(args.gts),
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        *(["--experiment", args.experiment] if args.experiment else []),
        "--image-scale",
        str(args.image_scale),
        *(f"--override={o}" for o in args.override),
    ]
    if args.masks:
        variants = {
            "boxes": ["--matcher", args.matcher],
            "masks": ["--matcher", args.matcher, "--with-masks"],
        }
        label = "model"
    elif args.matchers:
        variants = {m: ["--matcher", m] for m in args.matchers.split(",")}
        label = "matcher"
    else:
        variants = {v: ["--matcher", args.matcher, "--variant", v] for v in args.compare.split(",")}
        for v in variants:
            variant_overrides(v)  # a malformed name stops here, before any worker starts
        label = "variant"
    results = interleaved(variants, common, args.steps)
    print(
        header + f" ({'compiled variants: at least 2; ' if args.compare else ''}never timed), "
        f"{label}s interleaved, one process each"
    )
    print_table(results, label)


def _image_sizes(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The (H, W) of each image of the batch, from its padding mask (True on padding)."""
    return [(int((~m[:, 0]).sum()), int((~m[0]).sum())) for m in mask.cpu()]


if __name__ == "__main__":
    sys.exit(main())
