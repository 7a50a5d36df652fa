"""MALUNet (Ruan et al., BIBM 2022): the MicroAUNet teacher, plus the skeleton its family shares.

Re-implemented from the released JCruan519/MALUNet model (width
[8,16,24,32,48,64]); the head emits logits instead of the released sigmoid, and the five pre-bridge encoder
skips are returned for feature distillation. :class:`MalunetSkeleton` holds the wiring that MicroAUNet reuses.

Tied memory units: the released EA block makes its second Conv1d weight a permuted view of the first, two
Parameters over one storage, a tie that ``copy.deepcopy`` and ``.to(device/dtype)`` silently break. Here both
convs hold the *same* Parameter and the second computes with its transpose (exportable, no in-place trick).
So ``parameters()`` yields 146,711 unique values, the state_dict keeps one key per conv, and
:func:`edgeseg.models.counting.count_params` counts per conv like the released ``parameters()``: 177,943.
The optimiser sees one tensor with the summed gradient (the released code stepped the two separately).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models._registry import SegModel, register_model

__all__ = ["MALUNet", "MalunetSkeleton", "DWConvGN", "channel_mean_max", "init_family_weights", "malunet"]


def init_family_weights(m: nn.Module) -> None:
    """The family's init (as the released code sets it): fan-out normal convs, trunc-normal linears, norms left at defaults."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv1d, _TransposedConv1x1)):
        # Conv1d biases are left alone, as released (none of the family's Conv1d has one).
        with torch.no_grad():
            m.weight.normal_(0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.out_channels)))
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        with torch.no_grad():
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DWConvGN(nn.Module):
    """Depthwise kxk (bias) -> GroupNorm(4) -> pointwise 1x1 (bias), no activation."""

    def __init__(self, c_in: int, c_out: int, k: int = 3) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in)
        self.norm = nn.GroupNorm(4, c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.norm(self.dw(x)))


class GatedAttentionUnit(nn.Module):
    """GAU: sigmoid(DW3) * GELU(DW5) gate, then DW3 -> GELU, plus a 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.gate = DWConvGN(c_in, c_in, 3)
        self.value = DWConvGN(c_in, c_in, 5)
        self.out = DWConvGN(c_in, c_out, 3)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.gate(x)) * F.gelu(self.value(x))
        return F.gelu(self.out(y)) + self.shortcut(x)


class DilatedGatedAttention(nn.Module):
    """DGA: four channel quarters through depthwise 3x3 at dilations 7/5/2/1, GN, 1x1, GELU, then a GAU."""

    dilations = (7, 5, 2, 1)

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        q = c_in // 4
        self.branches = nn.ModuleList(nn.Conv2d(q, q, 3, padding=d, dilation=d, groups=q) for d in self.dilations)
        self.norm = nn.GroupNorm(4, c_in)
        self.mix = nn.Conv2d(c_in, c_in, 1)
        self.gau = GatedAttentionUnit(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([branch(part) for branch, part in zip(self.branches, x.chunk(4, dim=1))], dim=1)
        return self.gau(F.gelu(self.mix(self.norm(y))))


class _TransposedConv1x1(nn.Module):
    """A bias-free 1x1 Conv1d computing with the transpose of another Conv1d's (shared) weight."""

    thop_type = nn.Conv1d  # counted by edgeseg.models.counting as the nn.Conv1d the released code used
    kernel_size = (1,)

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the same Parameter object: one storage, one gradient
        self.out_channels = weight.shape[1]  # the weight is stored (4C, C, 1) and maps 4C -> C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight.transpose(0, 1))


class ExternalAttention(nn.Module):
    """EA: attention against 4C learned memory slots (key and value memories tied), GN, residual, GELU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(c, c, 1)
        self.memory_key = nn.Conv1d(c, 4 * c, 1, bias=False)
        self.memory_value = _TransposedConv1x1(self.memory_key.weight)
        self.proj_out = nn.Conv2d(c, c, 1, bias=False)
        self.norm = nn.GroupNorm(4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.memory_key(self.proj_in(x).flatten(2))  # (B, 4C, H*W)
        attn = attn.softmax(dim=-1)
        # Double normalisation: softmax over pixels, then L1 over the memory slots.
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
        y = self.memory_value(attn).unflatten(2, x.shape[-2:])  # (B, C, H, W)
        return F.gelu(self.norm(self.proj_out(y)) + x)


class SCAttBridge(nn.Module):
    """MALUNet's bridge: shared dilated 7x7 spatial gate, then a channel gate with one Linear per stage."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        total = sum(channels)
        self.spatial = nn.Conv2d(2, 1, 7, padding=9, dilation=3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.channel_mix = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.channel_heads = nn.ModuleList(nn.Linear(total, c) for c in channels)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        gated = [t * torch.sigmoid(self.spatial(channel_mean_max(t))) for t in skips]
        mixed = [g + t for g, t in zip(gated, skips)]
        v = torch.cat([self.pool(u) for u in mixed], dim=1).flatten(1).unsqueeze(1)  # (B, 1, S)
        v = self.channel_mix(v)
        return [
            torch.sigmoid(head(v)).transpose(1, 2).unsqueeze(-1) * u + g  # gate (B, c_i, 1, 1)
            for head, u, g in zip(self.channel_heads, mixed, gated)
        ]


def channel_mean_max(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, H, W): mean and max over channels, the input of the family's spatial gates."""
    return torch.cat([t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)], dim=1)


