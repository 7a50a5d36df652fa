"""Hand-computed checks of edgeseg.metrics: confusion, Dice, IoU, HD95, MAE and SegMetrics aggregation."""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from edgeseg import metrics as M
from edgeseg.metrics import SegMetrics, confusion, dice, hd95, iou, mae

A = np.array

# 3x3 example used for confusion and the global ratios:
#   pred 1 1 0    gt 1 0 0    tp: (0,0) (1,1) = 2; fp: (0,1) = 1; fn: (1,0) = 1; tn = 9 - 4 = 5
#        0 1 0       1 1 0
#        0 0 0       0 0 0
PRED_3 = A([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=float)
GT_3 = A([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=float)


def test_confusion_3x3():
    assert confusion(PRED_3, GT_3) == (2, 1, 1, 5)


# (pred, gt, dice, iou), each 2x2 (4 pixels)
DICE_IOU_CASES = [
    # tp 1, fp 1, fn 0: dice 2/(2+1) = 2/3, iou 1/2
    (A([[1, 1], [0, 0]]), A([[1, 0], [0, 0]]), 2 / 3, 1 / 2),
    # tp 1, fp 0, fn 3: dice 2/5, iou 1/4
    (A([[1, 0], [0, 0]]), A([[1, 1], [1, 1]]), 2 / 5, 1 / 4),
    # disjoint: tp 0
    (A([[1, 0], [0, 0]]), A([[0, 0], [0, 1]]), 0.0, 0.0),
    # both empty: 1 by convention
    (A([[0, 0], [0, 0]]), A([[0, 0], [0, 0]]), 1.0, 1.0),
    # prediction empty, gt not: 0
    (A([[0, 0], [0, 0]]), A([[0, 1], [0, 0]]), 0.0, 0.0),
    # 3x3 example: dice 4/(4+1+1) = 2/3, iou 2/4
    (PRED_3, GT_3, 2 / 3, 1 / 2),
]


@pytest.mark.parametrize("pred, gt, want_dice, want_iou", DICE_IOU_CASES)
def test_dice_iou_table(pred, gt, want_dice, want_iou):
    assert dice(pred.astype(float), gt) == pytest.approx(want_dice)
    assert iou(pred.astype(float), gt) == pytest.approx(want_iou)


def test_threshold_is_strict_and_dtypes_agree():
    # 0.5 is background for prediction and ground truth alike; anything above is foreground.
    prob = A([[0.5, 0.5000001], [0.0, 1.0]])
    assert confusion(prob, A([[1.0, 1.0], [0.0, 0.0]])) == (1, 1, 1, 1)
    assert confusion(prob, A([[0.5, 0.6], [0.0, 0.0]])) == (1, 1, 0, 2)
    gt = A([[0, 1], [0, 1]])
    want = confusion(prob, gt.astype(float))
    assert confusion(prob, gt.astype(bool)) == want
    assert confusion(prob, gt.astype(np.uint8)) == want
    assert confusion(prob.astype(np.float32), gt.astype(np.float32)) == want


@pytest.mark.parametrize(
    "pred, gt",
    [
        (A([[0.2, 0.9]]), A([[0, 255]], dtype=np.uint8)),  # 0/255 mask
        (A([[-3.0, 2.0]]), A([[0, 1]])),  # logits instead of probabilities
        (A([[0.2, 0.9]]), A([[0, 1, 0]])),  # shape mismatch
        (A([0.2, 0.9]), A([0, 1])),  # not 2-D
    ],
)
def test_bad_inputs_raise(pred, gt):
    for fn in (confusion, dice, iou, hd95, mae):
        with pytest.raises(ValueError):
            fn(pred, gt)


def _img(shape, *pixels):
    m = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        m[r, c] = True
    return m


def _square(shape, r0, c0, side):
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + side, c0 : c0 + side] = True
    return m


def _hd95_cases():
    # Single pixels (0,0) and (3,4): each is its own boundary, distance 5 both ways -> [5, 5] -> 5.
    yield "pixels-3-4-5", _img((5, 5), (3, 4)), _img((5, 5), (0, 0)), 5.0, 5.0

    # 4x4 squares, gt rows 2-5, pred rows 4-7 (cols 2-5 both), offset 2 rows. Boundary = 12 perimeter pixels.
    # pred -> gt: row 4 [0 1 1 0], (5,2) (5,5) 0, (6,2) (6,5) 1, row 7 [2 2 2 2]; gt -> pred by symmetry.
    # Pooled 24 values: 8 zeros, 8 ones, 8 twos; 95th pct at index 0.95*23 = 21.85, sorted[21..22] = 2.
    yield "squares-offset-2", _square((10, 8), 4, 2, 4), _square((10, 8), 2, 2, 4), 2.0, 2.0

    # gt: 5-pixel line at row 2, cols 0-4. pred: the line moved to row 3, plus an outlier pixel at (9,0).
    # Lines are 1 pixel thick, so every pixel is boundary. pred -> gt: five 1s, outlier 7 (to (2,0));
    # gt -> pred: five 1s. Pooled 11 values: ten 1s and one 7. Index 0.95*10 = 9.5 lies halfway between
    # sorted[9] = 1 and sorted[10] = 7 -> 4.0, while the plain Hausdorff distance is 7.
    gt = _img((10, 5), *[(2, c) for c in range(5)])
    pred = _img((10, 5), *[(3, c) for c in range(5)], (9, 0))
    yield "line-outlier-interp", pred, gt, 4.0, 7.0

    # Same with 10-pixel lines: twenty 1s and one 7; index 0.95*20 = 19 -> sorted[19] = 1, max still 7.
    gt = _img((10, 10), *[(2, c) for c in range(10)])
    pred = _img((10, 10), *[(3, c) for c in range(10)], (9, 0))
    yield "line-outlier-exact", pred, gt, 1.0, 7.0

    # Masks touching the image edge: outside counts as background. gt = full 3x3 (boundary = 8 outer
    # pixels); pred = rows 0-1 (all 6 boundary). pred -> gt: (1,1) is gt's centre -> 1, other five 0.
    # gt -> pred: (0,*), (1,0), (1,2) are pred boundary -> 0; row 2 -> 1 each. Pooled 14: ten 0s, four 1s;
    # index 0.95*13 = 12.35, sorted[12] = sorted[13] = 1 -> 1.0.
    yield "image-edge", _square((3, 3), 0, 0, 3) & (np.arange(3)[:, None] < 2), _square((3, 3), 0, 0, 3), 1.0, 1.0

    # Identical masks -> 0.
    yield "identical", _square((6, 6), 1, 1, 3), _square((6, 6), 1, 1, 3), 0.0, 0.0


HD95_CASES = list(_hd95_cases())


@pytest.mark.parametrize("name, pred, gt, want, want_max", HD95_CASES, ids=[c[0] for c in HD95_CASES])
def test_hd95_table(name, pred, gt, want, want_max):
    assert hd95(pred, gt) == pytest.approx(want)
    assert hd95(gt, pred) == pytest.approx(want)  # symmetric
    assert _reference_surface_distances(pred, gt).max() == pytest.approx(want_max)


def test_hd95_empty_cases():
    empty, blob = np.zeros((4, 4)), _square((4, 4), 1, 1, 2).astype(float)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(blob, empty))
    assert math.isnan(hd95(empty, blob))


