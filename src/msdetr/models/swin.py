"""Swin Transformer backbone through timm, laid out as DETA's Swin-L backbone."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FeatureBackbone, resize_mask

# Official (Swin / mmseg / DETA) names put each patch-merging layer at the end of its stage; timm
# puts it at the start of the next one.
_MERGE = re.compile(r"layers\.(\d+)\.downsample\.")


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            "the Swin backbone needs timm; install it with pip install 'msdetr[swin]'."
        ) from exc
    return timm


def swin_official_to_timm(name: str) -> str:
    return _MERGE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", name)


def swin_timm_to_official(name: str) -> str:
    return _MERGE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name)


def is_swin_buffer(name: str) -> bool:
    """Buffers official Swin checkpoints save and timm recomputes (never loaded)."""
    return name.endswith(("relative_position_index", "attn_mask"))


class SwinBackbone(FeatureBackbone):
    """A timm Swin Transformer returning the maps of `out_indices` (DETA: stages 1-3, strides
    8/16/32), each through its own LayerNorm named `norm<i>` as in DETA, so official checkpoints map
    by name.

    Any image size works: images are zero-padded to a multiple of the patch size and timm pads the
    windows.

    Args:
        name: the timm model name.
        pretrained: False (random init), True (timm's hub weights) or a local file, in Microsoft's
            format ({'model': ...}, e.g. swin_large_patch4_window12_384_22k.pth) or timm's.
        train_backbone: whether its parameters train.
        drop_path_rate: stochastic depth (0.3 in DETA).
        out_indices: the stages whose maps it returns.
        checkpointing: activation checkpointing of the blocks (DETA's memory saving).
    """

    def __init__(
        self,
        *,
        name: str = "swin_large_patch4_window12_384",
        pretrained: bool | str = False,
        train_backbone: bool = True,
        drop_path_rate: float = 0.3,
        out_indices: tuple[int, ...] = (1, 2, 3),
        checkpointing: bool = False,
    ):
        super().__init__()
        timm = _timm()
        if name not in timm.list_models("swin*"):
            raise ValueError(
                f"unknown Swin model {name!r}; pick a timm name such as "
                "swin_large_patch4_window12_384."
            )
        body = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            strict_img_size=False,
            dynamic_img_size=True,
        )
        body.norm = nn.Identity()  # the classification norm and head are not part of the detector
        body.head = nn.Identity()
        if checkpointing:
            body.set_grad_checkpointing(True)
        num_stages = len(body.layers)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(
                f"out_indices {tuple(out_indices)} must name stages 0..{num_stages - 1}."
            )
        self.out_indices = tuple(out_indices)
        self.num_channels = [body.feature_info[i]["num_chs"] for i in self.out_indices]
        self.strides = [body.feature_info[i]["reduction"] for i in self.out_indices]
        for i, channels in zip(self.out_indices, self.num_channels):
            body.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.patch_size = body.patch_embed.patch_size[0]
        self.body = body
        if pretrained:
            self._load_pretrained(name, pretrained)
        if not train_backbone:
            for p in self.body.parameters():
                p.requires_grad_(False)

    def _load_pretrained(self, name: str, pretrained: bool | str) -> None:
        from timm.models.swin_transformer import checkpoint_filter_fn

        if pretrained is True:
            timm = _timm()
            try:
                state = timm.create_model(name, pretrained=True, num_classes=0).state_dict()
            except Exception as exc:  # no network, no hub cache
                warnings.warn(
                    f"could not fetch {name} ImageNet weights ({type(exc).__name__}); the Swin "
                    "backbone is randomly initialised. Pass pretrained=<path to local weights> to "
                    "use a file.",
                    stacklevel=3,
                )
                return
        elif isinstance(pretrained, str):
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Swin weights '{path}' do not exist; point backbone.pretrained at the file."
                )
            from ..official import read_checkpoint_file  # here: msdetr.official imports the models

            state = read_checkpoint_file(path, "Swin weights")
        else:
            return
        state = checkpoint_filter_fn(state, self.body)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
        result = self.body.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not re.fullmatch(r"norm\d+\.(weight|bias)", k)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the Swin weights do not fit {name}: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:1]}); "
                "check that the file is the same Swin variant."
            )

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # As DETA: zero-pad to the patch size; masks are resized from the unpadded image's mask.
        h, w = images.shape[-2:]
        images = F.pad(images, (0, -w % self.patch_size, 0, -h % self.patch_size))
        x = self.body.patch_embed(images)  # (B, H, W, C)
        out = []
        for i, stage in enumerate(self.body.layers):
            x = stage(x)
            if i in self.out_indices:
                feat = getattr(self.body, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous()
                out.append((feat, resize_mask(padding_mask, feat.shape[-2:])))
            if i == self.out_indices[-1]:
                break
        return out
