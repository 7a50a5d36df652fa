"""Parameter and MAC counters: the plain count and the thop-0.1.1-style count the seed papers quote.

thop hooks leaf modules of the types it has a rule for, counts the parameters of each such
module that runs (once per module) and adds per-type MAC formulas on every call. GroupNorm, raw
``nn.Parameter``s on custom modules and functional ops (``F.interpolate``, ``Tensor.softmax``) are invisible
to it. This module reproduces that with forward hooks, without depending on thop.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

__all__ = ["count_params", "count_params_thop", "count_macs"]


def _conv(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    # thop 0.1.1: output elements x input channels per group x kernel elements, bias free of charge. It uses
    # the same formula for transposed convs (an overcount there; kept for comparability).
    return y.numel() * (x.shape[1] // getattr(m, "groups", 1)) * math.prod(m.weight.shape[2:])


def _norm(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return 2 * x.numel() * (2 if affine else 1)


def _softmax(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    dim = m.dim if m.dim is not None else (0 if x.dim() in (0, 1, 3) else 1)  # torch's legacy implicit dim
    n = x.shape[dim]
    return x.numel() // n * (3 * n - 1)  # n exp, n - 1 adds, n divisions per row


def _adaptive_avgpool(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    window = math.prod(i / o for i, o in zip(x.shape[2:], y.shape[2:]))
    return int((window + 1) * y.numel())  # window adds plus one division per output


def _upsample(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    per_output = {"nearest": 1, "linear": 5, "bilinear": 11, "bicubic": 259}
    return per_output.get(m.mode, 0) * y.numel()


def _zero(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return 0


def _input_numel(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return x.numel()


def _output_numel(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return y.numel()


def _linear(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return m.in_features * y.numel()


# thop 0.1.1's rule table (exact types, no subclasses). It never had a GroupNorm rule. Its recurrent-layer
# rules are left out (no edgeseg network has one), and so is nn.Sequential, whose rule counts nothing.
_RULES: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], int]] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm), _norm),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _norm),
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.Dropout, nn.ZeroPad2d, nn.PixelShuffle), _zero),
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), _zero),
    **dict.fromkeys((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _zero),
    **dict.fromkeys((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _output_numel),
    **dict.fromkeys((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _adaptive_avgpool),
    **dict.fromkeys((nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d), _upsample),
    nn.PReLU: _input_numel,
    nn.LeakyReLU: _input_numel,
    nn.Softmax: _softmax,
    nn.Linear: _linear,
}


def _rule_for(m: nn.Module):
    # A custom module can declare the torch type it stands in for (MALUNet's tied Conv1d does).
    return _RULES.get(getattr(m, "thop_type", type(m)))


def _profile(model: nn.Module, input_size: int | tuple[int, int]) -> dict[nn.Module, int]:
    """Run one eval forward pass on a random (1, C, H, W) input; MACs per counted module that ran."""
    macs: dict[nn.Module, int] = {}

    def hook(m, inputs, output, rule):
        macs[m] = macs.get(m, 0) + rule(m, inputs[0], output)

    handles = [m.register_forward_hook(partial(hook, rule=rule)) for m in model.modules() if (rule := _rule_for(m))]
    modes = {m: m.training for m in model.modules()}
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    ref = next(model.parameters(), None)
    x = torch.randn(1, getattr(model, "in_channels", 3), h, w, generator=torch.Generator().manual_seed(0))
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():  # per module: a frozen sub-net may be in eval inside a training net
            m.training = training
    return macs


def count_params(model: nn.Module) -> int:
    """Parameter count as ``parameters()`` reports it in the released code.

    Every module's own parameters, so a weight that two modules share (MALUNet's tied memory units) counts
    once per module, as it did there; for every untied model this equals ``sum(p.numel() for p in
    model.parameters())``.
    """
    return sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))


def count_params_thop(model: nn.Module, input_size: int | tuple[int, int] = 256) -> int:
    """Parameter count as thop 0.1.1 reports it (the seed papers' headline numbers).

    Args:
        model: the network; left unchanged (hooks removed, train/eval flags restored).
        input_size: side (or (H, W)) of the probe input.

    Returns:
        Parameters of the modules of a thop-counted type that ran, each module once.
    """
    return sum(p.numel() for m in _profile(model, input_size) for p in m.parameters())


def count_macs(model: nn.Module, input_size: int | tuple[int, int] = 256) -> int:
    """Multiply-accumulates of one image as thop 0.1.1 counts them (what UltraSeg and MALUNet call FLOPs).

    Args:
        model: the network; left unchanged (hooks removed, train/eval flags restored).
        input_size: side (or (H, W)) of the probe input.

    Returns:
        Summed per-module MACs of a batch-1 forward pass; modules called repeatedly count every call.
    """
    return sum(_profile(model, input_size).values())
