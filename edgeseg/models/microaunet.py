"""MicroAUNet (arXiv 2511.01143): depthwise-dilated convs, depth-guided attention, a parameter-shared bridge.

Re-implemented from the released JeremyXSC/MicroAUNet MAUNet class on the
MALUNet-family skeleton; the head emits logits (the released net ends in a sigmoid) and the five pre-bridge
encoder skips are returned for feature distillation. ``microaunet`` is the paper's 0.0249 M size (half the
released width); ``microaunet-84k`` is the released default width.

Inference forms (``fuse()``, see :mod:`edgeseg.models.fuse`), each the same maths: DWDConv with both BNs
folded into its convs; the bridge's Conv1d(1, 1, 3) + Linear over the pooled channel vector folded into one
1x1 conv, and its channel max as a tree of elementwise maxima (int8 quantisers may not handle a max
reduction: ai-edge-quantizer leaves REDUCE_MAX in float).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models._registry import register_model
from edgeseg.models.fuse import fold_bn_into_preceding_conv
from edgeseg.models.malunet import DWConvGN, MalunetSkeleton, channel_mean_max, init_family_weights

__all__ = ["MicroAUNet", "microaunet", "microaunet_84k"]


class DWDConv(nn.Module):
    """Depthwise (dilated) kxk -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU; convs without bias."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, k, padding=dilation * (k - 1) // 2, dilation=dilation, groups=c_in, bias=False)
        self.bn_dw = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_pw(self.pw(F.relu(self.bn_dw(self.dw(x))))))

    def fuse(self) -> FusedDWDConv:
        return FusedDWDConv(fold_bn_into_preceding_conv(self.dw, self.bn_dw),
                            fold_bn_into_preceding_conv(self.pw, self.bn_pw))


class FusedDWDConv(nn.Module):
    """DWDConv with both BNs folded: relu(pw(relu(dw(x))))."""

    def __init__(self, dw: nn.Conv2d, pw: nn.Conv2d) -> None:
        super().__init__()
        self.dw, self.pw = dw, pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(F.relu(self.dw(x))))


