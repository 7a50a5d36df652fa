"""Export-only rewrites for the TFLite backend (torch only): an inference copy of a model, mathematically
identical to it, with the layout- and int8-hostile parts rewritten so that litert-torch emits no TRANSPOSE
and ai-edge-quantizer can quantise every op. Used by :func:`edgeseg.export.tflite.torch_to_tflite`, which
checks the equivalence in float64 on every export.

Measured equivalence in float64: ~1e-13 relative (the export asserts 1e-9). What is rewritten:

* ``GroupNorm(G, C)``: per-channel spatial means (a mean over W, then over H: TFLite's MEAN sums in one
  float32 accumulator, and 65,536-term sums cost ~4e-3 of logit accuracy) and a constant
  block-averaging 1x1 conv from channel to group statistics, instead of the (B, G, C/G, H, W) reshape
  whose NCHW flatten order forces TRANSPOSEs; ``rsqrt`` instead of ``sqrt`` + ``div``; the output as
  ``x * a + (b - mu * a)``; for int8 an exact per-group input rescaling (eps rescaled with it) that
  gives every group unit variance on the calibration frames;
* UltraSeg's channels-first LayerNorm with ``rsqrt``; its GSB gates (input-independent) evaluated
  once at the export size and stored as one constant; ``x + x*sigmoid(z) [+ ...]`` in the heads and
  merges as ``x * (1 + sigmoid(z) [+ ...])``; the authors' 2-logit head ``z_fg - z_bg`` as one conv;
  0-d learned scales as (1, 1, 1, 1) constants (the converter's layout pass keeps an elementwise op in
  NHWC only when all its inputs are 4-D: ``(1 - alpha) * x`` otherwise costs a TRANSPOSE pair);
* MicroAUNet's bridge: Conv1d(1, 1, 3) + Linear over the pooled channel vector folded into one 1x1
  conv; the channel max as a tree of elementwise maxima (ai-edge-quantizer cannot quantise REDUCE_MAX);
* BatchNorm folded into the adjacent conv.

TRANSPOSE ops in the fp32 graph: 72 -> 0 (UltraSeg-130K and -108K), 85 -> 0 (MicroAUNet).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.export._prepare import fold_bn_into_following_conv, fold_bn_into_preceding_conv

__all__ = ["prepare_for_tflite", "group_scales", "NHWCInput"]


class GroupNormExport(nn.Module):
    """``nn.GroupNorm`` without the (B, G, C/G, H, W) reshape: per-channel spatial means, then a constant
    block-averaging 1x1 conv turns channel statistics into group statistics (equal group sizes make the
    mean of channel means the group mean). Two-pass variance, ``rsqrt``: the same maths as GroupNorm.

    ``group_scale`` (one positive constant per group, default 1) rescales the input group-wise and the eps
    with its square: GroupNorm is invariant to that, exactly. Chosen from calibration frames so that every
    group has unit variance on average, it gives all channels the same range before the per-tensor int8
    quantisation of the centred values, their squares and the rsqrt scale (a group with 20x the spread of
    another would otherwise leave it a handful of int8 levels)."""

    def __init__(self, gn: nn.GroupNorm, group_scale: torch.Tensor | None = None):
        super().__init__()
        c, g = gn.num_channels, gn.num_groups
        k = c // g
        dt = gn.weight.dtype if gn.affine else torch.get_default_dtype()
        avg = torch.zeros(c, c, dtype=dt)
        for i in range(g):
            avg[i * k:(i + 1) * k, i * k:(i + 1) * k] = 1.0 / k
        self.register_buffer("avg", avg[:, :, None, None])
        w = gn.weight.detach() if gn.affine else torch.ones(c, dtype=dt)
        b = gn.bias.detach() if gn.affine else torch.zeros(c, dtype=dt)
        self.register_buffer("weight", w.clone()[None, :, None, None])
        self.register_buffer("bias", b.clone()[None, :, None, None])
        if group_scale is None:
            self.in_scale = None
            self.eps = gn.eps
        else:
            sc = group_scale.to(dt).repeat_interleave(k)
            if not bool((sc > 0).all()):
                raise ValueError("group scales must be positive")
            self.register_buffer("in_scale", sc[None, :, None, None].clone())
            self.register_buffer("eps", (gn.eps * sc * sc)[None, :, None, None].clone())

    def forward(self, x):
        if self.in_scale is not None:
            x = x * self.in_scale
        mu = F.conv2d(_spatial_mean(x), self.avg)
        d = x - mu
        var = F.conv2d(_spatial_mean(d * d), self.avg)
        # (x - mu) * a + b as x * a + (b - mu * a), a = rsqrt(var + eps) * weight: the output is one
        # multiply-add of x by (B, C, 1, 1) constants, so in int8 the centred d (requantised twice) only
        # feeds the variance, not the output (+0.1 % mask agreement, less foreground loss)
        a = torch.rsqrt(var + self.eps) * self.weight
        return x * a + (self.bias - mu * a)


def group_scales(model: nn.Module, frames: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """Per GroupNorm (by module name): 1 / (RMS over ``frames`` (N, 3, S, S) of each group's standard
    deviation), computed in the model's dtype. Give it a float64 copy: float32 convs and reductions round
    differently with the torch thread count, and the scales then differ in their last bits, which moves
    int8 ranges and a few hundred int8 outputs (measured: 4 of the 108K's 16 scale buffers at 1 vs 2
    threads). In float64 the same inputs give the same float32 scales."""
    dt = next(model.parameters()).dtype
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def hook(mod, args, name):
        x = args[0]
        grouped = x.reshape(x.shape[0], mod.num_groups, -1)
        stats.setdefault(name, []).append(grouped.var(-1, unbiased=False))  # (B, G)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.GroupNorm):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name)))
    try:
        with torch.no_grad():
            for i in range(0, len(frames), 8):
                model(torch.as_tensor(np.asarray(frames[i:i + 8])).to(dt))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, v in stats.items():
        var = torch.cat(v).mean(0)
        # a group that is constant on every frame (dead channels) keeps scale 1: any scale is exact there
        out[n] = torch.where(var > 1e-12 * var.max().clamp_min(1e-30), torch.rsqrt(var.clamp_min(1e-30)),
                             torch.ones_like(var))
    return out


def _spatial_mean(x):
    """Mean over (H, W) as a mean over W then over H: the same value, but TFLite's MEAN accumulates in a
    single float32 running sum, and two short sums (e.g. 256 + 256 terms instead of 65,536) keep its
    rounding error near torch's pairwise summation."""
    return x.mean(3, keepdim=True).mean(2, keepdim=True)


