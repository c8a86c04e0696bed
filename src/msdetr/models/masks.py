"""The mask head of instance segmentation (after Mask DINO): a pixel embedding and a per-query mask
embedding whose dot product gives each query's mask logits at low resolution.

    memory (B, S, C) --level 0--> (B, C, h0, w0) --upsample to the lateral map's size--+
    backbone stride-4 map (or stride-8) --1x1 conv + GN (lateral)-----------------------+
        --> sum --> 3x3 conv + GN + ReLU --> 1x1 conv --> pixel embedding (B, D, h, w)
    decoder hidden state (B, Q, C) --MLP (3 layers)--> mask embedding (B, Q, D)
    mask logits (B, Q, h, w) = einsum("bqd,bdhw->bqhw", mask embedding, pixel embedding)

How the detector calls it (`DeformableDETR.forward`):

1. Backbone: with `lateral_stride=4`, `backbone.forward_with_stride4(images, padding_mask)`
   instead of `backbone(images, padding_mask)`; it returns the same levels and the stride-4 map
   (`backbone.stride4_channels` channels; `Backbone` has it, other backbones leave it None). With
   `lateral_stride=8` the lateral map is the backbone's first level, `feats[0][0]`
   (`backbone.num_channels[0]` channels, stride 8 for ResNet with return_interm_layers and Swin).
   The detector calls `head.bind(channels)` with the backbone's channels (lateral_channels null
   in the config) and refuses a backbone without the map.
2. After the encoder: `pixel = head.pixel_embedding(memory, levels.shapes, lateral)`, where
   `memory` is the encoder's (B, S, C) output and `levels.shapes` the levels' (H, W) as ints
   (level 0, the finest, comes first in `memory`).
3. After the decoder: every layer's hidden states (B, T, C) through `head.embed` give its
   queries' mask embeddings (B, T, D), sliced by queries as the class logits are (`_stream`) and
   attached as `mask_embed` to the top level, every `aux_outputs` entry and every other decoder
   stream (the one-to-many states `dec.hidden_o2m` the same way), each layer also holding the
   shared `mask_features` (the pixel embedding) and `mask_valid_ratio`
   (`msdetr.models.outputs.MaskKeys`). No mask map is made in the forward: the criterion makes
   the matched pairs' maps (`image_pair_logits`), the Hungarian cost the logits at its points
   (`embed_point_logits`), the post-process the kept detections' maps. The encoder stream
   (two-stage proposals, S tokens) carries no masks: it is matched and supervised on boxes only.
4. The valid region of the pixel embedding (for the losses and the pasting):
   `mask_valid_ratio(padding_mask, pixel.shape[-2:], head.stride)` (B, 2) valid (w, h) fraction.

Coordinates: the pixel embedding lives on the padded batch canvas; its map of (h, w) pixels spans
`stride * h` by `stride * w` canvas pixels from the top-left corner (the canvas itself when its
size is a multiple of the stride). The valid (unpadded) region of image b is the top-left
`valid_ratio[b]` fraction of the map, so a point (x, y) normalized to the valid region (as boxes
are) sits at (x * valid_ratio[b, 0], y * valid_ratio[b, 1]) of the map.

Memory: every layer's (B, T, h, w) maps at 1/4 resolution are Mask DINO's way. With many queries
(DINO's 900 plus denoising plus one-to-many) the lighter way, the detector's, is to keep the
embeddings and compute only what is used: the matched pairs' maps (`image_pair_logits`,
`pair_logits`) and the Hungarian cost's point logits (`embed_point_logits`, `point_logits`: exact,
bilinear sampling is linear in the channels). Masks are never made at full resolution in
training; at inference only the kept detections' are (`msdetr.postprocess`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import MLP


def _conv_gn(in_channels: int, out_channels: int, kernel: int, groups: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, nn.GroupNorm(groups, out_channels))


class MaskHead(nn.Module):
    """Pixel embedding and mask embedding of Mask DINO's segmentation branch.

    Args:
        hidden_dim: the model's width (the encoder memory's and the decoder's).
        lateral_channels: channels of the backbone map fused in (ResNet-50's layer1: 256 at stride
            4; its layer2: 512 at stride 8); None: set by `bind` from the backbone (what the
            detector does, so a config need not know the backbone's channels).
        lateral_stride: 4 (the backbone's stride-4 map, as Mask DINO) or 8 (its stride-8 map, for
            backbones without a stride-4 output); the masks come at 1/lateral_stride of the canvas.
        mask_dim: width of the pixel and mask embeddings (None: hidden_dim, Mask DINO's choice).
        num_groups: GroupNorm groups (hidden_dim must split evenly).

    Attributes: `stride` (the mask maps' stride), `mask_dim`.
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        lateral_channels: int | None = None,
        lateral_stride: int = 4,
        mask_dim: int | None = None,
        num_groups: int = 32,
    ):
        super().__init__()
        if lateral_stride not in (4, 8):
            raise ValueError(f"mask_head.lateral_stride must be 4 or 8, got {lateral_stride}.")
        if hidden_dim % num_groups:
            raise ValueError(
                f"mask_head.num_groups={num_groups} does not divide hidden_dim={hidden_dim}; "
                "set a num_groups that divides it."
            )
        self.stride = lateral_stride
        self.hidden_dim = hidden_dim
        self.num_groups = num_groups
        self.mask_dim = hidden_dim if mask_dim is None else mask_dim
        self.lateral_channels = lateral_channels
        if lateral_channels is not None:
            self.lateral = _conv_gn(lateral_channels, hidden_dim, 1, num_groups)
        self.output_conv = _conv_gn(hidden_dim, hidden_dim, 3, num_groups)
        self.mask_features = nn.Conv2d(hidden_dim, self.mask_dim, 1)
        nn.init.xavier_uniform_(self.mask_features.weight)
        if self.mask_features.bias is not None:
            nn.init.zeros_(self.mask_features.bias)
        self.mask_embed = MLP(hidden_dim, hidden_dim, self.mask_dim, 3)

    def bind(self, lateral_channels: int) -> None:
        """Build the lateral convolution for a backbone map of `lateral_channels` channels (the
        detector calls this with its backbone's); refuse a head built for other channels."""
        if self.lateral_channels is None:
            self.lateral_channels = lateral_channels
            self.lateral = _conv_gn(lateral_channels, self.hidden_dim, 1, self.num_groups)
        elif self.lateral_channels != lateral_channels:
            raise ValueError(
                f"model.detector.mask_head.lateral_channels={self.lateral_channels}, but the "
                f"backbone's stride-{self.stride} map has {lateral_channels} channels; leave "
                "lateral_channels null (taken from the backbone)."
            )

    @staticmethod
    def finest_level(memory: torch.Tensor, shapes) -> torch.Tensor:
        """(B, S, C) encoder memory -> its first (finest) level as a (B, C, h0, w0) map.

        `shapes`: the levels' (H, W) as Python ints (`Levels.shapes`)."""
        h, w = (int(v) for v in shapes[0])
        b, _, c = memory.shape
        return memory[:, : h * w].transpose(1, 2).reshape(b, c, h, w)

    def pixel_embedding(self, memory: torch.Tensor, shapes, lateral: torch.Tensor) -> torch.Tensor:
        """The per-pixel embedding (B, mask_dim, h, w) at the lateral map's size.

        Args:
            memory: (B, S, C) encoder output, level after level, the finest first.
            shapes: the levels' (H, W) as Python ints (`Levels.shapes`).
            lateral: (B, lateral_channels, h, w) backbone map at `stride` (see the module doc).
        """
        if self.lateral_channels is None:
            raise RuntimeError(
                "the mask head's lateral_channels are unknown; build it with lateral_channels or "
                "call bind(channels) first (the detector does)."
            )
        coarse = self.finest_level(memory, shapes)
        fine = self.lateral(lateral)
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.output_conv(fine + up.to(fine.dtype)))
        return self.mask_features(y)

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) query features -> (..., mask_dim) mask embeddings."""
        return self.mask_embed(hidden)

    def logits(self, hidden: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) query features and (B, D, h, w) pixel embedding -> (B, Q, h, w) mask logits."""
        return torch.einsum("bqd,bdhw->bqhw", self.embed(hidden), pixel)

    def forward(self, hidden: list[torch.Tensor], pixel: torch.Tensor) -> list[torch.Tensor]:
        """Per decoder layer (B, Q, C) hidden states -> per layer (B, Q, h, w) mask logits."""
        return [self.logits(h, pixel) for h in hidden]

    def pair_logits(
        self,
        hidden: torch.Tensor,
        pixel: torch.Tensor,
        batch_idx: torch.Tensor,
        query_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Only the chosen queries' maps: (B, Q, C) features, (B, D, h, w) pixel embedding, (M,)
        image and query indices -> (M, h, w) mask logits (the matched pairs, the kept
        detections)."""
        return embed_pair_logits(self.embed(hidden[batch_idx, query_idx]), pixel, batch_idx)

    def point_logits(
        self, hidden: torch.Tensor, pixel: torch.Tensor, coords: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits at points without making the maps: (B, Q, C) features, (B, D, h, w) pixel
        embedding, (B, P, 2) points (x, y) in [0, 1] of the map -> (B, Q, P). Equal to sampling the
        (B, Q, h, w) logits at the points (bilinear sampling is linear in the channels)."""
        return embed_point_logits(self.embed(hidden), pixel, coords)


# The same logits from mask embeddings already computed (what the detector's outputs carry:
# `mask_embed` per layer and the shared `mask_features`; see msdetr.models.outputs).


def embed_logits(embed: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) mask embeddings and (B, D, h, w) pixel embedding -> (B, Q, h, w) mask logits."""
    return torch.einsum("bqd,bdhw->bqhw", embed, pixel.to(embed.dtype))


def embed_pair_logits(
    embed: torch.Tensor, pixel: torch.Tensor, batch_idx: torch.Tensor
) -> torch.Tensor:
    """(M, D) chosen embeddings, (B, D, h, w) pixel embedding, (M,) image of each -> (M, h, w).

    One matmul over (image, channel) with the other images' weights zero: no (M, D, h, w) copy of
    the pixel embedding and no per-image split (which would read the counts on the host). Where
    the per-image counts are known on the host (the matcher's indices), `image_pair_logits` does
    less work."""
    own = batch_idx[:, None] == torch.arange(pixel.shape[0], device=batch_idx.device)
    weights = embed[:, None, :] * own[..., None].to(embed.dtype)  # (M, B, D)
    return torch.einsum("mbd,bdhw->mhw", weights, pixel.to(embed.dtype))


def image_pair_logits(
    embed: torch.Tensor, pixel: torch.Tensor, queries: list[torch.Tensor]
) -> torch.Tensor:
    """(B, Q, D) mask embeddings, (B, D, h, w) pixel embedding, per image the (n_b,) chosen
    queries -> (sum n_b, h, w) their mask logits, image after image (the sizes are the index
    tensors' shapes: no host read)."""
    maps = [
        torch.einsum("md,dhw->mhw", embed[b, q], pixel[b].to(embed.dtype))
        for b, q in enumerate(queries)
    ]
    if not maps:
        return embed.new_zeros(0, *pixel.shape[-2:])
    return torch.cat(maps)


def embed_point_logits(
    embed: torch.Tensor, pixel: torch.Tensor, coords: torch.Tensor
) -> torch.Tensor:
    """(B, Q, D) mask embeddings, (B, D, h, w) pixel embedding, (B, P, 2) points (x, y) in [0, 1]
    of the map -> (B, Q, P) mask logits there, without making the maps (bilinear sampling is
    linear in the channels)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(pixel.dtype)  # (B, P, 1, 2)
    sampled = F.grid_sample(pixel, grid, mode="bilinear", align_corners=False)[..., 0]
    return torch.einsum("bqd,bdp->bqp", embed, sampled.to(embed.dtype))


def mask_valid_ratio(padding_mask: torch.Tensor, map_size, stride: int) -> torch.Tensor:
    """(B, H_pad, W_pad) padding mask (True on padding) -> (B, 2) valid (w, h) fraction of a map of
    `map_size` (h, w) pixels at `stride` (which spans stride * map_size canvas pixels). No host
    read: the valid size is counted on the device."""
    h, w = (int(v) for v in map_size)
    valid_h = torch.sum(~padding_mask[:, :, 0], 1).float()
    valid_w = torch.sum(~padding_mask[:, 0, :], 1).float()
    return torch.stack([valid_w / (stride * w), valid_h / (stride * h)], -1)
