"""Inference forms: :func:`fuse_model` swaps every block for the form it defines for inference, and the
BatchNorm folds those forms are built from.

A block with a training-only or export-hostile form has a ``fuse()`` method returning a module that computes
the same function in eval mode (it may reuse the block's submodules); a block whose inference form depends on
the spatial size of its input (a gate that is a constant at one size) has ``fuse(size)`` instead.
:func:`fuse_model` calls them children first, so a block's ``fuse`` sees its children already fused, and
folds every conv -> BatchNorm pair inside an ``nn.Sequential``. The same maths, rounded differently: fused and
eager models agree to ~1e-13 in float64.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

__all__ = ["fuse_model", "fold_bn_into_preceding_conv", "fold_bn_into_following_conv"]


@torch.no_grad()
def fuse_model(model: nn.Module, size: int) -> nn.Module:
    """Fuse ``model`` in place for a ``size`` x ``size`` input, in eval mode, and return it. The blocks that
    take ``fuse(size)`` get their input's (H, W), recorded in one forward pass of zeros."""
    model.eval()
    _fuse_children(model, _input_sizes(model, size))
    return model


def _fusable(m: nn.Module) -> bool:
    return callable(getattr(m, "fuse", None))


def _takes_size(m: nn.Module) -> bool:
    return "size" in inspect.signature(m.fuse).parameters


def _input_sizes(model: nn.Module, size: int) -> dict[nn.Module, tuple[int, int]]:
    blocks = [m for m in model.modules() if _fusable(m) and _takes_size(m)]
    if not blocks:
        return {}
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[2:])))
             for m in blocks]
    try:
        p = next(model.parameters())
        model(torch.zeros(1, 3, size, size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _fuse_children(module: nn.Module, sizes: dict) -> None:
    for name, child in list(module.named_children()):
        _fuse_children(child, sizes)
        if not _fusable(child):
            continue
        if not _takes_size(child):
            setattr(module, name, child.fuse())
        elif child in sizes:
            setattr(module, name, child.fuse(sizes[child]))
        else:
            raise ValueError(f"{name} ({type(child).__name__}) did not run in the forward pass, so its input "
                             "size is unknown and it cannot be fused")
    if isinstance(module, nn.Sequential):
        keys = list(module._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fold_bn_into_preceding_conv(conv, bn)
                module._modules[b] = nn.Identity()


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(x) = a * x + s per channel, with the running statistics."""
    std = torch.sqrt(bn.running_var + bn.eps)
    a = bn.weight / std if bn.affine else 1.0 / std
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    return a, beta - bn.running_mean * a


def _conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight
    return conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)


@torch.no_grad()
def fold_bn_into_preceding_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv -> bn as one new conv: W' = a W (per output channel), b' = a b + s. The inputs are not changed."""
    a, s = _bn_scale_shift(bn)
    out = copy.deepcopy(conv)
    out.weight.mul_(a.reshape(-1, 1, 1, 1))
    out.bias = nn.Parameter(_conv_bias(conv) * a + s)
    return out


@torch.no_grad()
def fold_bn_into_following_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """bn -> conv as one new conv: W' = W a (per input channel), b' = b + sum(W s). Exact only for an
    unpadded, ungrouped conv (a zero pad would become s after the fold): anything else is refused."""
    if conv.groups != 1 or any(p != 0 for p in conv.padding):
        raise ValueError("BatchNorm before a padded or grouped conv cannot be folded into it exactly")
    a, s = _bn_scale_shift(bn)
    out = copy.deepcopy(conv)
    out.bias = nn.Parameter(_conv_bias(conv) + (conv.weight * s.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
    out.weight.mul_(a.reshape(1, -1, 1, 1))
    return out
