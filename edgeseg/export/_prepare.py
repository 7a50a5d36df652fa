"""Prepare a trained model for inference export, the same way for every backend.

``prepare_for_inference`` returns a copy in eval mode with
  * BatchNorm folded into the adjacent conv: a conv followed by BN (``Sequential`` pairs, MicroAUNet's
    DWDConv), and UltraSeg's ``Down`` (BN *then* a 2x2 stride-2 conv without padding: every output pixel
    sees only real inputs, so folding the BN into the following conv is exact);
  * UltraSeg's GSB gates, which do not depend on the input, computed once at the fixed input size and
    stored as constant buffers;
  * a forward that returns only the logits ``(B, 1, S, S)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgeseg.models.microaunet import DWDConv
from edgeseg.models.ultraseg import GSB, Down

# Modules that apply BN right after a conv inside forward(): (conv attribute, bn attribute).
_CONV_BN_ATTRS = {DWDConv: (("dw", "bn_dw"), ("pw", "bn_pw"))}


class LogitsOnly(nn.Module):
    """The export graph: (B, 3, S, S) float32 -> (B, 1, S, S) logits, no side outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_all(x)["logits"] if hasattr(self.model, "forward_all") else self.model(x)


class FoldedGSB(nn.Module):
    """GSB with its four gates precomputed for one feature size (buffers, exported as constants)."""

    def __init__(self, gsb: GSB, size: tuple[int, int]):
        super().__init__()
        self.norm1, self.norm2, self.ldw = gsb.norm1, gsb.norm2, gsb.ldw
        with torch.no_grad():
            for j, g in enumerate(gsb.gates(size), 1):
                self.register_buffer(f"gate{j}", g.detach().clone())

    def forward(self, x):
        x1, x2, x3, x4 = torch.chunk(self.norm1(x), 4, dim=1)
        x = torch.cat([x2 * self.gate2, x4 * self.gate4, x1 * self.gate1, x3 * self.gate3], dim=1)
        return self.ldw(self.norm2(x))


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    # BN(x) = a * x + s per channel
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    return a, beta - bn.running_mean * a


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)


@torch.no_grad()
def fold_bn_into_preceding_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv -> bn becomes one conv: W' = a W (per output channel), b' = a b + s."""
    a, s = _bn_scale_shift(bn)
    bias = _conv_bias(conv)
    conv.weight.mul_(a.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias * a + s)


@torch.no_grad()
def fold_bn_into_following_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """bn -> conv becomes one conv: W' = W a (per input channel), b' = b + sum(W s). Exact only without
    padding (a zero pad would otherwise turn into s after the fold); callers check that."""
    a, s = _bn_scale_shift(bn)
    bias = _conv_bias(conv)
    w = conv.weight
    conv.bias = nn.Parameter(bias + (w * s.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
    w.mul_(a.reshape(1, -1, 1, 1))


def _is_unpadded_dense(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and all(p == 0 for p in conv.padding) and conv.padding_mode == "zeros"


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BN that has an adjacent conv we know about, in place; returns how many were folded."""
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, Down) and isinstance(module.bn, nn.BatchNorm2d) and _is_unpadded_dense(module.conv):
            fold_bn_into_following_conv(module.bn, module.conv)
            module.bn = nn.Identity()
            folded += 1
        for conv_name, bn_name in _CONV_BN_ATTRS.get(type(module), ()):
            if isinstance(getattr(module, bn_name), nn.BatchNorm2d):
                fold_bn_into_preceding_conv(getattr(module, conv_name), getattr(module, bn_name))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    fold_bn_into_preceding_conv(conv, bn)
                    module._modules[second] = nn.Identity()
                    folded += 1
    return folded


@torch.no_grad()
def fold_gsb_gates(model: nn.Module, size: int) -> int:
    """Replace every GSB by a FoldedGSB whose gates are fixed for an input of ``size`` x ``size``."""
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module, args):
        sizes[module] = tuple(args[0].shape[2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, GSB)]
    try:
        model(torch.zeros(1, 3, size, size, dtype=next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    folded = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, GSB):
                parent._modules[name] = FoldedGSB(child, sizes[child])
                folded += 1
    return folded


def prepare_for_inference(model: nn.Module, size: int) -> tuple[nn.Module, dict]:
    """A folded, logits-only copy of ``model`` for a fixed ``size``; the original is not touched.

    Returns:
        (module, report) where report holds ``bn_folded``, ``gates_folded`` and ``max_abs_diff``, the
        largest |logit| difference to the unfolded model on a fixed random batch (a check, not a bound).
    """
    prepared = copy.deepcopy(model).eval()
    n_bn = fold_batchnorm(prepared)
    n_gates = fold_gsb_gates(prepared, size)
    wrapped = LogitsOnly(prepared).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(_probe_input(size)).to(next(model.parameters()).dtype)
    with torch.inference_mode():
        diff = float((LogitsOnly(model.eval())(x) - wrapped(x)).abs().max())
    return wrapped, {"bn_folded": n_bn, "gates_folded": n_gates, "max_abs_diff": diff}


def _probe_input(size: int, batch: int = 2):
    import numpy as np

    return np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
