"""Images per second of detector inference: eval mode, post-processing included, random-init
    backbone.

python bench/infer.py [--device cpu|cuda] [--size HxW] [--batch 4] [--backbone NAME] [--iters 3]
                      [--models two_stage,ms_detr_pp_900,deta] [--dtypes fp32,bf16] [--modes
                      eager,compiled] [--compile-models two_stage,...] [--tiny]
Models: `model=deformable_detr_two_stage_refine` (300 queries), `experiment=ms_detr_pp_900` and
`model=deta` (900 queries, 5 levels, NMS post-processing). Every model in fp32 and in bf16
(autocast), eager and `torch.compile(model, dynamic=True)`. A case that fails (a compile error, say)
is a row with
the error's first line, not a crash. Defaults: 384x512 and ResNet-18 on the CPU, 800x1333 and
ResNet-50 on CUDA. The first call (compilation included) is reported apart from the timed calls.
--tiny: tiny model and images, one timed call (a smoke test of the script, numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

# name: (config selection, description)
MODELS = {
    "two_stage": (
        ["~experiment", "model=deformable_detr_two_stage_refine", "matcher=hungarian"],
        "model=deformable_detr_two_stage_refine",
    ),
    "ms_detr_pp_900": (["experiment=ms_detr_pp_900"], "experiment=ms_detr_pp_900"),
    "deta": (["~experiment", "model=deta", "matcher=hungarian"], "model=deta"),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TINY = [
    "model.hidden_dim=32",
    "model.nheads=2",
    "model.detector.encoder.num_layers=1",
    "model.detector.decoder.num_layers=1",
    "model.dim_feedforward=32",
    "model.num_queries=12",
    "model.postprocess.num_select=10",
]


def build(name: str, backbone: str, num_classes: int, extra: list[str]):
    """The DetectionModule of a model, with a random-init backbone, in eval mode."""
    from msdetr.run.build import build_module

    chosen, _ = MODELS[name]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *chosen,
                "data=coco",
                f"data.num_classes={num_classes}",
                f"model.detector.backbone.name={backbone}",
                "model.detector.backbone.pretrained=false",
                *extra,
            ],
        )
    return build_module(cfg).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    module, images, mask, sizes, dtype, compiled: bool, iters: int, warmup: int, device
) -> dict:
    """Seconds of the first call and median seconds of `iters` calls after `warmup` more."""
    model = torch.compile(module.model, dynamic=True) if compiled else module.model
    autocast_dtype = DTYPES[dtype]

    @torch.no_grad()
    def call():
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            outputs = model(images, mask)
        return module.postprocess(outputs, sizes)

    sync(device)
    t0 = time.perf_counter()
    dets = call()
    sync(device)
    first = time.perf_counter() - t0
    if len(dets) != images.shape[0]:
        raise RuntimeError(
            f"post-processing returned {len(dets)} results for {images.shape[0]} images"
        )
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "batch_s": statistics.median(times)}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes HxW, e.g. 384x512, not {text!r}") from None
    return h, w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="HxW (default 384x512 on cpu, 800x1333 on cuda)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--backbone", default=None, help="default resnet18 on cpu, resnet50 on cuda")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed calls per case (default 3 on cpu, 20 on cuda)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls after the first (default 0 on cpu, 3 on cuda)",
    )
    p.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument(
        "--compile-models",
        default=None,
        help="models to run compiled (default: all of --models); the others get eager rows only",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for every model",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny model and 64x64 images: a smoke test of the script",
    )
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench/infer.py --device cuda: torch.cuda.is_available() is False; nothing was "
            "measured."
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    size = args.size or ((64, 64) if args.tiny else (384, 512) if cpu else (800, 1333))
    backbone = args.backbone or ("resnet18" if cpu or args.tiny else "resnet50")
    iters = args.iters if args.iters is not None else (1 if args.tiny else 3 if cpu else 20)
    warmup = args.warmup if args.warmup is not None else (0 if cpu or args.tiny else 3)
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    compile_models = (
        models if args.compile_models is None else [m for m in args.compile_models.split(",") if m]
    )
    for what, chosen, allowed in (
        ("model", models + compile_models, MODELS),
        ("dtype", dtypes, DTYPES),
        ("mode", modes, ("eager", "compiled")),
    ):
        bad = sorted(set(chosen) - set(allowed))
        if bad:
            p.error(f"unknown {what}(s) {bad}; choose from {', '.join(allowed)}")
    extra = (TINY if args.tiny else []) + list(args.set)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, *size, generator=generator).to(device)
    mask = torch.zeros(args.batch, *size, dtype=torch.bool, device=device)
    sizes = torch.tensor([list(size)] * args.batch, device=device)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"cpu ({platform.processor() or platform.machine()})")
    )
    print(
        f"# inference: device {name}; {date}; torch {torch.__version__}; threads "
        f"{torch.get_num_threads()}; batch {args.batch} x {size[0]}x{size[1]}; backbone "
        f"{backbone} (random init); eval mode, post-processing included; median of {iters} "
        f"call(s) after the first + {warmup} warm-up"
        + ("; --tiny (numbers mean nothing)" if args.tiny else "")
        + (f"; overrides {args.set}" if args.set else "")
    )
    print()
    print("| model | dtype | mode | first call s | s / batch | images / s | note |")
    print("|---|---|---|---|---|---|---|")
    for model_name in models:
        torch.manual_seed(0)
        try:
            module = build(model_name, backbone, 91, extra).to(device)
        except Exception as exc:  # noqa: BLE001 -- one broken config is a row, the others still run
            for dtype in dtypes:
                for mode in modes:
                    print(
                        f"| {MODELS[model_name][1]} | {dtype} | {mode} | - | - | - | "
                        f"build failed: {_first_line(exc)} |",
                        flush=True,
                    )
            continue
        for mode in modes:
            if mode == "compiled" and model_name not in compile_models:
                continue
            for dtype in dtypes:
                try:
                    r = run_case(
                        module,
                        images,
                        mask,
                        sizes,
                        dtype,
                        mode == "compiled",
                        iters,
                        warmup,
                        device,
                    )
                except Exception as exc:  # noqa: BLE001 -- a compile failure is reported, not raised
                    print(
                        f"| {MODELS[model_name][1]} | {dtype} | {mode} | - | - | - | "
                        f"failed: {_first_line(exc)} |",
                        flush=True,
                    )
                    continue
                finally:
                    if mode == "compiled":
                        torch._dynamo.reset()
                print(
                    f"| {MODELS[model_name][1]} | {dtype} | {mode} | {r['first_s']:.2f} | "
                    f"{r['batch_s']:.3f} | {args.batch / r['batch_s']:.2f} | |",
                    flush=True,
                )
        del module
    return 0


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text.replace("|", "/")[:200]


if __name__ == "__main__":
    sys.exit(main())
