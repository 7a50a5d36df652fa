"""Model registry: one builder function per model name.

Every model follows the same output contract (see :class:`SegModel`): ``forward(x)`` returns foreground
logits ``(B, 1, H, W)`` in eval mode, and the full :meth:`SegModel.forward_all` dict in training mode so that
deep supervision and distillation see the side outputs.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import nn

from edgeseg.errors import EdgesegError

__all__ = ["SegModel", "register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., "SegModel"]] = {}


class SegModel(nn.Module):
    """Base class of every edgeseg network.

    Subclasses implement :meth:`forward_all`, returning a dict with
      ``logits``    (B, 1, H, W) foreground logits at input resolution (one sigmoid gives the probability)
      ``region``    list of deep-supervision region logits (B, 1, h, w), coarsest first (may be empty)
      ``boundary``  list of boundary logits (B, 1, h, w), coarsest first (may be empty)
      ``features``  list of the encoder skip features, finest first (for feature distillation)
      ``embedding`` the decoder's last feature map (B, C, H/2, W/2) or similar (for contrastive distillation)
    Side outputs are at the resolution of the layer that produced them; losses resize them.
    """

    # Input contract defaults; the checkpoint records them.
    input_size: int = 256
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # Deep-supervision weights (region coarse->fine, boundary coarse->fine), empty when the model has none.
    region_weights: tuple[float, ...] = ()
    boundary_weights: tuple[float, ...] = ()

    def forward_all(self, x: torch.Tensor) -> dict:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        out = self.forward_all(x)
        return out if self.training else out["logits"]


def register_model(fn: Callable[..., SegModel]) -> Callable[..., SegModel]:
    """Decorator: register ``fn`` under its name with underscores turned into dashes."""
    name = fn.__name__.replace("_", "-")
    if name in _MODELS:
        raise RuntimeError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    fn.model_name = name
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> SegModel:
    """Build a registered model; ``None`` overrides are dropped so CLI defaults keep model defaults."""
    if name not in _MODELS:
        near = difflib.get_close_matches(name, _MODELS, n=1, cutoff=0.4)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise EdgesegError(f"unknown model {name!r}.{hint} Known: {', '.join(list_models())}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    model = _MODELS[name](**kwargs)
    model.model_name = name
    model.build_kwargs = kwargs  # recorded in checkpoints so the same graph can be rebuilt
    return model