def _reference_surface_distances(pred, gt):
    # Straight from the definition: boundary = mask minus scipy binary erosion, distances read from
    # full-image Euclidean distance transforms of the other boundary.
    pb = pred & ~ndimage.binary_erosion(pred)
    gb = gt & ~ndimage.binary_erosion(gt)
    return np.concatenate([ndimage.distance_transform_edt(~gb)[pb], ndimage.distance_transform_edt(~pb)[gb]])


def _random_blob(rng, shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
    ry, rx = rng.uniform(3, shape[0] / 2, size=2)
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return blob | (rng.random(shape) < 0.01)  # a few speckles, as a noisy prediction has


def test_hd95_matches_distance_transform_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pred, gt = _random_blob(rng, (48, 64)), _random_blob(rng, (48, 64))
        want = np.percentile(_reference_surface_distances(pred, gt), 95)
        assert hd95(pred, gt) == pytest.approx(want, abs=1e-9)


def test_mae():
    prob = A([[0.9, 0.8], [0.7, 0.6]])
    assert mae(prob, np.ones((2, 2))) == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4)  # 0.25
    assert mae(prob, np.zeros((2, 2))) == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)  # 0.75
    # gt is binarised first: 0.6 counts as 1, 0.4 as 0 -> |0.9-1| + |0.8-0| = 0.9, over 2 pixels
    assert mae(A([[0.9, 0.8]]), A([[0.6, 0.4]])) == pytest.approx(0.45)


