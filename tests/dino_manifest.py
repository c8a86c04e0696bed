"""The state-dict keys (and shapes) of DINO's released R50 4-scale checkpoints, derived by hand from
DINO's code (IDEA-Research/DINO @ faa8520) with its released config (config/DINO/DINO_4scale.py), not
from this project's model: what `tests/fixtures/manifests/dino_4scale_r50.json` holds.

Where each key comes from:
- `backbone.0.body.*`: torchvision's ResNet-50 up to layer4 (IntermediateLayerGetter over layer2-4,
  models/dino/backbone.py), FrozenBatchNorm2d buffers weight / bias / running_mean / running_var.
- `input_proj.{0,1,2}`: 1x1 conv + GroupNorm(32) of the 512 / 1024 / 2048 channel maps, `input_proj.3`
  a 3x3 stride-2 conv of the last map + GroupNorm (models/dino/dino.py, DINO.__init__).
- `transformer.level_embed`, `transformer.encoder.layers.*` (DeformableTransformerEncoderLayer:
  self_attn, norm1, linear1, linear2, norm2), `transformer.decoder.layers.*`
  (DeformableTransformerDecoderLayer: cross_attn, norm1, self_attn, norm2, linear1, linear2, norm3),
  `transformer.decoder.norm`, `transformer.decoder.ref_point_head` (MLP(2d, d, d, 2)),
  `transformer.tgt_embed` (embed_init_tgt), `transformer.enc_output(_norm)`
  (models/dino/deformable_transformer.py).
- The prediction heads: `class_embed.i` / `bbox_embed.i` for every decoder layer, the same two
  modules (dec_pred_*_embed_share) also registered as `transformer.decoder.class_embed.i` /
  `.bbox_embed.i`; `transformer.enc_out_class_embed` / `enc_out_bbox_embed` separate copies
  (two_stage_*_share False); `label_enc` = Embedding(dn_labelbook_size + 1, d) (models/dino/dino.py).
"""
from __future__ import annotations

import math

CONFIG = dict(num_classes=91, hidden_dim=256, dim_feedforward=2048, enc_layers=6, dec_layers=6,
              num_feature_levels=4, nheads=8, enc_n_points=4, dec_n_points=4, num_queries=900,
              dn_labelbook_size=91)


def dino_4scale_r50_keys(c: dict = CONFIG) -> dict[str, list[int]]:
    d, levels, heads = c["hidden_dim"], c["num_feature_levels"], c["nheads"]
    sd: dict[str, list[int]] = {}

    def linear(name, out_dim, in_dim):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = [out_dim, in_dim], [out_dim]

    def norm(name, dim):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = [dim], [dim]

    def conv(name, out_dim, in_dim, k, bias=False):
        sd[f"{name}.weight"] = [out_dim, in_dim, k, k]
        if bias:
            sd[f"{name}.bias"] = [out_dim]

    def frozen_bn(name, dim):
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{buffer}"] = [dim]

    def mlp(name, dims):
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            linear(f"{name}.layers.{i}", b, a)

    def deformable_attention(name, points):
        linear(f"{name}.sampling_offsets", heads * levels * points * 2, d)
        linear(f"{name}.attention_weights", heads * levels * points, d)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    body = "backbone.0.body"
    conv(f"{body}.conv1", 64, 3, 7)
    frozen_bn(f"{body}.bn1", 64)
    width_in = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], 1):
        for b in range(blocks):
            p = f"{body}.layer{stage}.{b}"
            conv(f"{p}.conv1", planes, width_in if b == 0 else 4 * planes, 1)
            frozen_bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            frozen_bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", 4 * planes, planes, 1)
            frozen_bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * planes, width_in, 1)
                frozen_bn(f"{p}.downsample.1", 4 * planes)
        width_in = 4 * planes
    for i, channels in enumerate([512, 1024, 2048]):
        conv(f"input_proj.{i}.0", d, channels, 1, bias=True)
        norm(f"input_proj.{i}.1", d)
    conv("input_proj.3.0", d, 2048, 3, bias=True)
    norm("input_proj.3.1", d)

    sd["transformer.level_embed"] = [levels, d]
    for i in range(c["enc_layers"]):
        p = f"transformer.encoder.layers.{i}"
        deformable_attention(f"{p}.self_attn", c["enc_n_points"])
        norm(f"{p}.norm1", d)
        linear(f"{p}.linear1", c["dim_feedforward"], d)
        linear(f"{p}.linear2", d, c["dim_feedforward"])
        norm(f"{p}.norm2", d)
    for i in range(c["dec_layers"]):
        p = f"transformer.decoder.layers.{i}"
        deformable_attention(f"{p}.cross_attn", c["dec_n_points"])
        norm(f"{p}.norm1", d)
        sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"] = [3 * d, d], [3 * d]
        linear(f"{p}.self_attn.out_proj", d, d)
        norm(f"{p}.norm2", d)
        linear(f"{p}.linear1", c["dim_feedforward"], d)
        linear(f"{p}.linear2", d, c["dim_feedforward"])
        norm(f"{p}.norm3", d)
    norm("transformer.decoder.norm", d)
    mlp("transformer.decoder.ref_point_head", [2 * d, d, d])
    sd["transformer.tgt_embed.weight"] = [c["num_queries"], d]
    linear("transformer.enc_output", d, d)
    norm("transformer.enc_output_norm", d)
    linear("transformer.enc_out_class_embed", c["num_classes"], d)
    mlp("transformer.enc_out_bbox_embed", [d, d, d, 4])
    for prefix in ("", "transformer.decoder."):
        for i in range(c["dec_layers"]):
            linear(f"{prefix}class_embed.{i}", c["num_classes"], d)
            mlp(f"{prefix}bbox_embed.{i}", [d, d, d, 4])
    sd["label_enc.weight"] = [c["dn_labelbook_size"] + 1, d]
    return sd


def manifest() -> dict:
    keys = dino_4scale_r50_keys()
    return {"name": "dino_4scale_r50", "flags": ["modelname='dino'"],
            "source": "derived from IDEA-Research/DINO @ faa8520 with config/DINO/DINO_4scale.py (tests/dino_manifest.py)",
            "params": sum(math.prod(shape) for shape in keys.values()), "state_dict": keys}