class ChannelLayerNormExport(nn.Module):
    """UltraSeg's channels-first LayerNorm with ``rsqrt`` (no SQRT + DIV)."""

    def __init__(self, ln):
        super().__init__()
        self.register_buffer("weight", ln.weight.detach().clone()[None, :, None, None])
        self.register_buffer("bias", ln.bias.detach().clone()[None, :, None, None])
        self.eps = ln.eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        d = x - mu
        var = (d * d).mean(1, keepdim=True)
        return d * torch.rsqrt(var + self.eps) * self.weight + self.bias


class FrozenGSB(nn.Module):
    """UltraSeg GSB at one feature size: the four input-independent gates folded into one constant."""

    def __init__(self, gsb, size: tuple[int, int]):
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


class BridgeExport(nn.Module):
    """MicroAUNet's LSCAB with Conv1d(1,1,3) + Linear folded into one 1x1 conv on the pooled vector."""

    def __init__(self, lscab):
        super().__init__()
        s = sum(lscab.splits)
        k = lscab.channel_mix.weight.detach().reshape(3)
        # conv1d (cross-correlation, padding 1): out[i] = sum_t k[t] v[i + t - 1], a banded matrix
        band = torch.zeros(s, s, dtype=k.dtype)
        for t in range(3):
            band += torch.diag(torch.full((s - abs(t - 1),), float(k[t]), dtype=k.dtype), diagonal=t - 1)
        w = lscab.channel_fc.weight.detach() @ band
        self.register_buffer("channel_w", w[:, :, None, None].clone())
        self.register_buffer("channel_b", lscab.channel_fc.bias.detach().clone())
        self.splits, self.spatial, self.alpha, self.beta = lscab.splits, lscab.spatial, lscab.alpha, lscab.beta
        self.channel_mean_max = _channel_mean_max

    def forward(self, skips):
        v = torch.cat([t.mean((2, 3), keepdim=True) for t in skips], dim=1)  # (B, S, 1, 1)
        v = torch.sigmoid(F.conv2d(v, self.channel_w, self.channel_b))
        out = []
        for t, c_att in zip(skips, v.split(self.splits, dim=1)):
            s_att = torch.sigmoid(self.spatial(self.channel_mean_max(t)))
            out.append(t * (1 + self.alpha * c_att + self.beta * s_att))  # att * t + t
        return out


