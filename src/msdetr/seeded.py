"""`Seeded`: what draws random numbers from a generator of its own (assigners, denoising blocks)."""

from __future__ import annotations

import torch


class Seeded:
    """Draws from `generator` (a CPU `torch.Generator` made from `seed`), or from torch's global
    generator where `generator` is None, as the official code does.

    `DetectionModule` finds every `Seeded` among the criterion's assigners and the detector's
    training query blocks: when a fit starts on rank r > 0 it calls `seed_rank(r)`, and it saves
    each non-None `generator`'s state with the checkpoint's random state (in the order found, so a
    resume needs the same assigners and blocks) and puts it back on resume.
    """

    seed: int | None = None
    generator: torch.Generator | None = None

    def seed_rank(self, rank: int) -> None:
        """Give process `rank` its own draws: the generator restarts from seed + rank (as the
        official main.py seeds each process), so DDP ranks do not draw the same numbers. Nothing
        to do without a generator of its own (the global one is seeded per process)."""
        if self.generator is not None and self.seed is not None:
            self.generator.manual_seed(self.seed + rank)