class DWDBlock(nn.Module):
    """Residual pair of DWDConvs (dilation 2 then 1); the GELUs on top of the inner ReLUs are as released."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dilated = DWDConv(c, c, dilation=2)
        self.local = DWDConv(c, c, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.local(F.gelu(self.dilated(x))) + x)


class LDGA(nn.Module):
    """Lightweight depth-guided attention: DW3 unit, one-map spatial sigmoid gate, DW1 unit, residual."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.local = DWConvGN(c_in, c_in, 3)
        self.gate = nn.Conv2d(c_in, 1, 1, bias=False)
        self.proj = DWConvGN(c_in, c_out, 1)
        self.shortcut = nn.Identity() if c_in == c_out else DWConvGN(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.local(x)
        f = f * torch.sigmoid(self.gate(f))
        return self.proj(f) + self.shortcut(x)


class LSCAB(nn.Module):
    """Single-path, parameter-shared channel-spatial bridge: one Linear and one 7x7 conv serve all five skips.

    The reflect padding needs every skip to be at least 4 px wide, i.e. inputs of at least 128 px.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        total = sum(channels)
        self.splits = tuple(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.channel_mix = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.channel_fc = nn.Linear(total, total)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, padding_mode="reflect", bias=False)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        v = torch.cat([self.pool(t) for t in skips], dim=1).flatten(1).unsqueeze(1)  # (B, 1, S)
        v = torch.sigmoid(self.channel_fc(self.channel_mix(v))).squeeze(1)
        out = []
        for t, c_att in zip(skips, v.split(self.splits, dim=1)):
            s_att = torch.sigmoid(self.spatial(channel_mean_max(t)))  # (B, 1, h, w)
            # Parallel fusion: the two gates are mixed, not applied one after the other as in MALUNet.
            att = self.alpha * c_att[:, :, None, None] + self.beta * s_att
            out.append(att * t + t)
        return out

    def fuse(self) -> FusedLSCAB:
        return FusedLSCAB(self)


class FusedLSCAB(nn.Module):
    """LSCAB with Conv1d(1, 1, 3) + Linear folded into one 1x1 conv on the pooled (B, S, 1, 1) vector, the
    channel max as a tree of maxima, and ``att * t + t`` as ``t * (1 + att)``."""

    def __init__(self, lscab: LSCAB) -> None:
        super().__init__()
        s = sum(lscab.splits)
        k = lscab.channel_mix.weight.detach().reshape(3)
        # conv1d (cross-correlation, padding 1): out[i] = sum_t k[t] v[i + t - 1], a banded matrix
        band = torch.zeros(s, s, dtype=k.dtype, device=k.device)
        for t in range(3):
            band += torch.diag(torch.full((s - abs(t - 1),), float(k[t]), dtype=k.dtype, device=k.device),
                               diagonal=t - 1)
        w = lscab.channel_fc.weight.detach() @ band
        self.register_buffer("channel_w", w[:, :, None, None].clone())
        self.register_buffer("channel_b", lscab.channel_fc.bias.detach().clone())
        self.splits, self.spatial, self.alpha, self.beta = lscab.splits, lscab.spatial, lscab.alpha, lscab.beta

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        v = torch.cat([t.mean((2, 3), keepdim=True) for t in skips], dim=1)  # (B, S, 1, 1)
        v = torch.sigmoid(F.conv2d(v, self.channel_w, self.channel_b))
        out = []
        for t, c_att in zip(skips, v.split(self.splits, dim=1)):
            s_att = torch.sigmoid(self.spatial(torch.cat([t.mean(dim=1, keepdim=True), _channel_max(t)], dim=1)))
            out.append(t * (1 + self.alpha * c_att + self.beta * s_att))
        return out


def _channel_max(t: torch.Tensor) -> torch.Tensor:
    """``t.amax(1, keepdim=True)`` as a tree of elementwise maxima over channel halves (exact)."""
    while t.shape[1] > 1:
        half = t.shape[1] // 2
        m = torch.maximum(t[:, :half], t[:, half:2 * half])
        t = torch.cat([m, t[:, 2 * half:]], 1) if t.shape[1] % 2 else m
    return t


class MicroAUNet(MalunetSkeleton):
    """MicroAUNet student.

    Args:
        channels: six stage widths, multiples of 4 (paper size 4..32, released default 8..64).
        in_channels: input image channels.

    Shapes: input (B, in_channels, H, W) with H, W multiples of 32 and at least 128; logits (B, 1, H, W).
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32, 48, 64), in_channels: int = 3) -> None:
        super().__init__(channels, in_channels)
        c = channels
        self.encoders = nn.ModuleList(
            [DWDConv(in_channels, c[0])] + [nn.Sequential(DWDBlock(c[i]), LDGA(c[i], c[i + 1])) for i in range(4)]
        )
        self.bottleneck = nn.Sequential(DWDBlock(c[4]), LDGA(c[4], c[5]))
        self.bridge = LSCAB(c[:5])
        self.decoders = nn.ModuleList(nn.Sequential(LDGA(c[i + 1], c[i]), DWDBlock(c[i])) for i in reversed(range(5)))
        self.apply(init_family_weights)


@register_model
def microaunet(**kw) -> MicroAUNet:
    """The paper's MicroAUNet: half the released width, 24,881 parameters (23,687 thop-style)."""
    return MicroAUNet(channels=(4, 8, 12, 16, 24, 32), **kw)


@register_model
def microaunet_84k(**kw) -> MicroAUNet:
    """MicroAUNet at the released default width: 84,281 parameters (81,895 thop-style)."""
    return MicroAUNet(channels=(8, 16, 24, 32, 48, 64), **kw)
