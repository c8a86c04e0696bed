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

import math

FLAGS = ["-m", "dn_dab_deformable_detr", "--batch_size", "2", "--epochs", "50", "--lr_drop", "40",
         "--transformer_activation", "relu", "--use_dn"]
CONFIG = dict(num_classes=91, hidden_dim=256, dim_feedforward=2048, enc_layers=6, dec_layers=6,
              num_feature_levels=4, nheads=8, enc_n_points=4, dec_n_points=4, num_queries=300)


def dn_deformable_detr_r50_keys(c: dict = CONFIG) -> dict[str, list[int]]:
    d, levels, heads, ffn = c["hidden_dim"], c["num_feature_levels"], c["nheads"], c["dim_feedforward"]
    keys: dict[str, list[int]] = {}

    def add(name: str, *params: tuple[str, list[int]]) -> None:
        for suffix, shape in params:
            keys[f"{name}.{suffix}"] = shape

    def linear(name: str, n_in: int, n_out: int) -> None:
        add(name, ("weight", [n_out, n_in]), ("bias", [n_out]))

    def layer_norm(name: str, n: int) -> None:
        add(name, ("weight", [n]), ("bias", [n]))

    def mlp(name: str, n_in: int, hidden: int, n_out: int, layers: int) -> None:
        sizes = [n_in] + [hidden] * (layers - 1) + [n_out]
        for i in range(layers):
            linear(f"{name}.layers.{i}", sizes[i], sizes[i + 1])

    def frozen_bn(name: str, n: int) -> None:
        add(name, *((buffer, [n]) for buffer in ("weight", "bias", "running_mean", "running_var")))

    def ms_deform_attn(name: str, points: int) -> None:
        linear(f"{name}.sampling_offsets", d, heads * levels * points * 2)
        linear(f"{name}.attention_weights", d, heads * levels * points)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    # ResNet-50 bottlenecks: (planes, blocks) per stage, expansion 4.
    body = "backbone.0.body"
    keys[f"{body}.conv1.weight"] = [64, 3, 7, 7]
    frozen_bn(f"{body}.bn1", 64)
    channels = 64
    for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            p = f"{body}.layer{stage}.{block}"
            keys[f"{p}.conv1.weight"] = [planes, channels, 1, 1]
            frozen_bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = [planes, planes, 3, 3]
            frozen_bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = [planes * 4, planes, 1, 1]
            frozen_bn(f"{p}.bn3", planes * 4)
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = [planes * 4, channels, 1, 1]
                frozen_bn(f"{p}.downsample.1", planes * 4)
            channels = planes * 4

    for i, n_in in enumerate((512, 1024, 2048)):
        add(f"input_proj.{i}.0", ("weight", [d, n_in, 1, 1]), ("bias", [d]))
        layer_norm(f"input_proj.{i}.1", d)  # GroupNorm: weight and bias of d
    add("input_proj.3.0", ("weight", [d, 2048, 3, 3]), ("bias", [d]))
    layer_norm("input_proj.3.1", d)

    keys["transformer.level_embed"] = [levels, d]
    for i in range(c["enc_layers"]):
        p = f"transformer.encoder.layers.{i}"
        ms_deform_attn(f"{p}.self_attn", c["enc_n_points"])
        layer_norm(f"{p}.norm1", d)
        linear(f"{p}.linear1", d, ffn)
        linear(f"{p}.linear2", ffn, d)
        layer_norm(f"{p}.norm2", d)
    for i in range(c["dec_layers"]):
        p = f"transformer.decoder.layers.{i}"
        ms_deform_attn(f"{p}.cross_attn", c["dec_n_points"])
        layer_norm(f"{p}.norm1", d)
        add(f"{p}.self_attn", ("in_proj_weight", [3 * d, d]), ("in_proj_bias", [3 * d]))
        linear(f"{p}.self_attn.out_proj", d, d)
        layer_norm(f"{p}.norm2", d)
        linear(f"{p}.linear1", d, ffn)
        linear(f"{p}.linear2", ffn, d)
        layer_norm(f"{p}.norm3", d)
    mlp("transformer.decoder.query_scale", d, d, d, 2)
    mlp("transformer.decoder.ref_point_head", 2 * d, d, d, 2)

    for i in range(c["dec_layers"]):
        linear(f"class_embed.{i}", d, c["num_classes"])
        for prefix in ("", "transformer.decoder."):
            mlp(f"{prefix}bbox_embed.{i}", d, d, 4, 3)
    keys["label_enc.weight"] = [c["num_classes"] + 1, d - 1]
    keys["tgt_embed.weight"] = [c["num_queries"], d - 1]
    keys["refpoint_embed.weight"] = [c["num_queries"], 4]
    return keys


def manifest() -> dict:
    keys = dn_deformable_detr_r50_keys()
    return {"name": "dn_deformable_detr_r50", "flags": FLAGS,
            "source": "derived from IDEA-Research/DN-DETR @ ff3902a, main.py -m dn_dab_deformable_detr "
                      "(tests/dn_detr_manifest.py)",
            "params": sum(math.prod(shape) for shape in keys.values()), "state_dict": keys}


if __name__ == "__main__":  # writes the stored manifest
    import json
    from pathlib import Path

    out = Path(__file__).parent / "fixtures" / "manifests" / "dn_deformable_detr_r50.json"
    out.write_text(json.dumps(manifest(), indent=1) + "\n")