def test_segmetrics_per_image_vs_global():
    # Image A: gt and pred all foreground (2x2): tp 4 -> dice 1, iou 1, hd95 0.
    #   prob [[.9 .8] [.7 .6]] -> mae (.1+.2+.3+.4)/4 = 0.25
    # Image B: gt (0,0) only, prob [[.4 0] [0 .6]] -> pred (1,1) only: tp 0, fp 1, fn 1, tn 2 -> dice 0, iou 0;
    #   hd95 = distance (0,0)-(1,1) = sqrt 2; mae (|.4-1| + 0 + 0 + |.6-0|)/4 = 1.2/4 = 0.3
    m = SegMetrics()
    m.update(A([[0.9, 0.8], [0.7, 0.6]]), np.ones((2, 2)), name="a")
    m.update(A([[0.4, 0.0], [0.0, 0.6]]), A([[1, 0], [0, 0]]), name="b")
    got = m.compute()
    # global matrix: tp 4, fp 1, fn 1, tn 2 (N = 8)
    want = {
        "mdice": (1 + 0) / 2,
        "miou": (1 + 0) / 2,
        "dice_global": 2 * 4 / (2 * 4 + 1 + 1),  # 0.8, differs from mdice 0.5
        "acc": (4 + 2) / 8,
        "spe": 2 / (2 + 1),
        "sen": 4 / (4 + 1),
        "hd95": (0 + math.sqrt(2)) / 2,
        "hd95_undefined": 0,
        "mae": (0.25 + 0.3) / 2,
        "n_images": 2,
    }
    assert set(got) == set(want)
    assert got == pytest.approx(want)
    rows = m.per_image()
    assert [r["name"] for r in rows] == ["a", "b"]
    assert [r["dice"] for r in rows] == pytest.approx([1.0, 0.0])
    assert [r["iou"] for r in rows] == pytest.approx([1.0, 0.0])
    assert [r["hd95"] for r in rows] == pytest.approx([0.0, math.sqrt(2)])


def test_segmetrics_ratios_from_3x3():
    m = SegMetrics()
    m.update(PRED_3, GT_3)
    got = m.compute()
    # tp 2, fp 1, fn 1, tn 5
    assert [got[k] for k in ("acc", "spe", "sen", "dice_global")] == pytest.approx([7 / 9, 5 / 6, 2 / 3, 2 / 3])
    assert m.per_image()[0]["name"] == "0"  # default name: running index


def test_segmetrics_undefined_hd95_and_empty_set():
    m = SegMetrics()
    m.update(_square((6, 6), 0, 0, 2).astype(float), _square((6, 6), 0, 0, 2))  # hd95 0
    m.update(_square((6, 6), 0, 0, 2).astype(float), np.zeros((6, 6)))  # gt empty -> nan, left out
    m.update(_img((6, 6), (3, 4)).astype(float), _img((6, 6), (0, 0)))  # 5
    got = m.compute()
    assert got["hd95"] == pytest.approx((0 + 5) / 2)
    assert got["hd95_undefined"] == 1
    assert got["n_images"] == 3

    empty = SegMetrics()
    empty.update(np.zeros((2, 2)), np.zeros((2, 2)))
    got = empty.compute()
    # no foreground anywhere: dice conventions give 1, sensitivity is undefined
    assert (got["mdice"], got["miou"], got["dice_global"], got["acc"], got["spe"]) == (1, 1, 1, 1, 1)
    assert math.isnan(got["sen"])
    with pytest.raises(ValueError):
        SegMetrics().compute()


def test_segmetrics_is_cheap():
    # 200 polyp-sized 256x256 images: about 1 ms each here; the bound leaves room for a loaded machine.
    rng = np.random.default_rng(1)
    gts = [_random_blob(rng, (256, 256)) for _ in range(4)]
    probs = [np.clip(ndimage.shift(g.astype(np.float32), (3, -2), order=0), 0, 1) for g in gts]
    m = SegMetrics()
    start = time.perf_counter()
    for i in range(200):
        m.update(probs[i % 4], gts[i % 4])
    assert time.perf_counter() - start < 3.0
    assert m.compute()["n_images"] == 200


def test_metrics_module_does_not_import_torch():
    # Loaded on its own file in a fresh interpreter, so the check is about metrics.py, not the package.
    path = Path(M.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(path)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
