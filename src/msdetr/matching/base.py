"""The assigner contract: everything `SetCriterion` and `DetectionModule` use of an assigner."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..seeded import Seeded

# Per image, (query indices, target indices) of the pairs, in the assigner's own order.
Indices = list[tuple[torch.Tensor, torch.Tensor]]


class Assigner(Seeded):
    """Which query is supervised by which ground truth, for one decoder layer's outputs.

    A new assigner is one subclass: it implements `assign` (one call) or, to batch every call of a
    training step, the classmethod `assign_many`, and overrides the hooks whose defaults do not
    fit. The criterion calls nothing else, and asks no assigner what it is:

    - `box_key` (attribute, default "pred_boxes"): the outputs' key of the boxes it matches
      against ("anchors" on the encoder stream, "init_reference" for the decoder's input
      proposals); `SetCriterion.check_model` refuses a branch whose stream lacks it.
    - `assign_many` / `batch_group`: the criterion groups a step's calls by `batch_group()` and
      hands each group to that class's `assign_many`, under `torch.no_grad`.
    - `normalizer_scale(outputs, targets)`: a factor on the branch's loss normalizer (1).
    - `class_loss_mask(outputs, targets)`: the queries that enter the classification loss (all).
    - `seed`, `generator`, `seed_rank(rank)` (from `Seeded`): an assigner that draws at random
      draws from `generator` (None: torch's global one); `DetectionModule` reseeds it per rank and
      saves its state with every checkpoint.
    """

    box_key: str = "pred_boxes"

    def assign(self, outputs: dict, targets: list[dict]) -> Indices:
        """One layer: `outputs` holds its `pred_logits` (B, Q, C), `pred_boxes` and `box_key`;
        per image, (query index, target index) of every pair, on the outputs' device. A query may be
        in several pairs (one-to-many); the classification loss gives it the class of its last
        pair, so the order of the pairs is part of the assigner's rule."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither assign nor assign_many."
        )

    @classmethod
    def assign_many(cls, calls: Sequence[tuple[Assigner, dict, list[dict]]]) -> list[Indices]:
        """Per (assigner, outputs, targets) call what `assigner.assign(outputs, targets)` returns.

        The criterion passes every call of a step whose assigners share this `batch_group` at
        once, in the order of the official random draws (per branch its last layer, then the aux
        layers in order); their assigners may be different instances, or subclasses, of the group.
        A subclass overrides this to batch them: e.g. one device-to-host copy for all the calls.
        """
        return [assigner.assign(outputs, targets) for assigner, outputs, targets in calls]

    @classmethod
    def batch_group(cls) -> type[Assigner]:
        """The class whose `assign_many` takes this class's calls: the nearest class (in the MRO)
        that defines `assign_many`. So the subclasses of an assigner that batches (MS-DETR's and
        DETA's quality assigners) are batched together; others are assigned call by call."""
        return next(c for c in cls.__mro__ if "assign_many" in vars(c))

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[dict]) -> Indices:
        """One call, through the group's `assign_many` (the same result as in a batch)."""
        return self.batch_group().assign_many([(self, outputs, targets)])[0]

    def normalizer_scale(self, outputs: dict, targets: list[dict]) -> float:
        """A factor on the branch's loss normalizer that only the batch tells (the denoising
        groups: their count, so the loss is averaged over them). Default 1."""
        return 1.0

    def class_loss_mask(self, outputs: dict, targets: list[dict]) -> torch.Tensor | None:
        """(B, Q) bool, True where a query enters the classification loss, built without reading
        the device (DN-DETR leaves its padding queries out); None (default): every query."""
        return None
