"""Prediction on real frames: an image folder and a video built at run time from consecutive CVC-ClinicDB
frames (a real colonoscopy sequence)."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from edgeseg.checkpoint import load_model
from edgeseg.errors import EdgesegError
from edgeseg.evaluate import torch_logits_fn
from edgeseg.predict import predict_path


@pytest.fixture(scope="module")
def authors(authors_ckpt):
    model, contract, _ = load_model(authors_ckpt)
    return torch_logits_fn(model), contract


@pytest.fixture(scope="module")
def clip(tmp_path_factory, data_root):
    """CVC-ClinicDB frames 1..12 (one sequence) as an mp4."""
    path = tmp_path_factory.mktemp("video") / "cvc.mp4"
    frames = [cv2.imread(str(data_root / "cvc-clinicdb" / "images" / f"{i}.jpg")) for i in range(1, 13)]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def test_video_in_video_out(authors, clip, tmp_path):
    summary = predict_path(*authors, clip, tmp_path / "pred")
    assert summary["frames"] == 12 and summary["kind"] == "video"
    for name in ("cvc_overlay.mp4", "cvc_mask.mp4"):
        cap = cv2.VideoCapture(str(tmp_path / "pred" / name))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
        ok, frame = cap.read()
        assert ok and frame.shape == (288, 384, 3)
    rows = list(csv.DictReader(open(tmp_path / "pred" / "latency.csv")))
    assert len(rows) == 12 and all(float(r["infer_ms"]) > 0 for r in rows)
    assert all(abs(sum(float(r[k]) for k in ("decode_ms", "preprocess_ms", "infer_ms", "post_ms"))
                   - float(r["total_ms"])) < 0.05 for r in rows)
    assert not list((tmp_path / "pred").glob(".*"))  # no temp files left behind
    masks = sorted((tmp_path / "pred" / "masks").iterdir())  # lossless per-frame masks beside the lossy mp4
    assert [m.name for m in masks] == [f"frame_{i:06d}.png" for i in range(12)]
    first = cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE)
    assert first.shape == (288, 384) and set(np.unique(first)) <= {0, 255} and first.any()
    assert [r["name"] for r in rows][:2] == ["frame_000000", "frame_000001"]


def test_image_folder_masks_match_the_model(authors, data_root, tmp_path):
    src = data_root / "kvasir-seg" / "images"
    one = sorted(src.iterdir())[0]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / one.name).write_bytes(one.read_bytes())
    predict_path(*authors, folder, tmp_path / "pred")
    mask = cv2.imread(str(tmp_path / "pred" / "masks" / f"{one.stem}.png"), cv2.IMREAD_GRAYSCALE)
    gt = cv2.imread(str(data_root / "kvasir-seg" / "masks" / f"{one.stem}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == gt.shape and set(np.unique(mask)) <= {0, 255}
    inter = np.logical_and(mask > 0, gt > 0).sum()
    assert 2 * inter / ((mask > 0).sum() + (gt > 0).sum()) > 0.5  # a trained model finds this polyp
    assert (tmp_path / "pred" / "overlays" / f"{one.stem}.png").is_file()


def test_unreadable_video_and_missing_input(authors, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(EdgesegError, match="broken.mp4"):
        predict_path(*authors, bad, tmp_path / "out")
    with pytest.raises(EdgesegError, match="does not exist"):
        predict_path(*authors, tmp_path / "nope.jpg", tmp_path / "out")


def test_output_names_never_clash(tmp_path):
    from edgeseg.predict import output_names

    names = [tmp_path / n for n in ("a.jpg", "frame.jpg", "frame.PNG", "b.png")]
    assert output_names(names) == ["a", "frame.jpg", "frame.PNG", "b"]
    assert output_names([tmp_path / "A.png", tmp_path / "a.jpg"]) == ["A.png", "a.jpg"]  # case-insensitive file systems
    with pytest.raises(EdgesegError, match="same output frame.jpg.png"):
        output_names([tmp_path / n for n in ("frame.jpg", "frame.png", "frame.jpg.png")])


def test_threshold_moves_the_mask_and_is_range_checked(authors, data_root, tmp_path):
    src = sorted((data_root / "kvasir-seg" / "images").iterdir())[0]
    areas = {}
    for t in (0.1, 0.5, 0.9):
        summary = predict_path(*authors, src, tmp_path / str(t), threshold=t, progress=True)
        assert summary["threshold"] == t
        areas[t] = (cv2.imread(str(tmp_path / str(t) / "masks" / f"{src.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0)
    assert areas[0.1].sum() > areas[0.5].sum() > areas[0.9].sum() > 0
    assert not (areas[0.9] & ~areas[0.5]).any()  # a higher threshold only removes pixels
    default = predict_path(*authors, src, tmp_path / "default")
    assert default["threshold"] == 0.5
    assert np.array_equal(cv2.imread(str(tmp_path / "default" / "masks" / f"{src.stem}.png")) > 0,
                          cv2.imread(str(tmp_path / "0.5" / "masks" / f"{src.stem}.png")) > 0)
    for bad in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(EdgesegError, match="--threshold"):
            predict_path(*authors, src, tmp_path / "bad", threshold=bad)


def test_cli_threshold_threads_and_help(cli, authors_ckpt, data_root, tmp_path):
    src = sorted((data_root / "kvasir-seg" / "images").iterdir())[0]
    code, stdout, err = cli("predict", authors_ckpt, src, "--out", tmp_path / "ok", "--threshold", "0.3",
                            "--threads", "1")
    assert code == 0, err
    assert (tmp_path / "ok" / "masks" / f"{src.stem}.png").is_file()
    for opt, value in (("--threshold", "1"), ("--threshold", "0"), ("--threads", "0"), ("--threads", "100000")):
        code, _, err = cli("predict", authors_ckpt, src, "--out", tmp_path / "bad", opt, value)
        assert code == 2 and opt in err, (opt, value, err)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    code, stdout, _ = cli("predict", "--help")
    assert code == 0 and "yellow" in stdout and "--threshold" in stdout and "--threads" in stdout


def test_overlay_legend_names_the_colours():
    from edgeseg.evaluate import GT_RGB, PRED_RGB, overlay

    for size in (64, 288, 1080):
        img = np.full((size, size, 3), 128, np.uint8)
        pred = np.zeros((size, size), bool)
        pred[size // 2:, size // 2:] = True
        plain = overlay(img, pred, legend=False)
        shown = overlay(img, pred, pred)
        corner = shown[: size // 3, : size // 2]
        third = size // 3
        assert not np.array_equal(shown, plain) and np.array_equal(plain[:third, :third], img[:third, :third])
        for colour in (PRED_RGB, GT_RGB):  # both key entries drawn in their colours, in the corner
            assert (np.abs(corner.astype(int) - colour).sum(-1) == 0).any(), (size, colour)
        assert (overlay(img, pred)[: size // 3, : size // 2] == GT_RGB).all(-1).sum() == 0  # no gt entry without gt
