"""Deformable encoder and decoder, two-stage proposals and query selection."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..box_ops import cxcywh_to_xyxy, inverse_sigmoid
from ..kernels import Shapes, level_shapes
from .attention import MSDeformAttn
from .position_encoding import box_sine_embedding


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class FFN(nn.Module):
    """Linear -> ReLU -> Linear, residual, LayerNorm (post-norm), with the official attribute names."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, names=("linear1", "linear2", "norm")):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.Linear(d_model, d_ffn))
        setattr(self, names[1], nn.Linear(d_ffn, d_model))
        setattr(self, names[2], nn.LayerNorm(d_model))
        self.dropout_inner = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, norm = (getattr(self, n) for n in self._names)
        y = second(self.dropout_inner(F.relu(first(x))))
        return norm(x + self.dropout_out(y))


class EncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, ("linear1", "linear2", "norm2"))

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, shapes=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                              shapes=shapes)
        src = self.norm1(src + self.dropout1(src2))
        return self.ffn(src)


class DeformableEncoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def reference_points(spatial_shapes: torch.Tensor | Shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level in the valid-region frame, then scaled into each level's frame.

        `spatial_shapes`: the levels' (H, W), best as Python ints (see `level_shapes`)."""
        refs = []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ys = torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            xs = torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask, shapes=None):
        """`shapes`: the levels' (H, W) as Python ints; without them they are read from `spatial_shapes`."""
        shapes = level_shapes(spatial_shapes if shapes is None else shapes)
        reference_points = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, shapes)
        return src


O2M_TAPS = (None, "self_attn", "cross_attn", "output")


class DecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention and FFN, each with add & LayerNorm.

    `cross_attn_first` swaps the two attentions (MS-DETR Figure 4 b/c). `o2m_tap` names where a
    one-to-many stream leaves the layer (after `self_attn`, after `cross_attn`, or the `output`);
    `aux_ffn` passes it through its own FFN first. The o2m stream is only computed in training.
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, backend="auto",
                 cross_attn_first: bool = False, o2m_tap: str | None = None, aux_ffn: bool = False):
        super().__init__()
        if o2m_tap not in O2M_TAPS:
            raise ValueError(f"unknown o2m_tap {o2m_tap!r}; choose one of {O2M_TAPS}.")
        if aux_ffn and o2m_tap is None:
            raise ValueError("aux_ffn transforms the one-to-many stream; set o2m_tap as well.")
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, ("linear1", "linear2", "norm3"))
        self.cross_attn_first = cross_attn_first
        self.o2m_tap = o2m_tap
        if aux_ffn:
            self.aux_ffn = FFN(d_model, d_ffn, dropout, ("linear3", "linear4", "norm4"))

    def self_attention(self, tgt, query_pos, attn_mask=None):
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), attn_mask=attn_mask)[0]
        return self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))

    def cross_attention(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                        shapes=None):
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                               shapes=shapes)
        return self.norm1(tgt + self.dropout1(tgt2))

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask,
                self_attn_mask=None, shapes=None):
        """-> (one-to-one features, one-to-many features or None)."""
        def cross(x):
            return self.cross_attention(x, query_pos, reference_points, src, spatial_shapes, level_start_index,
                                        padding_mask, shapes)

        def self_(x):
            return self.self_attention(x, query_pos, self_attn_mask)

        steps = (("cross_attn", cross), ("self_attn", self_)) if self.cross_attn_first else \
            (("self_attn", self_), ("cross_attn", cross))
        tap = self.o2m_tap if self.training else None
        o2m = None
        for name, step in steps:
            tgt = step(tgt)
            if name == tap:
                o2m = tgt
        tgt = self.ffn(tgt)
        if tap == "output":
            o2m = tgt
        if o2m is not None and hasattr(self, "aux_ffn"):
            o2m = self.aux_ffn(o2m)
        return tgt, o2m


