"""Counting host-device synchronisations on the CPU, and a synthetic MS-DETR criterion case to count
them on (tests/test_host_syncs.py, tests/test_cls_losses.py)."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from msdetr.losses import Branch
from msdetr.matching import HungarianMatcher, MixedScoreTopKAssigner

NUM_CLASSES = 5


def ms_detr_branches(seed=0):
    hungarian = HungarianMatcher()
    return [
        Branch("main", hungarian),
        Branch("o2m_outputs", MixedScoreTopKAssigner(seed=seed), suffix="_o2m", merge_with="main"),
        Branch(
            "enc_outputs",
            HungarianMatcher(cost_class=0, box_key="anchors"),
            suffix="_enc",
            aux=False,
            binary=True,
            required=False,
        ),
    ]


aten = torch.ops.aten
# Ops that read device data on the host or produce a shape that depends on it.
SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    torch.ops.torchvision.nms.default,
}


class SyncCounter(TorchDispatchMode):
    """Counts what would synchronise with a GPU in a CPU run.

    On the CPU every tensor lives on the host, so the counter tracks which tensors stand for device
    data: all of them, except host copies (`Tensor.cpu()`, patched to count the copy), draws of
    `torch.randperm` (the assigners draw on the host by design) and what is computed from host
    tensors alone. Counted: a sync op or a boolean mask index on device data, `.cpu()` of device
    data, and `.tolist()` / `.numpy()` of device data (those bypass the dispatcher, so they are
    patched too)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.host = WeakIdKeyDictionary()

    def is_device(self, t: torch.Tensor) -> bool:
        return t not in self.host

    def mark_host(self, out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.host[t] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_device = any(self.is_device(t) for t in tensors)
        if on_device:
            if func in SYNC_OPS:
                self.counts[str(func.overloadpacket)] += 1
            elif func in (
                aten.index.Tensor,
                aten.index_put.default,
                aten.index_put_.default,
            ) and any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.counts["boolean index"] += 1
        out = func(*args, **kwargs)
        if (
            func is aten.randperm.default
            or func is aten.randperm.generator
            or (tensors and not on_device)
        ):
            self.mark_host(out)
        return out

    def __enter__(self):
        counter = self
        self._patched = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy")}
        cpu, tolist, numpy = (self._patched[n] for n in ("cpu", "tolist", "numpy"))

        def patched_cpu(t, *a, **k):
            if not counter.is_device(t):
                return cpu(t, *a, **k)
            counter.counts["copy to host"] += 1
            # a new tensor even on the CPU, to mark it as the host copy
            out = cpu(t, *a, **k).clone()
            counter.host[out] = True
            return out

        def read(name, original):
            def patched(t, *a, **k):
                if counter.is_device(t):
                    counter.counts[name] += 1
                return original(t, *a, **k)

            return patched

        torch.Tensor.cpu = patched_cpu
        torch.Tensor.tolist = read("tolist", tolist)
        torch.Tensor.numpy = read("numpy", numpy)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def synthetic_ms_detr_outputs(num_layers: int, num_images: int, q=30, seed=0):
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {
            "pred_logits": torch.randn(num_images, q, NUM_CLASSES, generator=g),
            "pred_boxes": torch.rand(num_images, q, 4, generator=g) * 0.4 + 0.3,
        }

    def stream():
        layers = [layer() for _ in range(num_layers)]
        return {**layers[-1], "aux_outputs": layers[:-1]}

    out = stream()
    out["o2m_outputs"] = stream()
    out["enc_outputs"] = {
        **layer(),
        "anchors": torch.rand(num_images, q, 4, generator=g) * 0.4 + 0.3,
    }
    targets = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.35,
        }
        for n in (4, 0, 6)[:num_images]
    ]
    return out, targets
