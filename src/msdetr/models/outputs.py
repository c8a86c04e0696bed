"""The detector's output: named streams of predictions (see docs/architecture.md).

The one-to-one stream sits at the top level (as the official models return it); every other stream
is a key of its own. Shapes: B images, Q queries of the stream, C classes, S encoder tokens.
Boxes are (cx, cy, w, h) normalised to the image's valid region, in [0, 1].
"""

from __future__ import annotations

from typing import TypedDict

import torch


class Prediction(TypedDict):
    pred_logits: torch.Tensor  # (B, Q, C) class logits (sigmoid focal: no background column)
    pred_boxes: torch.Tensor  # (B, Q, 4)


class LayerStream(Prediction):
    """The last decoder layer's predictions, the earlier layers' in `aux_outputs`."""

    aux_outputs: list[Prediction]
    # (B, Q, 2) points or (B, Q, 4) proposal boxes the decoder started from
    init_reference: torch.Tensor


class EncoderStream(Prediction):
    """Two-stage: every encoder token's class logits and box (B, S, ...), and its fixed anchor."""

    # (B, S, 4), the token's pixel-centred box before regression (inf-free sigmoid)
    anchors: torch.Tensor


class DetectorOutput(LayerStream, total=False):
    """What `DeformableDETR.forward` returns. The one-to-one stream is always there; the others
    only in training, where the model has the part that makes them:

    - `o2m_outputs`: MS-DETR's one-to-many predictions of the one-to-one queries (decoder
      `o2m_tap`).
    - `hybrid_outputs`: H-DETR's one-to-many queries (`HybridQueries`).
    - `group_outputs`: Group DETR's extra groups, group after group (`QueryGroups`).
    - `dn_outputs`: the denoising queries, group after group (`DenoisingQueries`,
      `ContrastiveDenoisingQueries`); `init_reference` holds their noised GT boxes.
    - `enc_outputs`: the two-stage encoder's proposals (also at inference).
    """

    o2m_outputs: LayerStream
    hybrid_outputs: LayerStream
    group_outputs: LayerStream
    dn_outputs: LayerStream
    enc_outputs: EncoderStream


# The streams besides the one-to-one ("main") one; a model's `output_streams` is drawn from these.
OPTIONAL_STREAMS = frozenset(DetectorOutput.__optional_keys__)
