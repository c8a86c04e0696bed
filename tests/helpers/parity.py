"""Helpers for the parity fixtures: rebuild their weights, batch their images, compare tensors."""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def synth_tensor(name: str, shape, mean: float, std: float) -> torch.Tensor:
    """The fixture generator: uniform from a per-name counter hash, scaled to the stored
    mean/std."""
    numel = int(np.prod(shape)) if len(shape) else 1
    with np.errstate(over="ignore"):
        counters = np.arange(numel, dtype=np.uint64) + np.uint64(_fnv1a64(name))
    u = (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    values = mean + std * np.sqrt(3.0) * (2.0 * u - 1.0)
    return torch.from_numpy(values.astype(np.float32)).reshape(tuple(shape))


def fixture_state_dict(fx: dict) -> dict[str, torch.Tensor]:
    sd = {
        name: synth_tensor(name, s["shape"], s["mean"], s["std"]) for name, s in fx["synth"].items()
    }
    sd.update(fx["explicit"])
    return {k: sd[k] for k in fx["order"]}


def fixture_batch(fx: dict) -> tuple[torch.Tensor, torch.Tensor]:
    images = fx["images"]
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the largest magnitude of the expected tensor."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-12)
    return ((actual - expected).abs().max() / scale).item()


def flatten_outputs(out: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested output dict -> {'aux_outputs.0.pred_logits': tensor, ...}."""
    flat = {}
    for key, value in out.items():
        name = f"{prefix}{key}"
        if torch.is_tensor(value):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(flatten_outputs(value, name + "."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flatten_outputs(item, f"{name}.{i}."))
    return flat


def feed_fixture_denoising(block, fx: dict) -> None:
    """Make a contrastive denoising block draw the very noise of a DINO fixture (`fx['dn']`) instead
    of
    its own: its two random draws (`noised_labels`, `noised_boxes`) are replaced, on this instance
    only, by the fixture's noised labels and boxes, image after image, in the block's layout (copy c
    of GT j at row c * n + j; DINO pads every copy to the largest GT count, `single_pad`)."""
    dn = fx["dn"]
    copies, largest = 2 * dn["num_dn_group"], dn["single_pad"]
    image = iter(range(len(fx["targets"])))
    current = {}

    def labels(given: torch.Tensor) -> torch.Tensor:
        b = current["b"] = next(image)
        n = len(fx["targets"][b]["labels"])
        assert given.numel() == copies * n, (
            "the block made another number of denoising groups than DINO"
        )
        return dn["labels"][b].view(copies, largest)[:, :n].reshape(-1).to(given.device)

    def boxes(given: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        b = current["b"]
        n = len(fx["targets"][b]["labels"])
        return dn["boxes"][b].view(copies, largest, 4)[:, :n].reshape(-1, 4).to(given)

    block.noised_labels = labels
    block.noised_boxes = boxes


def feed_dn_detr_denoising(block, fx: dict) -> None:
    """Make a denoising block draw the very noise of a DN-DETR fixture (`fx['dn']`): its two random
    draws are replaced, on this instance only, by DN-DETR's noised labels and boxes, image after
    image. DN-DETR lays them out group by group, each group all images' GTs in batch order (its
    `labels.repeat(scalar, 1)` over the concatenated targets); the block wants copy c of GT j of
    one image at row c * n + j."""
    dn = fx["dn"]
    counts = [len(t["labels"]) for t in fx["targets"]]
    total, groups = sum(counts), dn["scalar"]
    image = iter(range(len(counts)))
    current = {}

    def rows(b: int) -> torch.Tensor:
        start = sum(counts[:b])
        return (
            torch.arange(groups)[:, None] * total + start + torch.arange(counts[b])[None]
        ).reshape(-1)

    def labels(given: torch.Tensor) -> torch.Tensor:
        b = current["b"] = next(image)
        assert given.numel() == groups * counts[b], (
            "the block made another number of denoising groups than DN-DETR"
        )
        return dn["labels"][rows(b)].to(given.device)

    def boxes(given: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return dn["boxes"][rows(current["b"])].to(given)

    block.noised_labels = labels
    block.noised_boxes = boxes


def dn_detr_loss_name(official: str) -> str:
    """This criterion's name of a DN-DETR loss: its denoising `tgt_loss_ce[_i]` is `loss_ce[_i]_dn`;
    the matching losses keep their names."""
    if not official.startswith("tgt_"):
        return official
    name, _, layer = official[4:].rpartition("_")
    return f"{name}_{layer}_dn" if layer.isdigit() else f"{official[4:]}_dn"
