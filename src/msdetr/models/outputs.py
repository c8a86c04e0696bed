"""The detector's output: named streams of predictions (see docs/architecture.md).

The one-to-one stream sits at the top level (as the official models return it); every other stream
is a key of its own. Shapes: B images, Q queries of the stream, C classes, S encoder tokens.
Boxes are (cx, cy, w, h) normalised to the image's valid region, in [0, 1].
"""

from __future__ import annotations

from typing import TypedDict

import torch


class MaskKeys(TypedDict, total=False):
    """What a layer carries where the detector has a mask head (`model.detector.mask_head`): the
    mask embeddings of its queries and the one pixel embedding of the batch, not mask maps. A
    query's mask logits are the dot product of the two; they are computed only where used (the
    loss: the matched pairs' maps, `msdetr.models.masks.image_pair_logits`; the Hungarian mask
    cost: points, `embed_point_logits`; inference: the kept detections', in the post-process;
    `embed_logits` makes all of them). Every layer of every decoder stream has them (the same
    `mask_features` and `mask_valid_ratio` tensors in each); the encoder stream has none."""

    mask_embed: torch.Tensor  # (B, Q, D) per-query mask embedding
    # (B, D, h, w) pixel embedding at 1/stride of the padded canvas (mask head's `stride`)
    mask_features: torch.Tensor
    # (B, 2) valid (w, h) fraction of the `mask_features` map (`mask_valid_ratio`)
    mask_valid_ratio: torch.Tensor


# The keys of MaskKeys: optional keys of every stream that are not streams themselves.
MASK_KEYS = frozenset(MaskKeys.__optional_keys__)


class Prediction(MaskKeys):
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
OPTIONAL_STREAMS = frozenset(DetectorOutput.__optional_keys__) - MASK_KEYS
