"""UltraSeg-108K / -130K and their wider same-family teachers (UltraSeg-500K, -1M).

Paper: "UltraSeg" (arXiv 2602.04381). Re-implemented from the paper's structural description and the authors'
released code, with one decision of our own: every head emits logits and the loss applies the only sigmoid (the released
code applies it twice). ``num_classes=2`` builds the authors' 2-logit head so that their released weights
load; its output is reduced to the single foreground logit ``z_fg - z_bg``, whose sign is exactly the
argmax of the two logits, so everything downstream sees one channel.

Inference forms (``fuse()``, see :mod:`edgeseg.models.fuse`), each the same maths: ``Down``'s BN folded into
its unpadded conv; the GSB gates, which do not depend on the input, computed once at the feature size and
stored as one constant; the channel LayerNorm with ``rsqrt``; ``x + x * sigmoid(z) [+ ...]`` in the heads and
merges as ``x * (1 + sigmoid(z) [+ ...])`` (the multi-channel tensor is touched, and in int8 requantised,
once); the 2-logit head as one 1x1 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models._registry import SegModel, register_model
from edgeseg.models.fuse import fold_bn_into_following_conv
from edgeseg.models.malunet import init_family_weights

__all__ = ["UltraSeg"]


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class Down(nn.Module):
    """BatchNorm then a learned 2x2 stride-2 conv (UltraSeg's replacement for max-pooling)."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 2, stride=2)

    def forward(self, x):
        return self.conv(self.bn(x))

    def fuse(self) -> nn.Conv2d:
        # exact: the conv has no padding, so every output pixel sees only (normalised) real inputs
        return fold_bn_into_following_conv(self.bn, self.conv)


class EDB(nn.Module):
    """Enhanced Dilated Block: three grouped 3x3 convs (dilation 1, 2, 3; 3 input channels per output
    channel), concatenated, fused by a 1x1 conv and added to the input with a small scale (fixed 0.1 in
    108K, learned in 130K). No norm and no activation inside."""

    def __init__(self, c: int, learn_scale: bool):
        super().__init__()
        g = c // 3
        self.dilated_convs = nn.ModuleList(nn.Conv2d(c, g, 3, padding=d, dilation=d, groups=g) for d in (1, 2, 3))
        self.fusion = nn.Conv2d(c, c, 1)
        if learn_scale:
            self.res_weight = nn.Parameter(torch.tensor(0.1))
        else:
            self.register_buffer("res_weight", torch.tensor(0.1), persistent=False)

    def forward(self, x):
        return x + self.res_weight * self.fusion(torch.cat([conv(x) for conv in self.dilated_convs], 1))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (eps 1e-6)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def fuse(self) -> FusedChannelLayerNorm:
        return FusedChannelLayerNorm(self)


class FusedChannelLayerNorm(nn.Module):
    """ChannelLayerNorm with ``rsqrt`` (no SQRT + DIV) and (1, C, 1, 1) constants."""

    def __init__(self, ln: ChannelLayerNorm):
        super().__init__()
        self.register_buffer("weight", ln.weight.detach().clone()[None, :, None, None])
        self.register_buffer("bias", ln.bias.detach().clone()[None, :, None, None])
        self.eps = ln.eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        d = x - mu
        var = (d * d).mean(1, keepdim=True)
        return d * torch.rsqrt(var + self.eps) * self.weight + self.bias


def _dw_gelu_pw(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.GELU(), nn.Conv2d(c_in, c_out, 1))


class GSB(nn.Module):
    """Group-Shuffle Block. Each quarter of the channels is multiplied by a gate computed from a learned
    8x8 map resized to the feature size: the gate does not depend on the input, so at a fixed input size
    it is a constant that ``fuse`` freezes. Quarters are re-concatenated in the order 2, 4, 1, 3."""

    def __init__(self, c_in: int, c_out: int, norm: str = "seed"):
        super().__init__()
        c = c_in // 4
        self.norm1 = ChannelLayerNorm(c_in) if norm == "seed" else nn.BatchNorm2d(c_in)
        self.norm2 = ChannelLayerNorm(c_in) if norm == "seed" else nn.BatchNorm2d(c_in)
        for j in range(1, 5):
            setattr(self, f"share_space{j}", nn.Parameter(torch.ones(1, c, 8, 8)))
            setattr(self, f"conv{j}", _dw_gelu_pw(c, c))
        self.ldw = _dw_gelu_pw(c_in, c_out)

    def gates(self, size: tuple[int, int]) -> list[torch.Tensor]:
        """The four input-independent gates (1, C/4, H, W) at feature size ``size``."""
        return [
            getattr(self, f"conv{j}")(
                F.interpolate(getattr(self, f"share_space{j}"), size=size, mode="bilinear", align_corners=True)
            )
            for j in range(1, 5)
        ]

    def forward(self, x):
        x1, x2, x3, x4 = torch.chunk(self.norm1(x), 4, dim=1)
        g1, g2, g3, g4 = self.gates(x.shape[2:])
        x = torch.cat([x2 * g2, x4 * g4, x1 * g1, x3 * g3], dim=1)
        return self.ldw(self.norm2(x))

    def fuse(self, size: tuple[int, int]) -> FrozenGSB:
        return FrozenGSB(self, size)


class FrozenGSB(nn.Module):
    """GSB at one feature size: the four gates, in the shuffled order, as one constant (1, C, H, W)."""

    def __init__(self, gsb: GSB, size: tuple[int, int]):
        super().__init__()
        with torch.no_grad():
            g1, g2, g3, g4 = gsb.gates(size)
        self.register_buffer("gate", torch.cat([g2, g4, g1, g3], 1).detach().clone())
        self.size = tuple(size)
        self.norm1, self.norm2, self.ldw = gsb.norm1, gsb.norm2, gsb.ldw

    def forward(self, x):
        if tuple(x.shape[2:]) != self.size:
            raise ValueError(f"GSB frozen for feature size {self.size}, got {tuple(x.shape[2:])}")
        x1, x2, x3, x4 = torch.chunk(self.norm1(x), 4, dim=1)
        return self.ldw(self.norm2(torch.cat([x2, x4, x1, x3], 1) * self.gate))


class RegionHead(nn.Module):
    """Region logit z from a 1x1 conv; the features are re-weighted by sigmoid(z)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        z = self.conv(x)
        return x + x * torch.sigmoid(z), z

    def fuse(self) -> FusedRegionHead:
        return FusedRegionHead(self.conv)


class FusedRegionHead(nn.Module):
    """RegionHead as ``x * (1 + sigmoid(z))``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        z = self.conv(x)
        return x * (1 + torch.sigmoid(z)), z


class GateHead(nn.Module):
    """Predict-gated head: boundary logit (conv1) and region logit (conv2) both gate the features."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 1, 1)
        self.conv2 = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        zb, z = self.conv1(x), self.conv2(x)
        return x + x * torch.sigmoid(zb) + x * torch.sigmoid(z), z, zb

    def fuse(self) -> FusedGateHead:
        return FusedGateHead(self.conv1, self.conv2)


class FusedGateHead(nn.Module):
    """GateHead as ``x * (1 + sigmoid(zb) + sigmoid(z))``."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d):
        super().__init__()
        self.conv1, self.conv2 = conv1, conv2

    def forward(self, x):
        zb, z = self.conv1(x), self.conv2(x)
        return x * (1 + torch.sigmoid(zb) + torch.sigmoid(z)), z, zb


class AdaptiveMerge(nn.Module):
    """Skip fusion: adapter(dec) + skip + sigmoid(z)*skip*w_r [+ sigmoid(zb)*skip*w_b], learned scalars."""

    def __init__(self, c: int, use_boundary: bool):
        super().__init__()
        self.region_weight = nn.Parameter(torch.tensor(0.3))
        self.boundary_weight = nn.Parameter(torch.tensor(0.1)) if use_boundary else None
        if c > 16:
            h = max(c // 8, 4)
            self.feature_adapter = nn.Sequential(nn.Conv2d(c, h, 1), nn.ReLU(), nn.Conv2d(h, c, 1))
        else:
            self.feature_adapter = nn.Identity()

    def forward(self, dec, skip, z, zb=None):
        out = self.feature_adapter(dec) + skip + torch.sigmoid(z) * skip * self.region_weight
        if self.boundary_weight is not None:
            out = out + torch.sigmoid(zb) * skip * self.boundary_weight
        return out

    def fuse(self) -> FusedAdaptiveMerge:
        return FusedAdaptiveMerge(self)


class FusedAdaptiveMerge(nn.Module):
    """AdaptiveMerge as ``adapter(dec) + skip * (1 + w_r * sigmoid(z) [+ w_b * sigmoid(zb)])``."""

    def __init__(self, merge: AdaptiveMerge):
        super().__init__()
        self.feature_adapter = merge.feature_adapter
        self.region_weight, self.boundary_weight = merge.region_weight, merge.boundary_weight

    def forward(self, dec, skip, z, zb=None):
        gate = 1 + torch.sigmoid(z) * self.region_weight
        if self.boundary_weight is not None:
            gate = gate + torch.sigmoid(zb) * self.boundary_weight
        return self.feature_adapter(dec) + skip * gate


class TwoLogitHead(nn.Sequential):
    """The authors' 2-logit 1x1 head (background, foreground), reduced to ``z_fg - z_bg``: its sign is exactly
    the argmax of the two logits."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, 2, 1))

    def forward(self, x):
        z = self[0](x)
        return z[:, 1:2] - z[:, 0:1]

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """``z_fg - z_bg`` of a 1x1 conv is one 1x1 conv (weights and biases subtracted). Besides a SLICE/SUB
        pair, this removes a catastrophic cancellation from int8 models: two large logits quantised
        separately, then subtracted."""
        conv = self[0]
        fused = nn.Conv2d(conv.in_channels, 1, 1).to(conv.weight)
        fused.weight.copy_(conv.weight[1:2] - conv.weight[0:1])
        fused.bias.copy_(conv.bias[1:2] - conv.bias[0:1])
        return fused


class AttentionFusion(nn.Module):
    """130K's attention-guided fusion of the (downsampled) stage-3 features with stage-4 features."""

    def __init__(self, c3: int, c4: int):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Conv2d(c3, c4, 1)])
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(2 * c4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 2, 1)
        )

    def forward(self, x3, x4):
        x3 = self.transforms[0](x3)
        a = torch.softmax(self.spatial_attention(torch.cat([x3, x4], 1)), dim=1)
        return a[:, 0:1] * x3 + a[:, 1:2] * x4


