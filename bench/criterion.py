"""Cost of the whole criterion (o2o + o2m + encoder branches, every layer) beside forward +
backward.

python bench/criterion.py [--experiment ms_detr_pp_900] [--gts 40] [--steps 3] [--device cpu|cuda]
On CUDA it also counts the device-to-host copies made inside the criterion (goal: one per step,
the Hungarian cost matrices of all layers and images together).
"""

from __future__ import annotations

import argparse

import torch
from train_step import build, synthetic_batch, time_step


def count_dtoh(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "Memcpy DtoH" in e.name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experiment", default="ms_detr_pp_900")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--gts", type=int, default=40)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = build("", "", args.backbone, 91, experiment=args.experiment).to(device)
    module.train()
    images, mask, targets = synthetic_batch(args.gts, 91, device, torch.Generator().manual_seed(0))
    med = time_step(module, images, mask, targets, args.steps, 1, device)
    f, c, b = med["forward"], med["criterion"], med["backward"]
    print(
        f"# criterion: experiment={args.experiment} backbone={args.backbone} device={device} "
        f"threads={torch.get_num_threads()} images=2 gts/img={args.gts} loss "
        f"terms={len(module.criterion.weight_dict)} steps={args.steps} (median)"
    )
    print("| part | seconds | share of step |")
    print("|---|---|---|")
    for name, v in (("forward", f), ("criterion", c), ("backward", b)):
        print(f"| {name} | {v:.3f} | {100 * v / (f + c + b):.1f}% |")
    if device.type == "cuda":
        out = module.model(images, mask)
        print(
            "device-to-host copies inside the criterion: "
            f"{count_dtoh(lambda: module.criterion(out, targets))}"
        )


if __name__ == "__main__":
    main()
