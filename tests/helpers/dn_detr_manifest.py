"""The state-dict keys (and shapes) of DN-DETR's released DN-Deformable-DETR R50 checkpoint, worked
out by reading DN-DETR's code (IDEA-Research/DN-DETR @ ff3902a, `main.py -m dn_dab_deformable_detr`
at its main.py defaults), not from this project's model: what
`tests/fixtures/manifests/dn_deformable_detr_r50.json` holds.

Where each key comes from (files under models/dn_dab_deformable_detr/):
- `backbone.0.body.*` (backbone.py): torchvision's ResNet-50 with FrozenBatchNorm2d (four buffers,
  no num_batches_tracked), everything up to layer4 kept by IntermediateLayerGetter.
- `input_proj.0-2`: 1x1 conv + GroupNorm(32) on the 512 / 1024 / 2048-channel maps; `input_proj.3`:
  a 3x3 stride-2 conv of the 2048-channel map + GroupNorm (dab_deformable_detr.py).
- `transformer.*` (deformable_transformer.py, use_dab=True, two_stage False): `level_embed`; encoder
  layers (self_attn, norm1, linear1, linear2, norm2); decoder layers (cross_attn, norm1, self_attn,
  norm2, linear1, linear2, norm3); the decoder's `query_scale` = MLP(d, d, d, 2) and
  `ref_point_head` = MLP(2d, d, d, 2); no `reference_points` (use_dab) and no decoder norm.
- On the detector (dab_deformable_detr.py, with_box_refine=True by default there): `class_embed.i`
  and `bbox_embed.i` cloned per decoder layer, the box heads registered again as
  `transformer.decoder.bbox_embed.i`; `label_enc` = Embedding(num_classes + 1, d - 1), `tgt_embed` =
  Embedding(num_queries, d - 1) (one feature left for the indicator), `refpoint_embed` =
  Embedding(num_queries, 4).
"""

from __future__ import annotations

from helpers.official_keys import StateDictKeys

FLAGS = [
    "-m",
    "dn_dab_deformable_detr",
    "--batch_size",
    "2",
    "--epochs",
    "50",
    "--lr_drop",
    "40",
    "--transformer_activation",
    "relu",
    "--use_dn",
]
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
    num_queries=300,
)


def dn_deformable_detr_r50_keys(c: dict = CONFIG) -> StateDictKeys:
    d = c["hidden_dim"]
    keys = StateDictKeys()
    keys.resnet50()
    keys.four_scale_input_proj(d)
    keys.deformable_transformer(c)
    keys.mlp("transformer.decoder.query_scale", [d, d, d])
    keys.mlp("transformer.decoder.ref_point_head", [2 * d, d, d])
    for i in range(c["dec_layers"]):
        keys.linear(f"class_embed.{i}", d, c["num_classes"])
        for prefix in ("", "transformer.decoder."):
            keys.mlp(f"{prefix}bbox_embed.{i}", [d, d, d, 4])
    keys["label_enc.weight"] = [c["num_classes"] + 1, d - 1]
    keys["tgt_embed.weight"] = [c["num_queries"], d - 1]
    keys["refpoint_embed.weight"] = [c["num_queries"], 4]
    return keys


def manifest() -> dict:
    return dn_deformable_detr_r50_keys().manifest(
        "dn_deformable_detr_r50",
        FLAGS,
        "derived from IDEA-Research/DN-DETR @ ff3902a, main.py -m dn_dab_deformable_detr "
        "(tests/helpers/dn_detr_manifest.py)",
    )


# Writes the stored manifest (from tests/: python -m helpers.dn_detr_manifest).
if __name__ == "__main__":
    import json

    from helpers import FIXTURES

    out = FIXTURES / "manifests" / "dn_deformable_detr_r50.json"
    out.write_text(json.dumps(manifest(), indent=1) + "\n")
