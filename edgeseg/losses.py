"""Segmentation losses on logits: soft Dice, BCE + Dice, UltraSeg-style deep supervision, and :class:`SegLoss`.

Every function takes raw logits and applies the one sigmoid itself. (The released UltraSeg loss applies a
sigmoid to heads that already emit probabilities, a double sigmoid; we do not copy it.)
Losses are computed in float32 with autocast disabled, so they are safe inside bf16/fp16 autocast regions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ULTRASEG_REGION_WEIGHTS",
    "ULTRASEG_BOUNDARY_WEIGHTS",
    "soft_dice_loss",
    "bce_dice_loss",
    "deep_supervision_loss",
    "SegLoss",
]

# UltraSeg deep-supervision weights, coarsest side output first (the UltraSeg paper).
ULTRASEG_REGION_WEIGHTS = (0.1, 0.2, 0.3, 0.4)
ULTRASEG_BOUNDARY_WEIGHTS = (0.1, 0.2, 0.3)


def _fp32(device: torch.device):
    # Under autocast, ops on float32 inputs may still run in bf16/fp16; switch it off for the loss maths.
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}")
    if logits.dim() < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(logits.shape)}")
    return logits.float(), target.float()


def _soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)  # (B, C*H*W)
    g = target.flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)  # (B,)
    return 1 - dice.mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss: ``1 - mean_b (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``, p = sigmoid(logits).

    Sums run over all pixels of one sample; the ratio is averaged over the batch.

    Shapes: logits (B, 1, H, W) float (any dtype), target (B, 1, H, W) float in [0, 1]; returns a float32 scalar.

    Raises:
        ValueError: if the shapes differ.
    """
    logits, target = _check(logits, target)
    with _fp32(logits.device):
        return _soft_dice(logits, target, smooth)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, wb: float = 1.0, wd: float = 1.0
) -> torch.Tensor:
    """``wb * BCEWithLogits(logits, target) + wd * soft_dice_loss(logits, target)``, BCE averaged over pixels.

    Shapes: logits (B, 1, H, W) float (any dtype), target (B, 1, H, W) float in [0, 1]; returns a float32 scalar.

    Raises:
        ValueError: if the shapes differ.
    """
    logits, target = _check(logits, target)
    with _fp32(logits.device):
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return wb * bce + wd * _soft_dice(logits, target, 1.0)


def _side_terms(
    side: Sequence[torch.Tensor], target: torch.Tensor | None, weights: Sequence[float], kind: str
) -> torch.Tensor | None:
    if len(side) != len(weights):
        raise ValueError(f"{len(side)} {kind} side outputs but {len(weights)} {kind} weights")
    if not weights:
        return None
    if target is None:
        raise ValueError(f"{kind} weights given but no {kind} target map")
    target = target.float()
    total = None
    for w, z in zip(weights, side):
        z = z.float()
        with _fp32(z.device):
            if z.shape[-2:] != target.shape[-2:]:
                # Resized as logits, so the one sigmoid comes after the interpolation.
                z = F.interpolate(z, size=target.shape[-2:], mode="bilinear", align_corners=False)
            z, t = _check(z, target)
            term = w * (0.5 * F.binary_cross_entropy_with_logits(z, t) + _soft_dice(z, t, 1.0))
        total = term if total is None else total + term
    return total


def deep_supervision_loss(
    out: Mapping[str, object] | torch.Tensor,
    mask: torch.Tensor,
    boundary: torch.Tensor | None = None,
    region_weights: Sequence[float] = (),
    boundary_weights: Sequence[float] = (),
) -> dict[str, torch.Tensor]:
    """Main BCE + Dice plus weighted region and boundary deep-supervision terms (UltraSeg, one sigmoid).

    ``loss = bce_dice(logits, mask) + sum_i region_weights[i] * R(region[i], mask)
    + sum_j boundary_weights[j] * R(boundary[j], boundary_map)``, where
    ``R(z, t) = 0.5 * BCEWithLogits(up(z), t) + soft_dice_loss(up(z), t)`` and ``up`` resizes the side logits
    bilinearly (align_corners=False) to the target's size. Side outputs and weights are both ordered
    coarsest first, so ``ULTRASEG_REGION_WEIGHTS`` gives the coarsest head 0.1 and the finest 0.4.

    Args:
        out: a model's training-mode dict with ``logits`` and optionally ``region`` and ``boundary`` (lists
            of side logits, coarsest first; other keys are ignored), or a bare logits tensor.
        mask: ground-truth mask.
        boundary: boundary label map (e.g. dilated Canny edges of the mask); needed only when
            ``boundary_weights`` is non-empty.
        region_weights: one weight per region side output.
        boundary_weights: one weight per boundary side output.

    Returns:
        ``{"loss", "main", "region", "boundary"}``: ``loss`` is the float32 scalar to backpropagate; the
        other three are detached float32 scalars for logging (0 when there are no such side outputs).

    Shapes: logits (B, 1, H, W), side outputs (B, 1, h, w), mask and boundary (B, 1, H, W) float in [0, 1].

    Raises:
        ValueError: if the number of side outputs differs from the number of weights, if boundary weights
            are given without a boundary map, or if ``logits`` and ``mask`` differ in shape.
    """
    if isinstance(out, torch.Tensor):
        out = {"logits": out}
    main = bce_dice_loss(out["logits"], mask)
    region = _side_terms(out.get("region") or [], mask, region_weights, "region")
    edge = _side_terms(out.get("boundary") or [], boundary, boundary_weights, "boundary")
    total = main
    for term in (region, edge):
        if term is not None:
            total = total + term
    zero = main.new_zeros(())
    return {
        "loss": total,
        "main": main.detach(),
        "region": zero if region is None else region.detach(),
        "boundary": zero if edge is None else edge.detach(),
    }


class SegLoss(nn.Module):
    """Module wrapper of :func:`deep_supervision_loss` holding the side-output weights.

    With the default empty weights it is plain BCE + Dice on the main logits, for models without side
    outputs (their dict must then have empty or missing ``region``/``boundary`` lists).

    Example:
        >>> crit = SegLoss(ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)
        >>> crit(model.forward_all(x), mask, edges)["loss"].backward()
    """

    def __init__(self, region_weights: Sequence[float] = (), boundary_weights: Sequence[float] = ()) -> None:
        super().__init__()
        self.region_weights = tuple(float(w) for w in region_weights)
        self.boundary_weights = tuple(float(w) for w in boundary_weights)

    def forward(
        self,
        out: Mapping[str, object] | torch.Tensor,
        mask: torch.Tensor,
        boundary: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """See :func:`deep_supervision_loss`."""
        return deep_supervision_loss(out, mask, boundary, self.region_weights, self.boundary_weights)

    def extra_repr(self) -> str:
        return f"region_weights={self.region_weights}, boundary_weights={self.boundary_weights}"
