"""The state-dict keys (and shapes) that the official Deformable-DETR family's code registers,
written
out by hand from that code, not from this project's model: the building blocks of the released key
sets derived in dino_manifest.py and dn_detr_manifest.py."""

from __future__ import annotations

import math


class StateDictKeys(dict):
    """name -> shape, filled module by module (torch's naming: `<module>.weight`, `.bias`, ...)."""

    def linear(self, name: str, n_in: int, n_out: int) -> None:
        self[f"{name}.weight"], self[f"{name}.bias"] = [n_out, n_in], [n_out]

    def layer_norm(self, name: str, n: int) -> None:  # LayerNorm, GroupNorm
        self[f"{name}.weight"], self[f"{name}.bias"] = [n], [n]

    def conv(self, name: str, n_in: int, n_out: int, kernel: int, bias: bool = False) -> None:
        self[f"{name}.weight"] = [n_out, n_in, kernel, kernel]
        if bias:
            self[f"{name}.bias"] = [n_out]

    def frozen_bn(self, name: str, n: int) -> None:  # FrozenBatchNorm2d: four buffers, no counter
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            self[f"{name}.{buffer}"] = [n]

    # the official MLP: Linear layers in `layers`
    def mlp(self, name: str, sizes: list[int]) -> None:
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            self.linear(f"{name}.layers.{i}", n_in, n_out)

    def ms_deform_attn(self, name: str, d: int, heads: int, levels: int, points: int) -> None:
        self.linear(f"{name}.sampling_offsets", d, heads * levels * points * 2)
        self.linear(f"{name}.attention_weights", d, heads * levels * points)
        self.linear(f"{name}.value_proj", d, d)
        self.linear(f"{name}.output_proj", d, d)

    def resnet50(self, body: str = "backbone.0.body") -> None:
        """torchvision's ResNet-50 up to layer4 (IntermediateLayerGetter) with FrozenBatchNorm2d."""
        self.conv(f"{body}.conv1", 3, 64, 7)
        self.frozen_bn(f"{body}.bn1", 64)
        channels = 64
        for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
            for block in range(blocks):
                p = f"{body}.layer{stage}.{block}"
                self.conv(f"{p}.conv1", channels if block == 0 else 4 * planes, planes, 1)
                self.frozen_bn(f"{p}.bn1", planes)
                self.conv(f"{p}.conv2", planes, planes, 3)
                self.frozen_bn(f"{p}.bn2", planes)
                self.conv(f"{p}.conv3", planes, 4 * planes, 1)
                self.frozen_bn(f"{p}.bn3", 4 * planes)
                if block == 0:
                    self.conv(f"{p}.downsample.0", channels, 4 * planes, 1)
                    self.frozen_bn(f"{p}.downsample.1", 4 * planes)
            channels = 4 * planes

    def four_scale_input_proj(self, d: int) -> None:
        """1x1 conv + GroupNorm of the 512 / 1024 / 2048-channel maps, and a 3x3 stride-2 conv +
        GroupNorm of the last one for the fourth level."""
        for i, channels in enumerate((512, 1024, 2048)):
            self.conv(f"input_proj.{i}.0", channels, d, 1, bias=True)
            self.layer_norm(f"input_proj.{i}.1", d)
        self.conv("input_proj.3.0", 2048, d, 3, bias=True)
        self.layer_norm("input_proj.3.1", d)

    def deformable_transformer(self, c: dict) -> None:
        """`transformer.level_embed`, the encoder layers (self_attn, norm1, linear1, linear2, norm2)
        and the decoder layers (cross_attn, norm1, self_attn, norm2, linear1, linear2, norm3)."""
        d, ffn = c["hidden_dim"], c["dim_feedforward"]
        attn = dict(d=d, heads=c["nheads"], levels=c["num_feature_levels"])
        self["transformer.level_embed"] = [c["num_feature_levels"], d]
        for i in range(c["enc_layers"]):
            p = f"transformer.encoder.layers.{i}"
            self.ms_deform_attn(f"{p}.self_attn", points=c["enc_n_points"], **attn)
            self.layer_norm(f"{p}.norm1", d)
            self.linear(f"{p}.linear1", d, ffn)
            self.linear(f"{p}.linear2", ffn, d)
            self.layer_norm(f"{p}.norm2", d)
        for i in range(c["dec_layers"]):
            p = f"transformer.decoder.layers.{i}"
            self.ms_deform_attn(f"{p}.cross_attn", points=c["dec_n_points"], **attn)
            self.layer_norm(f"{p}.norm1", d)
            self[f"{p}.self_attn.in_proj_weight"], self[f"{p}.self_attn.in_proj_bias"] = (
                [3 * d, d],
                [3 * d],
            )
            self.linear(f"{p}.self_attn.out_proj", d, d)
            self.layer_norm(f"{p}.norm2", d)
            self.linear(f"{p}.linear1", d, ffn)
            self.linear(f"{p}.linear2", ffn, d)
            self.layer_norm(f"{p}.norm3", d)

    def manifest(self, name: str, flags: list[str], source: str) -> dict:
        """The manifest format of tests/fixtures/manifests/."""
        return {
            "name": name,
            "flags": flags,
            "source": source,
            "params": sum(math.prod(shape) for shape in self.values()),
            "state_dict": dict(self),
        }
