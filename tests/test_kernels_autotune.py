"""Autotuning and compilation of the Triton MSDA kernels over a simulated training epoch with the
DETR multi-scale augmentation (issue 24 section 3): how many autotune keys and how many compiled
specializations the image sizes give, counted with Triton's own code on the CPU.

- Autotune keys: the kernels' real `triton.runtime.autotuner.Autotuner.run` computes them (Triton
  3.8 builds the key inline there: the `key` arguments' values plus the dtype of every tensor
  argument) and stores the chosen config in `Autotuner.cache` under it; the test counts that cache.
  The kernel itself is replaced by a recorder, and the benchmark by a stand-in timing.
- Specializations: what `JITFunction.run` compiles a new kernel for is the key of
  `triton.runtime.jit.compute_cache_key` over the specialization list that the function made by
  `triton.runtime.jit.create_function_from_signature` (the launcher's binder, with Triton's native
  `specialize_impl`) returns for the launch's arguments. The recorder builds that binder for the
  CUDA backend of sm_90 (no GPU needed) from a JITFunction of the kernel's Python source with the
  kernel's own `triton.jit` options (`do_not_specialize`), which the interpreter keeps in
  `InterpretedFunction.kwargs`.
"""

import math
import random

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

from msdetr.data.transforms import COCO_TRAIN_SCALES, detr_resize_size
from msdetr.kernels import triton_msda

HEADS, HEAD_DIM, POINTS, QUERIES = 8, 32, 4, 300
# Short side x long side of COCO train images (most are 640 on the long side), both orientations.
COCO_LIKE = [(480, 640), (427, 640), (424, 640), (360, 640), (375, 500), (612, 612), (640, 640)]


def _train_size(rng: random.Random) -> tuple[int, int]:
    """(h, w) of one training image after the COCO recipe (msdetr.data.transforms.train_transforms):
    with p 0.5 a multi-scale resize; else resize to 400/500/600, a random crop of 384-600 per
    side, then the multi-scale resize; the final short side from COCO_TRAIN_SCALES, the long side
    capped at 1333."""
    short, long = rng.choice(COCO_LIKE)
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    if rng.random() < 0.5:
        h, w = detr_resize_size(h, w, rng.choice((400, 500, 600)))
        h, w = rng.randint(min(384, h), min(600, h)), rng.randint(min(384, w), min(600, w))
    return detr_resize_size(h, w, rng.choice(COCO_TRAIN_SCALES), 1333)


def _level_shapes(h: int, w: int, levels: int = 4) -> list[tuple[int, int]]:
    """The (H, W) of the stride 8, 16, 32 (ResNet C3-C5: every stride-2 convolution rounds up) and
    64 (a stride-2 3x3 convolution on C5) maps of a padded batch of (h, w)."""
    shapes = [(math.ceil(h / 8), math.ceil(w / 8))]
    while len(shapes) < levels:
        sh, sw = shapes[-1]
        shapes.append((math.ceil(sh / 2), math.ceil(sw / 2)))
    return shapes


def simulated_epoch(batches: int, batch_size: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """The level shapes of every batch of an epoch: N images padded to the largest h and w."""
    rng = random.Random(seed)
    epoch = []
    for _ in range(batches):
        sizes = [_train_size(rng) for _ in range(batch_size)]
        epoch.append(_level_shapes(max(h for h, _ in sizes), max(w for _, w in sizes)))
    return epoch


def _binder(interpreted, keep_options: bool):
    """Triton's launch binder for CUDA sm_90 of the kernel's source, with its `triton.jit` options
    (or none, as kernel v2 had, when keep_options is False)."""
    options = interpreted.kwargs if keep_options else {}
    fn = JITFunction(interpreted.fn, **{k: v for k, v in options.items() if v is not None})
    return create_function_from_signature(
        fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32))
    )


class _Recorder:
    """Stands in for the kernel under the autotuner: records the specialization key of each launch
    (what JITFunction.run would compile for)."""

    def __init__(self, binder):
        self.binder = binder
        self.keys = []

    def run(self, *args, grid, warmup, **kwargs):
        _, specialization, options = self.binder(*args, **kwargs)
        self.keys.append(compute_cache_key({}, specialization, options))


