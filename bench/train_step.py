"""Seconds per training step on CPU (or GPU), split into forward / criterion / backward.

python bench/train_step.py [--matcher hungarian] [--steps 5] [--device cpu] [--backbone resnet50]
python bench/train_step.py --matchers hungarian,ms_detr,deta,h_detr   # one table, cost x hungarian
Default: two-stage + box refinement, 2 images ~384x512, 300 queries, 20 GTs per image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def build(matcher: str, model: str, backbone: str, num_classes: int, experiment: str | None = None):
    """The module of an experiment, or of a model + matcher pair, with a random-init backbone."""
    from msdetr.runner import build_module

    chosen = [f"experiment={experiment}"] if experiment else ["~experiment", f"model={model}", f"matcher={matcher}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            *chosen, "data=coco", f"data.num_classes={num_classes}",
            f"model.detector.backbone.name={backbone}", "model.detector.backbone.pretrained=false",
        ])
    return build_module(cfg)


def synthetic_batch(num_gts: int, num_classes: int, device, generator):
    """Two padded images (384x512, 352x480) with `num_gts` random boxes each."""
    sizes = [(384, 512), (352, 480)]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.randn(len(sizes), 3, h, w, generator=generator)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    targets = []
    for i, (ih, iw) in enumerate(sizes):
        mask[i, :ih, :iw] = False
        centers = torch.rand(num_gts, 2, generator=generator) * 0.6 + 0.2
        wh = torch.rand(num_gts, 2, generator=generator) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (num_gts,), generator=generator).to(device),
                        "boxes": torch.cat([centers, wh], 1).to(device)})
    return images.to(device), mask.to(device), targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(module, images, mask, targets, steps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds of forward, criterion and backward over `steps` steps after `warmup`."""
    times = {"forward": [], "criterion": [], "backward": []}
    for step in range(warmup + steps):
        module.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        out = module.model(images, mask)
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
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matcher", default="hungarian")
    p.add_argument("--model", default="deformable_detr_two_stage_refine")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gts", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one matcher's medians as JSON (used by --matchers)")
    p.add_argument("--matchers", default=None,
                   help="comma-separated matcher configs to compare on the same model and batch (first = baseline)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    num_classes = 91
    gen = torch.Generator().manual_seed(0)
    images, mask, targets = synthetic_batch(args.gts, num_classes, device, gen)
    matchers = args.matchers.split(",") if args.matchers else [args.matcher]
    if len(matchers) == 1:
        torch.manual_seed(0)
        module = build(matchers[0], args.model, args.backbone, num_classes).to(device).train()
        results = {matchers[0]: time_step(module, images, mask, targets, args.steps, args.warmup, device)}
        if args.json:
            print(json.dumps(results[matchers[0]]))
            return
    else:
        # Each of the `steps` rounds times one step of every matcher, each in a fresh process: a
        # shared process keeps the allocator state (and memory) of the largest model, and rounds
        # spread a drifting machine speed (shared CPUs) over all matchers alike.
        times = {m: {"forward": [], "criterion": [], "backward": []} for m in matchers}
        for _ in range(args.steps):
            for matcher in matchers:
                cmd = [sys.executable, __file__, "--matcher", matcher, "--model", args.model, "--backbone",
                       args.backbone, "--gts", str(args.gts), "--device", args.device, "--steps", "1",
                       "--warmup", str(args.warmup), "--json"]
                step = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                for part, seconds in step.items():
                    times[matcher][part].append(seconds)
        results = {m: {part: statistics.median(v) for part, v in parts.items()} for m, parts in times.items()}
    print(f"# train step: model={args.model} backbone={args.backbone} device={device} "
          f"threads={torch.get_num_threads()} images=2 (384x512, 352x480) gts/img={args.gts} "
          f"median of {args.steps} steps after {args.warmup} warm-up" + (", matchers interleaved" if len(matchers) > 1 else ""))
    if len(matchers) == 1:
        med = results[matchers[0]]
        step_s = sum(med.values())
        print(f"# matcher={matchers[0]}")
        print("| part | seconds | share |")
        print("|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.3f} | {100 * v / step_s:.1f}% |")
        print(f"| step | {step_s:.3f} | 100% |")
        return
    base = sum(results[matchers[0]].values())
    print(f"| matcher | forward s | criterion s | backward s | step s | x {matchers[0]} |")
    print("|---|---|---|---|---|---|")
    for matcher, med in results.items():
        step_s = sum(med.values())
        print(f"| `{matcher}` | {med['forward']:.3f} | {med['criterion']:.3f} | {med['backward']:.3f} | "
              f"{step_s:.3f} | {step_s / base:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