class RegionHeadExport(nn.Module):
    """``x + x * sigmoid(z)`` as ``x * (1 + sigmoid(z))``: the gate is a one-channel map, so the
    multi-channel tensor is touched (and, in int8, requantised) once instead of twice."""

    def __init__(self, head):
        super().__init__()
        self.conv = head.conv

    def forward(self, x):
        z = self.conv(x)
        return x * (1 + torch.sigmoid(z)), z


class GateHeadExport(nn.Module):
    """``x + x*sigmoid(zb) + x*sigmoid(z)`` as ``x * (1 + sigmoid(zb) + sigmoid(z))``."""

    def __init__(self, head):
        super().__init__()
        self.conv1, self.conv2 = head.conv1, head.conv2

    def forward(self, x):
        zb, z = self.conv1(x), self.conv2(x)
        return x * (1 + torch.sigmoid(zb) + torch.sigmoid(z)), z, zb


class AdaptiveMergeExport(nn.Module):
    """``adapter(dec) + skip * (1 + w_r*sigmoid(z) [+ w_b*sigmoid(zb)])``: the same sum, one-channel gate."""

    def __init__(self, merge):
        super().__init__()
        self.feature_adapter = merge.feature_adapter
        self.region_weight, self.boundary_weight = merge.region_weight, merge.boundary_weight

    def forward(self, dec, skip, z, zb=None):
        gate = 1 + torch.sigmoid(z) * self.region_weight
        if self.boundary_weight is not None:
            gate = gate + torch.sigmoid(zb) * self.boundary_weight
        return self.feature_adapter(dec) + skip * gate


def _channel_mean_max(t):
    return torch.cat([t.mean(dim=1, keepdim=True), _channel_max(t)], dim=1)


def _channel_max(t):
    """``t.amax(1, keepdim=True)`` as a tree of elementwise maxima over channel halves (exact): TFLite's
    REDUCE_MAX has an int8 kernel but ai-edge-quantizer cannot quantise it, so it would be a float island."""
    while t.shape[1] > 1:
        half = t.shape[1] // 2
        m = torch.maximum(t[:, :half], t[:, half:2 * half])
        t = torch.cat([m, t[:, 2 * half:]], 1) if t.shape[1] % 2 else m
    return t


def _fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv -> bn as one new conv (eval statistics); the originals are left untouched."""
    out = copy.deepcopy(conv)
    fold_bn_into_preceding_conv(out, bn)
    return out


def _fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """bn -> conv as one new conv; exact only for an unpadded, ungrouped conv (checked)."""
    if any(p != 0 for p in conv.padding) or conv.groups != 1:
        raise ValueError("BN before a padded or grouped conv cannot be folded exactly")
    out = copy.deepcopy(conv)
    fold_bn_into_following_conv(bn, out)
    return out


class _ConvAct(nn.Module):
    """MicroAUNet's DWDConv with both BNs folded: relu(pw(relu(dw(x))))."""

    def __init__(self, m):
        super().__init__()
        self.dw = _fold_bn_after(m.dw, m.bn_dw)
        self.pw = _fold_bn_after(m.pw, m.bn_pw)

    def forward(self, x):
        return F.relu(self.pw(F.relu(self.dw(x))))


