"""ResNet backbones (torchvision, frozen BatchNorm) returning the stride-8/16/32 maps with masks
(and, for a mask head, the stride-4 map of layer1 through `forward_with_stride4`)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

# Channels of layer2/3/4 per architecture: basic blocks for 18/34, bottlenecks above.
_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}
# Channels of layer1 (stride 4), what a mask head's lateral convolution reads.
_STRIDE4_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256}


class ResNetBody(nn.Module):
    """The ResNet trunk without pooling/fc, with the torchvision (and official checkpoint) names."""

    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stages(x)[1:]

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of layer1..layer4 (strides 4, 8, 16, 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _load_resnet(
    name: str, pretrained: bool | str, dilation: bool, norm: str
) -> torchvision.models.ResNet:
    builder = getattr(torchvision.models, name)
    norm_layer = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}[norm]
    kwargs = dict(replace_stride_with_dilation=[False, False, dilation], norm_layer=norm_layer)
    if isinstance(pretrained, str) and pretrained not in ("", "imagenet"):
        model = builder(weights=None, **kwargs)
        from ..official import read_checkpoint_file  # here: msdetr.official imports the models

        state = read_checkpoint_file(pretrained, "backbone weights")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise ValueError(
                f"backbone weights '{pretrained}' do not fit {name} (missing {missing[:3]}...); "
                f"pass a torchvision {name} state dict."
            )
        return model
    if pretrained:
        try:
            return builder(weights="IMAGENET1K_V1", **kwargs)
        except Exception as exc:  # offline machines, blocked hubs: training can still start
            warnings.warn(
                f"ImageNet weights for {name} could not be loaded ({type(exc).__name__}: {exc}); "
                "the backbone starts from random init. Set model.backbone.pretrained=<path to a "
                "torchvision state dict> to use local weights.",
                stacklevel=2,
            )
    return builder(weights=None, **kwargs)


_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


class FeatureBackbone(nn.Module):
    """What the detector needs of a backbone: `forward(images, padding_mask)` returns one
    (feature map, mask) pair per output level, finest first, with `num_channels[i]` channels in
    level i.

    A backbone that can also give a stride-4 map (for a mask head's pixel embedding) sets
    `stride4_channels` and implements `forward_with_stride4`; the others leave `stride4_channels`
    None and a mask head must use `lateral_stride=8` with them."""

    num_channels: list[int]
    stride4_channels: int | None = None

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def forward_with_stride4(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """`forward`'s levels, and the (B, stride4_channels, ceil(H/4), ceil(W/4)) stride-4 map."""
        raise ValueError(
            f"the {type(self).__name__} backbone has no stride-4 map; set the mask "
            "head's lateral_stride=8 to use its stride-8 map instead."
        )


class Backbone(FeatureBackbone):
    """ResNet with frozen BatchNorm; as in the official code the stem and layer1 stay frozen and
    layer2-4 train when `train_backbone` (`trainable_layers` counts stages from layer4 down).

    `norm="batch"` (ordinary, trained BatchNorm) and `trainable_layers=5` are for training from
    scratch, where frozen statistics of a random init would normalize nothing.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        pretrained: torchvision's ImageNet weights (True), none (False), or a local state-dict file.
        train_backbone: whether layer2-4 (`trainable_layers`) train.
        return_interm_layers: the maps of layer2-4 (strides 8/16/32); False: layer4 only.
        dilation: dilate layer4 (stride 16), as the official --dilation.
        trainable_layers: how many stages train, from layer4 down (0..5).
        norm: "frozen" (official FrozenBatchNorm2d) or "batch".
    """

    def __init__(
        self,
        *,
        name: str = "resnet50",
        pretrained: bool | str = True,
        train_backbone: bool = True,
        return_interm_layers: bool = True,
        dilation: bool = False,
        trainable_layers: int = 3,
        norm: str = "frozen",
    ):
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_CHANNELS)}.")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"unknown backbone norm {norm!r}; use 'frozen' or 'batch'.")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(
                "trainable_layers must be in 0..5 (stages from layer4 down), got "
                f"{trainable_layers}."
            )
        self.body = ResNetBody(_load_resnet(name, pretrained, dilation, norm))
        trainable = _STAGES[:trainable_layers] if train_backbone else ()
        for pname, p in self.body.named_parameters():
            # conv1 stands for the whole stem (conv1 + bn1).
            stage = "conv1" if pname.startswith("bn1") else pname.split(".")[0]
            if stage not in trainable:
                p.requires_grad_(False)
        channels = _CHANNELS[name]
        strides = (8, 16, 32 if not dilation else 16)
        self.return_interm_layers = return_interm_layers
        self.num_channels = list(channels if return_interm_layers else channels[-1:])
        self.strides = list(strides if return_interm_layers else strides[-1:])
        self.stride4_channels = _STRIDE4_CHANNELS[name]

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._levels(self.body(images), padding_mask)

    def forward_with_stride4(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """`forward`'s levels (the same tensors), and layer1's stride-4 map. layer1 trains only with
        trainable_layers >= 4 (Mask DINO trains it; the default leaves it frozen)."""
        c2, *feats = self.body.stages(images)
        return self._levels(feats, padding_mask), c2

    def _levels(
        self, feats: list[torch.Tensor], padding_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.return_interm_layers:
            feats = feats[-1:]
        return [(f, resize_mask(padding_mask, f.shape[-2:])) for f in feats]


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) padding mask, as the official code does it."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