class DeformableDecoder(nn.Module):
    """Runs the layers; with `bbox_embed` given (box refinement) each layer refines the reference boxes.

    Returns per layer the hidden states, the one-to-many hidden states (None where not computed), the
    reference each layer's box head is added to (detached input reference, or with look-forward-twice
    the non-detached one) and the refined boxes.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, look_forward_twice: bool = False):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios, query_pos,
                padding_mask, bbox_embed: nn.ModuleList | None = None, self_attn_mask=None, shapes=None):
        hidden, hidden_o2m, box_refs, boxes = [], [], [], []
        ref_for_head = reference_points  # what layer l's box head is added to
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * valid_ratios[:, None]
            tgt, tgt_o2m = layer(tgt, query_pos, ref_input, src, spatial_shapes, level_start_index, padding_mask,
                                 self_attn_mask, shapes)
            hidden.append(tgt)
            hidden_o2m.append(tgt_o2m)
            box_refs.append(ref_for_head)
            if bbox_embed is not None:
                delta = bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                    new_ref = new_ref.sigmoid()
                if self.look_forward_twice and lid > 0:
                    # Same value as new_ref, but the gradient also reaches the previous layer's box.
                    boxes.append((delta + inverse_sigmoid(ref_for_head)).sigmoid())
                else:
                    boxes.append(new_ref)
                reference_points = new_ref.detach()
                ref_for_head = new_ref if self.look_forward_twice else reference_points
        return hidden, hidden_o2m, box_refs, boxes


class DeformableTransformer(nn.Module):
    """Flattens the levels, runs the encoder, selects queries (learned or two-stage), runs the decoder."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        mixed_selection: bool = False,
        look_forward_twice: bool = False,
        with_box_refine: bool = False,
        cross_attn_first: bool = False,
        o2m_tap: str | None = None,
        aux_ffn: bool = False,
        pix_trans: bool = False,
        proposal_selection: str = "topk",
        attn_backend: str = "auto",
    ):
        super().__init__()
        if proposal_selection not in ("topk", "nms"):
            raise ValueError(f"unknown proposal_selection {proposal_selection!r}; use 'topk' or 'nms'.")
        if proposal_selection == "nms" and not two_stage:
            raise ValueError("proposal_selection='nms' selects two-stage proposals; set two_stage=true.")
        self.proposal_selection = proposal_selection
        self.d_model = d_model
        self.decoder_refines = with_box_refine
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.mixed_selection = mixed_selection
        enc_layer = EncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points,
                                 attn_backend)
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        dec_layer = DecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points,
                                 attn_backend, cross_attn_first, o2m_tap, aux_ffn)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers, look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        elif pix_trans:
            raise ValueError("pix_trans adds the selected encoder features to two-stage queries; set two_stage=true.")
        self.pix_trans_enabled = pix_trans
        if pix_trans:
            self.pix_trans = nn.Linear(d_model, d_model)
            self.pix_trans_norm = nn.LayerNorm(d_model)
        if not two_stage:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding mask -> (B, 2) valid (w, h) fraction of the padded map."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    @staticmethod
    def encoder_proposals(memory, padding_mask, spatial_shapes: torch.Tensor | Shapes):
        """Per token a box (centre of its pixel, size 0.05 * 2^level) in logit space, +inf where invalid.

        `spatial_shapes`: the levels' (H, W), best as Python ints (see `level_shapes`)."""
        n = memory.shape[0]
        shapes = level_shapes(spatial_shapes)
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            mask = padding_mask[:, start:start + h * w].view(n, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        level_ids = torch.cat([torch.full((h * w,), lvl, dtype=torch.long, device=memory.device)
                               for lvl, (h, w) in enumerate(shapes)])
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), proposals, level_ids

    def flatten_levels(self, srcs, masks, pos_embeds):
        """-> flattened src, mask and pos, `spatial_shapes` (L, 2) and `level_start_index` (L,) int64 on
        the device (for the kernels and the official API), valid ratios, and `shapes`: the same (H, W)
        as Python ints, which everything computed on the host uses (no read back from the device)."""
        shapes = tuple((s.shape[-2], s.shape[-1]) for s in srcs)  # ints (symbolic under torch.compile)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        # One host-to-device copy for both tensors; non_blocking: the host never waits for the device.
        geometry = torch.tensor([v for hw in shapes for v in hw] + starts, dtype=torch.long)
        geometry = geometry.to(srcs[0].device, non_blocking=True)
        spatial_shapes = geometry[:2 * len(shapes)].view(len(shapes), 2)
        level_start_index = geometry[2 * len(shapes):]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flatten = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)], 1
        )
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
        return src_flatten, mask_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios, shapes

    def select_proposals(self, enc_class: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) token indices: top-k by the channel-0 encoder logit; on maps smaller than k they repeat."""
        num_tokens = enc_class.shape[1]
        topk = torch.topk(enc_class[..., 0], min(k, num_tokens), dim=1)[1]
        if num_tokens < k:  # tiny images: cycle the ranked tokens instead of failing in topk
            topk = topk[:, torch.arange(k, device=topk.device) % num_tokens]
        return topk

    @torch.no_grad()
    def select_proposals_nms(self, enc_class: torch.Tensor, enc_coord_unact: torch.Tensor, level_ids: torch.Tensor,
                             k: int, pre_nms_per_level: int = 1000, iou_threshold: float = 0.9, *,
                             shapes: Shapes | None = None) -> torch.Tensor:
        """DETA's selection: per image, the top tokens of every level, NMS within each level, at most
        Q / L per level (best first), filled up with the best leftovers; in global score order.

        Unlike the official code this works with fewer than 1000 tokens (per level or in total).

        The one place of the model that waits for the device: how many boxes survive NMS depends on
        the data (one NMS per image). Everything else is read from `shapes` (the levels' (H, W) as
        Python ints; without them the level sizes are counted from `level_ids`, which are contiguous
        per level) and stays on the device. Kept in this one method so that it can be swapped out.
        """
        logits = enc_class[..., 0]
        boxes = cxcywh_to_xyxy(enc_coord_unact.sigmoid().float()).clamp(0, 1)
        sizes = [h * w for h, w in shapes] if shapes is not None else torch.bincount(level_ids).tolist()
        num_levels = len(sizes)
        per_level = k // num_levels
        # Every image's top tokens of each level (a level is a slice of the tokens), level by level.
        candidates, start = [], 0
        for size in sizes:
            if size:
                candidates.append(logits[:, start:start + size].topk(min(pre_nms_per_level, size), dim=1)[1] + start)
            start += size
        candidates = torch.cat(candidates, 1)
        levels = torch.arange(num_levels, device=logits.device)[:, None]
        picks = []
        for b in range(logits.shape[0]):
            cand = candidates[b]
            keep = cand[batched_nms(boxes[b, cand], logits[b, cand].float(), level_ids[cand], iou_threshold)]
            if keep.numel() < k:  # too few survivors: plain top-k (cycling on tiny maps)
                picks.append(self.select_proposals(enc_class[b:b + 1], k)[0])
                continue
            onehot = level_ids[keep][None] == levels
            chosen = (onehot & (onehot.cumsum(1) <= per_level)).any(0)
            # Fill up with the first (best) leftovers: exactly k chosen, taken in `keep` order.
            leftover = ~chosen
            chosen = chosen | (leftover & (leftover.cumsum(0) <= k - chosen.sum()))
            picks.append(keep[chosen.to(torch.uint8).argsort(descending=True, stable=True)[:k]])
        return torch.stack(picks)

    def forward(self, srcs, masks, pos_embeds, query_embed=None, class_embed=None, bbox_embed=None,
                self_attn_mask=None, num_proposals: int | None = None, proposal_groups: int = 1):
        """Two-stage: `num_proposals` (default two_stage_num_proposals) tokens become queries, repeated
        `proposal_groups` times (Group DETR); `self_attn_mask` (T, T) keeps query blocks apart."""
        src, mask, pos, spatial_shapes, level_start_index, valid_ratios, shapes = self.flatten_levels(
            srcs, masks, pos_embeds)
        memory = self.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos, mask, shapes)
        bs, _, c = memory.shape
        out = {"memory": memory, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
               "valid_ratios": valid_ratios, "mask_flatten": mask}
        if self.two_stage:
            output_memory, proposals, level_ids = self.encoder_proposals(memory, mask, shapes)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            num_dec = self.decoder.num_layers
            enc_class = class_embed[num_dec](output_memory)
            enc_coord_unact = bbox_embed[num_dec](output_memory) + proposals
            k = num_proposals or self.two_stage_num_proposals
            if self.proposal_selection == "nms":
                topk = self.select_proposals_nms(enc_class, enc_coord_unact, level_ids, k, shapes=shapes)
            else:
                topk = self.select_proposals(enc_class, k)
            topk = topk.repeat(1, proposal_groups)
            topk_coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(box_sine_embedding(topk_coords_unact, c // 2)))
            if self.mixed_selection:
                query_pos = pos_trans_out[..., :c]
                tgt = query_embed.unsqueeze(0).expand(bs, -1, -1)
            else:
                query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
            if self.pix_trans_enabled:
                # DETA: the selected tokens' own (detached) features join the query content.
                feats = torch.gather(output_memory, 1, topk.unsqueeze(-1).expand(-1, -1, c)).detach()
                tgt = tgt + self.pix_trans_norm(self.pix_trans(feats))
            out.update(enc_class=enc_class, enc_coord_unact=enc_coord_unact, proposals=proposals,
                       output_memory=output_memory)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        out["init_reference"] = reference_points
        refine = bbox_embed if self.decoder_refines else None
        hidden, hidden_o2m, box_refs, boxes = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                               valid_ratios, query_pos, mask, refine, self_attn_mask, shapes)
        out.update(hidden=hidden, hidden_o2m=hidden_o2m, box_refs=box_refs, boxes=boxes)
        return out