class _Conv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _gsb_sizes(model: nn.Module, size: int) -> dict[str, tuple[int, int]]:
    """Feature size seen by every GSB for a ``size`` x ``size`` input (one dummy forward with hooks)."""
    from edgeseg.models.ultraseg import GSB

    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, GSB):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[2:]))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, dtype=next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def prepare_for_tflite(model: nn.Module, size: int, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Export-only inference copy of ``model`` (eval, fixed ``size``), mathematically identical to it, with
    the rewrites listed in the module docstring. The original model is not touched. With ``scales`` (from
    :func:`group_scales`) the GroupNorms also get their int8-friendly group scales (see
    :class:`GroupNormExport`)."""
    from edgeseg.models.microaunet import DWDConv, LSCAB
    from edgeseg.models.ultraseg import GSB, AdaptiveMerge, ChannelLayerNorm, Down, GateHead, RegionHead

    m = copy.deepcopy(model).eval()
    _fold_two_logit_head(m)
    gsb_sizes = _gsb_sizes(m, size)
    scales = scales or {}
    for name, mod in list(m.named_modules()):
        if not name:
            continue
        try:
            if m.get_submodule(name) is not mod:  # inside a module replaced earlier in this loop
                continue
        except AttributeError:
            continue
        if isinstance(mod, GSB):
            frozen = FrozenGSB(mod, gsb_sizes[name])
            frozen.norm1, frozen.norm2 = ChannelLayerNormExport(mod.norm1), ChannelLayerNormExport(mod.norm2)
            _replace(m, name, frozen)
        elif isinstance(mod, ChannelLayerNorm):
            _replace(m, name, ChannelLayerNormExport(mod))
        elif isinstance(mod, nn.GroupNorm):
            _replace(m, name, GroupNormExport(mod, scales.get(name)))
        elif isinstance(mod, RegionHead):
            _replace(m, name, RegionHeadExport(mod))
        elif isinstance(mod, GateHead):
            _replace(m, name, GateHeadExport(mod))
        elif isinstance(mod, AdaptiveMerge):
            _replace(m, name, AdaptiveMergeExport(mod))
        elif isinstance(mod, LSCAB):
            _replace(m, name, BridgeExport(mod))
        elif isinstance(mod, DWDConv):
            _replace(m, name, _ConvAct(mod))
        elif isinstance(mod, Down) and not any(mod.conv.padding) and mod.conv.groups == 1:
            _replace(m, name, _Conv(_fold_bn_before(mod.bn, mod.conv)))
        elif isinstance(mod, nn.Sequential):
            _fold_sequential_bn(mod)
    _scalars_to_4d(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def _fold_two_logit_head(m: nn.Module) -> None:
    """UltraSeg with the authors' 2-logit head returns ``z_fg - z_bg`` of a 1x1 conv: that difference is one
    1x1 conv (weights and biases subtracted). Besides saving a SLICE/SUB pair, it removes a catastrophic
    cancellation from the int8 model: two large logits quantised separately, then subtracted."""
    from edgeseg.models.ultraseg import UltraSeg

    if not isinstance(m, UltraSeg) or m.num_classes != 2:
        return
    conv = m.final[0]
    fused = nn.Conv2d(conv.in_channels, 1, 1).to(conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight[1:2] - conv.weight[0:1])
        fused.bias.copy_(conv.bias[1:2] - conv.bias[0:1])
    m.final = nn.Sequential(fused)
    m.num_classes = 1


def _scalars_to_4d(m: nn.Module) -> None:
    """0-d parameters/buffers (learned scales such as UltraSeg's attention_alpha) become (1, 1, 1, 1)
    constants: they broadcast the same way against NCHW features, but the converter's layout pass only
    keeps an elementwise op in NHWC when all its inputs are 4-D, so ``(1 - alpha) * x`` otherwise gets a
    TRANSPOSE pair around it."""
    for mod in m.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.dim() == 0:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach().clone().reshape(1, 1, 1, 1))
        for name, b in list(mod._buffers.items()):
            if b is not None and b.dim() == 0:
                mod._buffers[name] = b.reshape(1, 1, 1, 1)


def _fold_sequential_bn(seq: nn.Sequential) -> None:
    """Conv2d, BatchNorm2d pairs inside an nn.Sequential -> one conv + Identity."""
    keys = list(seq._modules)
    for a, b in zip(keys, keys[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            seq._modules[a] = _fold_bn_after(conv, bn)
            seq._modules[b] = nn.Identity()


class NHWCInput(nn.Module):
    """NHWC in, NHWC out: the device-side layout of the artefact."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
