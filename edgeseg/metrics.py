"""Binary segmentation metrics: per-image Dice, IoU, HD95, MAE and the :class:`SegMetrics` accumulator.

numpy and scipy only (no torch), so the same code scores predictions on a workstation and on an edge device.
The conventions below are the ones edgeseg reports and hold for every function here.

Conventions:
  * Inputs are single images, 2-D ``(H, W)`` arrays of equal shape.
  * Prediction: a pixel is foreground where ``prob > 0.5`` (strict; equivalently ``logit > 0``).
    Ground truth: foreground where ``mask > 0.5``. Bool arrays are used as they are.
  * Non-bool inputs must lie in [0, 1] (probabilities, {0, 1} masks, soft resized masks). Anything outside
    raises ``ValueError`` rather than being binarised silently: divide 0/255 masks by 255 (or binarise them
    at 127 first, which is what the data code does for JPEG masks) and apply the sigmoid to logits.
  * Empty cases: Dice and IoU are 1.0 when prediction and ground truth are both empty; HD95 is 0.0 when both
    are empty and ``nan`` when exactly one is (``SegMetrics`` leaves those out of the mean and counts them).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["THRESHOLD", "confusion", "dice", "iou", "hd95", "mae", "SegMetrics"]

THRESHOLD = 0.5  # foreground = value > THRESHOLD, for predictions and ground truth alike


def _binarise(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (H, W) array, got shape {x.shape}")
    if x.dtype == np.bool_:
        return x
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{what}: values must lie in [0, 1] (got [{x.min()}, {x.max()}]); "
            "divide 0/255 masks by 255 and apply the sigmoid to logits first"
        )
    return x > THRESHOLD


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binarise(pred, "pred"), _binarise(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    return p, g


def _confusion_bool(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return tp, fp, fn, p.size - tp - fp - fn


def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel confusion counts of one image.

    Args:
        pred: (H, W) probabilities in [0, 1] or bool; foreground where > 0.5.
        gt: (H, W) mask in [0, 1] or bool; foreground where > 0.5.

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints.
    """
    return _confusion_bool(*_pair(pred, gt))


def _dice_counts(tp: int, fp: int, fn: int) -> float:
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2 * tp / den


def _iou_counts(tp: int, fp: int, fn: int) -> float:
    den = tp + fp + fn
    return 1.0 if den == 0 else tp / den


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2 TP / (2 TP + FP + FN) of one image; 1.0 when both are empty. Inputs as in :func:`confusion`."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _dice_counts(tp, fp, fn)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU = TP / (TP + FP + FN) of one image; 1.0 when both are empty. Inputs as in :func:`confusion`."""
    tp, fp, fn, _ = confusion(pred, gt)
    return _iou_counts(tp, fp, fn)


def _boundary(m: np.ndarray) -> np.ndarray:
    # m minus its binary erosion by the 4-neighbour cross, with background outside the array (what
    # scipy.ndimage.binary_erosion does by default; slicing is ~15x faster): a foreground pixel is boundary
    # when one of its 4 neighbours is background or off the image. A 1-pixel-thick structure is all boundary.
    inner = np.zeros_like(m)
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner


def _hd95_bool(p: np.ndarray, g: np.ndarray) -> float:
    has_p, has_g = p.any(), g.any()
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return math.nan
    # Crop to the bounding box of both masks plus a 1-pixel margin; the margin is background, so the
    # boundaries inside the crop are those of the full image, and the distances do not depend on the offset.
    both = p | g
    rows, cols = np.flatnonzero(both.any(1)), np.flatnonzero(both.any(0))
    crop = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    pts_p, pts_g = np.argwhere(_boundary(p[crop])), np.argwhere(_boundary(g[crop]))
    # Nearest-neighbour queries between the two boundary point sets give the same exact Euclidean distances
    # as sampling distance_transform_edt(~boundary) at the other boundary (a test checks this) but touch only
    # boundary pixels: ~4x faster on a 256x256 polyp than two full-image distance transforms.
    to_g = cKDTree(pts_g).query(pts_p)[0]  # each pred boundary pixel -> nearest gt boundary pixel
    to_p = cKDTree(pts_p).query(pts_g)[0]  # each gt boundary pixel -> nearest pred boundary pixel
    return float(np.percentile(np.concatenate([to_g, to_p]), 95))


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile symmetric surface distance of one image, in pixels.

    The boundary of a mask is the mask minus its binary erosion (4-neighbour cross; outside the image counts
    as background). The distances from every pred boundary pixel to the nearest gt boundary pixel and from
    every gt boundary pixel to the nearest pred boundary pixel (Euclidean, unit pixel spacing) are pooled
    into one sample, and its 95th percentile is returned, as ``np.percentile`` computes it (linear
    interpolation between order statistics). This is not the maximum (plain Hausdorff distance).

    Args:
        pred: (H, W) probabilities in [0, 1] or bool; foreground where > 0.5.
        gt: (H, W) mask in [0, 1] or bool; foreground where > 0.5.

    Returns:
        The distance; 0.0 when both masks are empty, ``nan`` when exactly one is.
    """
    return _hd95_bool(*_pair(pred, gt))


def mae(prob: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between a probability map and the binarised ground truth (gt > 0.5).

    Args:
        prob: (H, W) probabilities in [0, 1] (bool is taken as 0/1).
        gt: (H, W) mask in [0, 1] or bool.
    """
    _, g = _pair(prob, gt)  # shape and range checks
    return _mae(np.asarray(prob), g)


