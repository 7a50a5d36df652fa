"""Prepare a trained model for inference export, the same way for every backend.

:func:`prepare` returns a copy that is

  * fused for a fixed input size (:func:`edgeseg.models.fuse.fuse_model`): every block replaced by the
    inference form it defines, BatchNorm folded into the adjacent conv;
  * optionally rewritten further by a backend's own model-agnostic ``rewrite`` (TFLite:
    :mod:`edgeseg.export._tflite_rewrites`);
  * wrapped to return only the logits ``(B, 1, S, S)``, in eval mode, without gradients;

and checks that it is the same function as the model: in float64 the logits must agree to rounding
(:data:`edgeseg.tolerances.FLOAT64_RTOL`), and the difference in the model's own dtype is reported.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeseg.models.fuse import fuse_model
from edgeseg.tolerances import FLOAT64_RTOL



class LogitsOnly(nn.Module):
    """The export graph: (B, 3, S, S) float32 -> (B, 1, S, S) logits, no side outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_all(x)["logits"] if hasattr(self.model, "forward_all") else self.model(x)


def prepare(model: nn.Module, size: int, *, rewrite: Callable[[nn.Module], nn.Module] | None = None,
            probe: np.ndarray | torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """A fused, logits-only copy of ``model`` for a ``size`` x ``size`` input; ``model`` is not touched.

    Args:
        rewrite: applied to the fused model (before the logits-only wrapper); must keep its maths.
        probe: (N, 3, S, S) frames for the equivalence check (default: two random frames).

    Returns:
        (module, report): ``bn_folded`` (BatchNorm layers folded away), ``blocks_fused`` ({block class:
        count}), ``max_abs_diff_fp64`` and ``max_abs_diff`` (largest |logit| difference to the model on
        ``probe``, in float64 and in the model's dtype).

    Raises:
        RuntimeError: the float64 difference exceeds rounding (``FLOAT64_RTOL`` of the largest logit).
    """
    dtype = next(model.parameters()).dtype
    x = torch.as_tensor(np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
                        if probe is None else probe)
    diffs = {}
    for dt in dict.fromkeys((torch.float64, dtype)):  # float64 first; once when the model is float64
        eager = copy.deepcopy(model).eval().to(dt)
        with torch.no_grad():
            ref = LogitsOnly(eager)(x.to(dt))
            fused = fuse_model(eager, size)
            prepared = LogitsOnly(rewrite(fused) if rewrite else fused).eval()
            diffs[dt] = float((prepared(x.to(dt)) - ref).abs().max())
        if dt == torch.float64 and not diffs[dt] <= FLOAT64_RTOL * max(1.0, float(ref.abs().max())):
            raise RuntimeError(f"the prepared model is not equivalent to the model (float64 max abs diff "
                               f"{diffs[dt]:.3g}, max |logit| {float(ref.abs().max()):.3g})")
    for p in prepared.parameters():
        p.requires_grad_(False)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return prepared, {
        "bn_folded": n_bn - sum(isinstance(m, nn.BatchNorm2d) for m in prepared.modules()),
        "blocks_fused": dict(Counter(type(m).__name__ for m in model.modules() if callable(getattr(m, "fuse", None)))),
        "max_abs_diff_fp64": diffs[torch.float64],
        "max_abs_diff": diffs[dtype],
    }
