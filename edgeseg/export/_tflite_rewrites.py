"""TFLite-only rewrites (torch only), applied on top of the shared fused model of
:func:`edgeseg.export.prepare.prepare` so that litert-torch emits no TRANSPOSE and ai-edge-quantizer can
quantise every op. Model-agnostic and mathematically identical; :func:`prepare_for_tflite` returns the
result with prepare's float64 equivalence check (~1e-13 relative measured; FLOAT64_RTOL required).

* ``GroupNorm(G, C)``: per-channel spatial means (a mean over W, then over H: TFLite's MEAN sums in one
  float32 accumulator, and 65,536-term sums cost ~4e-3 of logit accuracy) and a constant
  block-averaging 1x1 conv from channel to group statistics, instead of the (B, G, C/G, H, W) reshape
  whose NCHW flatten order forces TRANSPOSEs; ``rsqrt`` instead of ``sqrt`` + ``div``; the output as
  ``x * a + (b - mu * a)``; for int8 an exact per-group input rescaling (eps rescaled with it) that
  gives every group unit variance on the calibration frames (:func:`group_scales`);
* 0-d learned scales as (1, 1, 1, 1) constants (the converter's layout pass keeps an elementwise op in
  NHWC only when all its inputs are 4-D: ``(1 - alpha) * x`` otherwise costs a TRANSPOSE pair);
* :class:`NHWCInput`: the NHWC device-side layout around the NCHW model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.export.prepare import prepare

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


def prepare_for_tflite(model: nn.Module, size: int, scales: dict[str, torch.Tensor] | None = None,
                       probe: np.ndarray | torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """:func:`~edgeseg.export.prepare.prepare` with the rewrites listed in the module docstring: (module,
    report), checked in float64 on ``probe``. With ``scales`` (from :func:`group_scales` on ``model``) the
    GroupNorms also get their int8-friendly group scales (see :class:`GroupNormExport`)."""
    return prepare(model, size, rewrite=lambda m: _rewrite(m, scales or {}), probe=probe)


def _rewrite(m: nn.Module, scales: dict[str, torch.Tensor]) -> nn.Module:
    """Every GroupNorm as a GroupNormExport (with its scale, by module name), 0-d scalars as 4-D; in place."""
    norms = [name for name, mod in m.named_modules() if isinstance(mod, nn.GroupNorm)]
    if set(scales) - set(norms):
        raise ValueError(f"group scales for GroupNorms the model does not have: {sorted(set(scales) - set(norms))}")
    for name in norms:
        parent, _, leaf = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, leaf, GroupNormExport(getattr(owner, leaf), scales.get(name)))
    _scalars_to_4d(m)
    return m


def _scalars_to_4d(m: nn.Module) -> None:
    """0-d parameters/buffers (learned scales) become (1, 1, 1, 1) constants: they broadcast the same way
    against NCHW features, but the converter's layout pass only keeps an elementwise op in NHWC when all its
    inputs are 4-D, so ``(1 - alpha) * x`` otherwise gets a TRANSPOSE pair around it."""
    for mod in m.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.dim() == 0:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach().clone().reshape(1, 1, 1, 1))
        for name, b in list(mod._buffers.items()):
            if b is not None and b.dim() == 0:
                mod._buffers[name] = b.reshape(1, 1, 1, 1)


class NHWCInput(nn.Module):
    """NHWC in, NHWC out: the device-side layout of the artefact."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