class MalunetSkeleton(SegModel):
    """The MALUNet-family U-shape; subclasses fill in the stages.

    Encoder stage i (5 of them): stage -> GroupNorm(4) -> maxpool 2 -> GELU gives skip t_i at H/2..H/32.
    Bottleneck: stage -> GELU at H/32, fed the pre-bridge t5. The bridge rewrites t1..t5. Decoder stage j:
    stage -> GroupNorm(4) -> bilinear x2 (not for the first) -> GELU -> + skip. Head: 1x1 at H/2, bilinear
    x2 to the input size, logits.

    This builds the stage norms and the head; subclasses add ``encoders`` (5), ``bottleneck``, ``bridge`` and
    ``decoders`` (5), then apply :func:`init_family_weights`. Inputs must be multiples of 32.
    """

    def __init__(self, channels: tuple[int, ...], in_channels: int) -> None:
        super().__init__()
        if len(channels) != 6 or any(c % 4 for c in channels):
            raise ValueError(f"need 6 channel counts, each a multiple of 4 (GroupNorm(4)); got {channels}")
        self.channels, self.in_channels = tuple(channels), in_channels
        self.enc_norms = nn.ModuleList(nn.GroupNorm(4, c) for c in channels[:5])
        self.dec_norms = nn.ModuleList(nn.GroupNorm(4, c) for c in reversed(channels[:5]))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward_all(self, x: torch.Tensor) -> dict:
        size = x.shape[-2:]
        skips = []
        for stage, norm in zip(self.encoders, self.enc_norms):
            x = F.gelu(F.max_pool2d(norm(stage(x)), 2))
            skips.append(x)
        features = list(skips)
        bridged = self.bridge(skips)
        x = F.gelu(self.bottleneck(x))  # as released, the bottleneck reads t5 from before the bridge
        for i, (stage, norm, skip) in enumerate(zip(self.decoders, self.dec_norms, reversed(bridged))):
            x = norm(stage(x))
            if i > 0:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = F.gelu(x) + skip
        logits = F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=True)
        return {"logits": logits, "region": [], "boundary": [], "features": features, "embedding": x}


class MALUNet(MalunetSkeleton):
    """MALUNet: plain 3x3 convs at full resolution, EA + DGA stages deeper, SC_Att bridge.

    Args:
        channels: six stage widths, multiples of 4 (released: 8, 16, 24, 32, 48, 64).
        in_channels: input image channels.

    Shapes: input (B, in_channels, H, W) with H, W multiples of 32; logits (B, 1, H, W).
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24, 32, 48, 64), in_channels: int = 3) -> None:
        super().__init__(channels, in_channels)
        c = channels
        self.encoders = nn.ModuleList([
            nn.Conv2d(in_channels, c[0], 3, padding=1),
            nn.Conv2d(c[0], c[1], 3, padding=1),
            nn.Conv2d(c[1], c[2], 3, padding=1),
            nn.Sequential(ExternalAttention(c[2]), DilatedGatedAttention(c[2], c[3])),
            nn.Sequential(ExternalAttention(c[3]), DilatedGatedAttention(c[3], c[4])),
        ])
        self.bottleneck = nn.Sequential(ExternalAttention(c[4]), DilatedGatedAttention(c[4], c[5]))
        self.bridge = SCAttBridge(c[:5])
        self.decoders = nn.ModuleList([
            nn.Sequential(DilatedGatedAttention(c[5], c[4]), ExternalAttention(c[4])),
            nn.Sequential(DilatedGatedAttention(c[4], c[3]), ExternalAttention(c[3])),
            nn.Sequential(DilatedGatedAttention(c[3], c[2]), ExternalAttention(c[2])),
            nn.Conv2d(c[2], c[1], 3, padding=1),
            nn.Conv2d(c[1], c[0], 3, padding=1),
        ])
        # Module order puts each EA's key conv before its value conv, so (as released) the tied weight ends
        # with the value conv's init, std sqrt(2 / C).
        self.apply(init_family_weights)


@register_model
def malunet(**kw) -> MALUNet:
    """MALUNet teacher, released width: 177,943 parameters as counted by count_params, 175,031 thop-style."""
    return MALUNet(channels=(8, 16, 24, 32, 48, 64), **kw)
