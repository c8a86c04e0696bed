"""The state-dict keys (and shapes) of DINO's released R50 4-scale checkpoints, derived by hand from
DINO's code (IDEA-Research/DINO @ faa8520) with its released config (config/DINO/DINO_4scale.py),
not
from this project's model: what `tests/fixtures/manifests/dino_4scale_r50.json` holds.

Where each key comes from:
- `backbone.0.body.*`: torchvision's ResNet-50 up to layer4 (IntermediateLayerGetter over layer2-4,
  models/dino/backbone.py), FrozenBatchNorm2d buffers weight / bias / running_mean / running_var.
- `input_proj.{0,1,2}`: 1x1 conv + GroupNorm(32) of the 512 / 1024 / 2048 channel maps,
  `input_proj.3`
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
  (two_stage_*_share False); `label_enc` = Embedding(dn_labelbook_size + 1, d)
  (models/dino/dino.py).
"""

from __future__ import annotations

from helpers.official_keys import StateDictKeys

CONFIG = dict(
    num_classes=91,
    hidden_dim=256,
    dim_feedforward=2048,
    enc_layers=6,
    dec_layers=6,
    num_feature_levels=4,
    nheads=8,
    enc_n_points=4,
    dec_n_points=4,
    num_queries=900,
    dn_labelbook_size=91,
)


def dino_4scale_r50_keys(c: dict = CONFIG) -> StateDictKeys:
    d = c["hidden_dim"]
    keys = StateDictKeys()
    keys.resnet50()
    keys.four_scale_input_proj(d)
    keys.deformable_transformer(c)
    keys.layer_norm("transformer.decoder.norm", d)
    keys.mlp("transformer.decoder.ref_point_head", [2 * d, d, d])
    keys["transformer.tgt_embed.weight"] = [c["num_queries"], d]
    keys.linear("transformer.enc_output", d, d)
    keys.layer_norm("transformer.enc_output_norm", d)
    keys.linear("transformer.enc_out_class_embed", d, c["num_classes"])
    keys.mlp("transformer.enc_out_bbox_embed", [d, d, d, 4])
    for prefix in ("", "transformer.decoder."):
        for i in range(c["dec_layers"]):
            keys.linear(f"{prefix}class_embed.{i}", d, c["num_classes"])
            keys.mlp(f"{prefix}bbox_embed.{i}", [d, d, d, 4])
    keys["label_enc.weight"] = [c["dn_labelbook_size"] + 1, d]
    return keys


def manifest() -> dict:
    return dino_4scale_r50_keys().manifest(
        "dino_4scale_r50",
        ["modelname='dino'"],
        "derived from IDEA-Research/DINO @ faa8520 with config/DINO/DINO_4scale.py "
        "(tests/helpers/dino_manifest.py)",
    )