class UltraSeg(SegModel):
    """UltraSeg encoder-decoder. ``fusion=False`` is the 108K graph, ``fusion=True`` the 130K graph (AGF +
    spatial attention at the bottleneck, learned EDB scales).

    ``norm="seed"`` uses the paper's norms: GroupNorm(4) after the encoder and decoder stages, a channel
    LayerNorm in the GSBs. ``norm="bn"`` (the deploy-native ``-bn`` variants) puts BatchNorm in all of those
    places: in inference a BatchNorm is a per-channel scale and shift that the runtimes fold into the adjacent
    convolution, where the seed norms compute statistics of every frame (costly, and in int8 hard to quantise).

    Shapes: x (B, 3, H, W) with H, W multiples of 32 -> logits (B, 1, H, W).
    """

    region_weights = (0.1, 0.2, 0.3, 0.4)  # z4 (H/16) ... z1 (H/2): coarse heads get small weights
    boundary_weights = (0.1, 0.2, 0.3)  # b1 (H/8) ... b3 (H/2)

    def __init__(self, channels=(8, 16, 48, 64, 96), fusion: bool = False, num_classes: int = 1,
                 norm: str = "seed"):
        super().__init__()
        if num_classes not in (1, 2):
            raise ValueError(f"num_classes must be 1 (sigmoid) or 2 (authors' softmax head), got {num_classes}")
        if norm not in ("seed", "bn"):
            raise ValueError(f"norm must be 'seed' (GroupNorm + channel LayerNorm) or 'bn', got {norm!r}")
        stage_norm = (lambda c: nn.GroupNorm(4, c)) if norm == "seed" else nn.BatchNorm2d
        c1, c2, c3, c4, c5 = channels
        self.channels, self.fusion, self.num_classes = tuple(channels), fusion, num_classes
        # A BatchNorm right after a stage's conv sits in the stage's Sequential, where fuse_model folds it.
        bn_in_stage = (lambda c: [nn.BatchNorm2d(c)]) if norm == "bn" else (lambda c: [])
        self.encoder1 = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), *bn_in_stage(c1))
        self.encoder2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), *bn_in_stage(c2))
        self.encoder3 = nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), EDB(c3, fusion), EDB(c3, fusion))
        self.encoder4 = nn.Sequential(GSB(c3, c4, norm))
        self.ebn1, self.ebn2 = (stage_norm(c) if norm == "seed" else nn.Identity() for c in (c1, c2))
        self.ebn3, self.ebn4 = stage_norm(c3), stage_norm(c4)
        self.Down1, self.Down2, self.Down3 = Down(c1), Down(c2), Down(c3)
        if fusion:
            self.multiscale_fusion = AttentionFusion(c3, c4)
            self.attention_alpha = nn.Parameter(torch.tensor(0.3))
        self.bottleneck = nn.Conv2d(c4, c5, 3, padding=1)
        self.decoder1 = nn.Sequential(GSB(c5, c4, norm))
        self.decoder2 = nn.Sequential(GSB(c4, c3, norm))
        self.decoder3 = nn.Sequential(GSB(c3, c2, norm))
        self.decoder4 = nn.Sequential(nn.Conv2d(c2, c1, 3, padding=1), *bn_in_stage(c1))
        self.dbn1, self.dbn2, self.dbn3 = (stage_norm(c) for c in (c4, c3, c2))
        self.dbn4 = stage_norm(c1) if norm == "seed" else nn.Identity()
        self.pred1 = RegionHead(c4)
        self.gate1, self.gate2, self.gate3 = GateHead(c3), GateHead(c2), GateHead(c1)
        self.merge4 = AdaptiveMerge(c4, use_boundary=False)
        self.merge3, self.merge2, self.merge1 = (AdaptiveMerge(c, use_boundary=True) for c in (c3, c2, c1))
        self.final = TwoLogitHead(c1) if num_classes == 2 else nn.Sequential(nn.Conv2d(c1, 1, 1))
        self.apply(init_family_weights)  # the init shared across the seed code (as in the seed papers' released code)

    def forward_all(self, x: torch.Tensor) -> dict:
        gelu = F.gelu
        t1 = gelu(self.Down1(self.ebn1(self.encoder1(x))))  # (B, c1, H/2, W/2)
        t2 = gelu(self.Down2(self.ebn2(self.encoder2(t1))))  # (B, c2, H/4, W/4)
        t3 = gelu(self.Down3(self.ebn3(self.encoder3(t2))))  # (B, c3, H/8, W/8)
        t4 = gelu(F.max_pool2d(self.ebn4(self.encoder4(t3)), 2))  # (B, c4, H/16, W/16)
        if self.fusion:
            # 130K resizes t3 *down* to t4's grid before fusing (named "x3_up" in the released code).
            x3 = F.interpolate(t3, size=t4.shape[2:], mode="bilinear", align_corners=True)
            b = self.bottleneck(self.multiscale_fusion(x3, t4))
            b_att = b * torch.sigmoid(b.mean(1, keepdim=True))
            b = (1 - self.attention_alpha) * b + self.attention_alpha * b_att
        else:
            b = self.bottleneck(t4)  # (B, c5, H/16, W/16), no norm, no activation

        d1 = gelu(self.dbn1(self.decoder1(b)))
        d1, z4 = self.pred1(d1)
        d1 = self.merge4(d1, t4, z4)
        d2 = gelu(_up2(self.dbn2(self.decoder2(d1))))
        d2, z3, b1 = self.gate1(d2)
        d2 = self.merge3(d2, t3, z3, b1)
        d3 = gelu(_up2(self.dbn3(self.decoder3(d2))))
        d3, z2, b2 = self.gate2(d3)
        d3 = self.merge2(d3, t2, z2, b2)
        d4 = gelu(_up2(self.dbn4(self.decoder4(d3))))
        d4, z1, b3 = self.gate3(d4)
        d4 = self.merge1(d4, t1, z1, b3)  # (B, c1, H/2, W/2)

        return {
            "logits": _up2(self.final(d4)),
            "region": [z4, z3, z2, z1],
            "boundary": [b1, b2, b3],
            "features": [t1, t2, t3, t4],
            "embedding": d4,
        }


@register_model
def ultraseg_108k(**kw) -> UltraSeg:
    return UltraSeg((8, 16, 48, 64, 96), fusion=False, **kw)


@register_model
def ultraseg_108k_bn(**kw) -> UltraSeg:
    """UltraSeg-108K, deploy-native: BatchNorm in place of its GroupNorm and channel LayerNorm."""
    return UltraSeg((8, 16, 48, 64, 96), fusion=False, norm="bn", **kw)


@register_model
def ultraseg_130k(**kw) -> UltraSeg:
    return UltraSeg((8, 16, 48, 64, 96), fusion=True, **kw)


@register_model
def ultraseg_500k(**kw) -> UltraSeg:
    return UltraSeg((16, 32, 96, 128, 192), fusion=True, **kw)


@register_model
def ultraseg_1m(**kw) -> UltraSeg:
    return UltraSeg((24, 48, 144, 192, 288), fusion=True, **kw)