def _launch(kernel, kind, shapes, batch_size, lq, dtype, query_class=None):
    """One launch of `kernel` as the op does it, with tiny stand-in tensors for the pointers (only
    their dtype and alignment matter to the key and the specialization) and the sizes of
    `shapes`."""
    s = sum(h * w for h, w in shapes)
    # Meta tensors: the op's own _meta reads only their shapes and dtypes.
    value = torch.empty(batch_size, s, HEADS, HEAD_DIM, dtype=dtype, device="meta")
    loc = torch.empty(batch_size, lq, HEADS, len(shapes), POINTS, 2, device="meta")
    meta = triton_msda._meta(value, loc)
    if query_class is not None:
        meta["LQ_CLASS"] = query_class(lq)

    def tiny(dt):
        return torch.empty(16, dtype=dt)

    pointers = {
        "fwd": [tiny(dtype), tiny(torch.int64), tiny(torch.int64), tiny(torch.float32)]
        + [tiny(dtype), tiny(dtype)],
        "bwd": [tiny(dtype), tiny(dtype), tiny(torch.int64), tiny(torch.int64)]
        + [tiny(torch.float32), tiny(dtype), tiny(torch.float32), tiny(torch.float32)]
        + [tiny(dtype)],
    }[kind]
    extra = {"VALUE_GRAD": True} if kind == "bwd" else {}
    kernel[(1,)](*pointers, **meta, **extra)


def _count(monkeypatch, epoch, batch_size, keep_options=True, query_class=None, dtype=None):
    """Per kernel: (the autotuner's keys in order of first use, with the batch index of that use;
    the distinct specializations compiled)."""
    counts = {}
    for kind, kernel in (
        ("fwd", triton_msda._msda_fwd_kernel),
        ("bwd", triton_msda._msda_bwd_kernel),
    ):
        recorder = _Recorder(_binder(kernel.fn, keep_options))
        monkeypatch.setattr(kernel, "fn", recorder)
        # Two configs, so that the autotuner keys its cache as on a GPU (the interpreter has one),
        # the pruner keeping both (it keeps one off CUDA), and a stand-in timing.
        monkeypatch.setattr(kernel, "configs", kernel.configs * 2)
        monkeypatch.setattr(kernel, "early_config_prune", lambda configs, nargs, **kw: configs)
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, **kwargs: [1.0, 1.0, 1.0])
        first_use = {}
        for i, shapes in enumerate(epoch):
            s = sum(h * w for h, w in shapes)
            for lq in (s, QUERIES):  # the encoder's queries are the value's pixels
                _launch(kernel, kind, shapes, batch_size, lq, dtype or torch.float32, query_class)
                for key in kernel.cache:
                    first_use.setdefault(key, i)
        counts[kind] = (first_use, set(recorder.keys))
    return counts


BATCH = 4
EPOCH = simulated_epoch(batches=1500, batch_size=BATCH)


def test_the_simulated_epoch_has_many_value_lengths():
    lengths = {sum(h * w for h, w in shapes) for shapes in EPOCH}
    assert len(lengths) > 500
    # All encoders are in one capped class: the smallest padded batch is over 4096 pixels at stride
    # 8 and beyond (480 px short side).
    assert min(lengths) >= 4096
    assert {triton.next_power_of_2(s) for s in lengths} >= {8192, 16384, 32768}


def test_autotuning_and_compiles_over_an_epoch_are_bounded(monkeypatch):
    counts = _count(monkeypatch, EPOCH, BATCH)
    for kind, (first_use, specializations) in counts.items():
        # One key for every encoder, one for the decoder's 300 queries: both tuned in the first
        # batch, none later (no rank waits on another's mid-training tuning).
        assert len(first_use) == 2, (kind, list(first_use))
        assert set(first_use.values()) == {0}, (kind, first_use)
        classes = {key[triton_msda._TUNE_KEY.index("LQ_CLASS")] for key in first_use}
        assert classes == {triton_msda.query_class(QUERIES), 4096}
        # One specialization per config whatever the sizes: Lq and S are not specialized.
        assert len(specializations) == 1, (kind, len(specializations))


def test_kernel_v2_settings_compiled_per_size_class(monkeypatch):
    """The same epoch under kernel v2's settings (power-of-two query classes, every integer
    specialized on % 16): what the bound above improves on."""
    counts = _count(
        monkeypatch, EPOCH, BATCH, keep_options=False, query_class=triton.next_power_of_2
    )
    for kind, (first_use, specializations) in counts.items():
        assert len(first_use) >= 4, kind  # 3+ encoder classes and the decoder
        assert max(first_use.values()) > 0, kind  # tuned again mid-epoch
        assert len(specializations) >= 3, kind  # S % 16 and Lq % 16 both ways


def test_bf16_adds_one_key_per_class(monkeypatch):
    counts = _count(monkeypatch, EPOCH[:50], BATCH, dtype=torch.bfloat16)
    for kind, (first_use, specializations) in counts.items():
        assert len(first_use) == 2 and len(specializations) == 1, kind
        assert all("torch.bfloat16" in key for key in first_use), kind


@pytest.mark.parametrize(
    "lq, cls", [(1, 1), (3, 4), (300, 512), (900, 1024), (4097, 4096), (90000, 4096)]
)
def test_query_class(lq, cls):
    assert triton_msda.query_class(lq) == cls