def _mae(prob: np.ndarray, g: np.ndarray) -> float:
    if prob.dtype == np.bool_ or prob.dtype.kind in "iu":
        prob = prob.astype(np.float32)
    return float(np.abs(prob - g).mean(dtype=np.float64))


class SegMetrics:
    """Accumulates the metrics of an evaluation set, one image at a time.

    :meth:`compute` reports:
      ``mdice``, ``miou``      mean over images of the per-image Dice / IoU (the headline numbers)
      ``dice_global``          2 TP / (2 TP + FP + FN) of one confusion matrix over all pixels of all images
      ``acc``, ``spe``, ``sen``  (TP + TN) / N, TN / (TN + FP), TP / (TP + FN) of the same global matrix
      ``hd95``                 mean of the finite per-image HD95 values (``nan`` if there are none)
      ``hd95_undefined``       number of images whose HD95 is undefined (exactly one of pred/gt empty)
      ``mae``                  mean over images of the per-image MAE
      ``n_images``             number of images
    A global ratio whose denominator is zero is ``nan`` (e.g. ``sen`` without any foreground), except
    ``dice_global``, which is 1.0 when both prediction and ground truth are empty everywhere.

    Example:
        >>> m = SegMetrics()
        >>> for name, prob, gt in results:   # prob (H, W) in [0, 1], gt (H, W) {0, 1}
        ...     m.update(prob, gt, name)
        >>> m.compute()["mdice"]; sorted(m.per_image(), key=lambda r: r["dice"])[:5]   # worst five
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict] = []
        self._tp = self._fp = self._fn = self._tn = 0

    def update(self, prob: np.ndarray, gt: np.ndarray, name: str | None = None) -> dict:
        """Adds one image and returns its row (see :meth:`per_image`).

        Args:
            prob: (H, W) foreground probabilities in [0, 1].
            gt: (H, W) ground-truth mask in [0, 1] or bool.
            name: identifier kept in :meth:`per_image`; defaults to the running index as a string.
        """
        p, g = _pair(prob, gt)
        tp, fp, fn, tn = _confusion_bool(p, g)
        self._tp += tp
        self._fp += fp
        self._fn += fn
        self._tn += tn
        row = {
            "name": str(len(self._rows)) if name is None else name,
            "dice": _dice_counts(tp, fp, fn),
            "iou": _iou_counts(tp, fp, fn),
            "hd95": _hd95_bool(p, g),
            "mae": _mae(np.asarray(prob), g),
        }
        self._rows.append(row)
        return row

    def per_image(self) -> list[dict]:
        """One dict per image in update order: ``name``, ``dice``, ``iou``, ``hd95`` (may be nan), ``mae``."""
        return [dict(r) for r in self._rows]

    def compute(self) -> dict:
        """The dataset metrics described in the class docstring.

        Raises:
            ValueError: if no image has been added.
        """
        if not self._rows:
            raise ValueError("SegMetrics.compute() called before any update()")
        tp, fp, fn, tn = self._tp, self._fp, self._fn, self._tn
        hd = np.array([r["hd95"] for r in self._rows])
        finite = np.isfinite(hd)
        return {
            "mdice": float(np.mean([r["dice"] for r in self._rows])),
            "miou": float(np.mean([r["iou"] for r in self._rows])),
            "dice_global": _dice_counts(tp, fp, fn),
            "acc": _ratio(tp + tn, tp + fp + fn + tn),
            "spe": _ratio(tn, tn + fp),
            "sen": _ratio(tp, tp + fn),
            "hd95": float(hd[finite].mean()) if finite.any() else math.nan,
            "hd95_undefined": int((~finite).sum()),
            "mae": float(np.mean([r["mae"] for r in self._rows])),
            "n_images": len(self._rows),
        }


def _ratio(num: int, den: int) -> float:
    return math.nan if den == 0 else num / den
