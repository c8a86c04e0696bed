"""Augmentations that are a function of (seed, epoch, image index), whatever process draws them.

The transforms draw from torch's global generator. Wrapped here, each sample draws from a generator
seeded by (seed, epoch, index) instead, so the augmentations of a run do not depend on how many
workers load it, on which rank, or on whether it was interrupted and resumed mid-epoch: a resumed
run sees exactly the images the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constants: distinct (seed, epoch, index) give distinct seeds
_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    h = (seed * _MIX + epoch) & _MASK
    return ((h * _MIX) + index) & _MASK


def order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s loader generator (sample order, loader base seed)."""
    return sample_seed(seed, epoch, _MASK)


def epoch_generator(
    seed: int, epoch: int, generator: torch.Generator | None = None
) -> torch.Generator:
    """`generator` (or a new one) seeded for epoch `epoch`: a loader that draws from it, not from
    torch's global generator, gives every epoch the same order whether the process ran the epochs
    before it or resumed from a checkpoint."""
    generator = generator if generator is not None else torch.Generator()
    generator.manual_seed(order_seed(seed, epoch))
    return generator


class MapDataset(Protocol):
    """A map-style dataset with a length (what `torch.utils.data.Dataset` leaves optional)."""

    def __getitem__(self, index: int) -> Any: ...

    def __len__(self) -> int: ...


class EpochSeededDataset(Dataset):
    """`dataset[i]` drawn under the seed of (seed, epoch, i). The epoch lives in shared memory, so
    `set_epoch` reaches persistent DataLoader workers too."""

    def __init__(self, dataset: MapDataset, seed: int, epoch: int = 0):
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.tensor(int(epoch), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, int(self._epoch), index))
            return self.dataset[index]
