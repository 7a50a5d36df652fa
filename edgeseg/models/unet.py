"""U-Net baselines and teachers as the UltraSeg authors build them.

``unet-base`` is the classic U-Net (Ronneberger et al., 2015) with BatchNorm, 31.0 M parameters. The
``unet-tiny/small/light/medium`` variants keep its skeleton at 1/8 .. 1/2 of the width with every 3x3 conv
made depthwise-separable (UltraSeg paper footnote 2, Table 1: 0.102 / 0.389 / 0.861 / 1.519 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models._registry import SegModel, register_model

__all__ = ["UNet", "unet_tiny", "unet_small", "unet_light", "unet_medium", "unet_base"]


def _conv_unit(c_in: int, c_out: int, separable: bool) -> nn.Sequential:
    if separable:
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True),
        )
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two 3x3 conv units (plain: conv-BN-ReLU; separable: DW-BN-ReLU6-PW-BN-ReLU6)."""

    def __init__(self, c_in: int, c_out: int, separable: bool) -> None:
        super().__init__(_conv_unit(c_in, c_out, separable), _conv_unit(c_out, c_out, separable))


class UNet(SegModel):
    """U-Net: DoubleConv stages, 2x2 max-pool down, 2x2 stride-2 transposed conv up, concat skips, 1x1 head.

    Args:
        channels: five stage widths, finest first (the last one is the bottleneck).
        separable: depthwise-separable 3x3 convs (the small variants) instead of plain ones.
        in_channels: input image channels.

    Shapes: input (B, in_channels, H, W) with H, W multiples of 16; logits (B, 1, H, W). ``features`` are
    the five stage outputs before pooling (H .. H/16), ``embedding`` the last decoder stage (B, c0, H, W).
    """

    def __init__(self, channels: tuple[int, ...], separable: bool, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        c = tuple(channels)
        self.encoders = nn.ModuleList(DoubleConv(i, o, separable) for i, o in zip((in_channels,) + c[:-1], c))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in reversed(range(len(c) - 1)))
        self.decoders = nn.ModuleList(DoubleConv(2 * c[i], c[i], separable) for i in reversed(range(len(c) - 1)))
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward_all(self, x: torch.Tensor) -> dict:
        features = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(features[:-1])):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        return {"logits": self.head(x), "region": [], "boundary": [], "features": features, "embedding": x}


@register_model
def unet_tiny(**kw) -> UNet:
    """Depthwise-separable U-Net, widths 8..128: 0.102 M parameters."""
    return UNet((8, 16, 32, 64, 128), separable=True, **kw)


@register_model
def unet_small(**kw) -> UNet:
    """Depthwise-separable U-Net, widths 16..256: 0.389 M parameters."""
    return UNet((16, 32, 64, 128, 256), separable=True, **kw)


@register_model
def unet_light(**kw) -> UNet:
    """Depthwise-separable U-Net, widths 24..384: 0.861 M parameters."""
    return UNet((24, 48, 96, 192, 384), separable=True, **kw)


@register_model
def unet_medium(**kw) -> UNet:
    """Depthwise-separable U-Net, widths 32..512: 1.519 M parameters."""
    return UNet((32, 64, 128, 256, 512), separable=True, **kw)


@register_model
def unet_base(**kw) -> UNet:
    """Classic U-Net, widths 64..1024, plain 3x3 convs with bias: 31.0 M parameters."""
    return UNet((64, 128, 256, 512, 1024), separable=False, **kw)
