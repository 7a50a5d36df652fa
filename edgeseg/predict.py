"""Prediction on an image, a folder of images or a video, with a per-frame latency log.

    edgeseg predict CKPT_OR_ARTEFACT frames/ --out pred/      # masks/, overlays/, latency.csv
    edgeseg predict CKPT_OR_ARTEFACT clip.mp4 --out pred/     # clip_overlay.mp4, clip_mask.mp4, masks/, latency.csv

Each frame goes decode -> preprocess (the artefact's input contract) -> infer -> threshold/overlay, and each
stage is timed separately. Every output file is written to a temp name and renamed. A pixel is foreground
when its probability is above the threshold (the contract's, 0.5, unless given). For a video the masks are
also written losslessly, one PNG per frame (masks/frame_000000.png ...), since the mp4 mask is lossy. Overlays
draw the predicted contour in yellow, with a small legend in the top-left corner.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from edgeseg.contract import InputContract
from edgeseg.data.io import read_rgb
from edgeseg.errors import EdgesegError
from edgeseg.evaluate import overlay
from edgeseg.fileio import atomic_path, make_folder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v"}
LATENCY_FIELDS = ["frame", "name", "decode_ms", "preprocess_ms", "infer_ms", "post_ms", "total_ms"]


@dataclass
class FramePrediction:
    name: str
    rgb: np.ndarray  # the decoded frame (H, W, 3)
    mask: np.ndarray  # bool (H, W) at the frame's resolution
    overlay: np.ndarray  # the frame with the mask contour drawn
    timings: dict[str, float]  # ms per stage


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 < threshold < 1):
        raise EdgesegError(f"--threshold must be a probability strictly between 0 and 1, got {threshold}")
    return float(threshold)


def predict_frames(logits_fn: Callable[[np.ndarray], np.ndarray], contract: InputContract,
                   frames: Iterator[tuple[str, Callable[[], np.ndarray]]],
                   threshold: float | None = None) -> Iterator[FramePrediction]:
    """Run ``logits_fn`` on frames given as (name, decode function; None ends the stream); time every stage.
    A pixel is foreground where sigmoid(logit) > ``threshold`` (default: the contract's)."""
    t = check_threshold(contract.threshold if threshold is None else threshold)
    cut = math.log(t / (1 - t))  # sigmoid(z) > t  <=>  z > logit(t)
    for name, decode in frames:
        t0 = time.perf_counter()
        rgb = decode()
        if rgb is None:  # end of a video
            return
        t1 = time.perf_counter()
        x = contract.preprocess(rgb)
        t2 = time.perf_counter()
        logits = logits_fn(x)[0, 0]
        t3 = time.perf_counter()
        z = cv2.resize(logits, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
        mask = z > cut
        vis = overlay(rgb, mask)
        t4 = time.perf_counter()
        ms = [1000 * (b - a) for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4))]
        yield FramePrediction(name, rgb, mask, vis, dict(zip(LATENCY_FIELDS[2:], ms)))


def _image_frames(paths: list[Path]):
    for p, name in zip(paths, output_names(paths)):
        yield name, (lambda p=p: read_rgb(p))


def output_names(paths: list[Path]) -> list[str]:
    """One distinct output name per input image: its stem, or its whole file name where stems clash
    (``frame.jpg`` + ``frame.png`` -> ``frame.jpg``, ``frame.png``), so no mask overwrites another. Names are
    compared case-insensitively (``A.png`` and ``a.png`` are one file on some file systems)."""
    stems = Counter(p.stem.casefold() for p in paths)
    names = [p.stem if stems[p.stem.casefold()] == 1 else p.name for p in paths]
    folded = Counter(n.casefold() for n in names)
    clash = next((n for n in names if folded[n.casefold()] > 1), None)
    if clash is not None:
        same = [str(p) for p, n in zip(paths, names) if n.casefold() == clash.casefold()]
        raise EdgesegError(f"inputs {', '.join(same)} would write the same output {clash}.png; rename one of them")
    return names


def _video_frames(cap: cv2.VideoCapture):
    """Endless (name, decode) pairs; decode returns None after the last frame (decoding stays timed)."""
    index = 0
    while True:
        def decode():
            ok, bgr = cap.read()
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None

        yield f"frame_{index:06d}", decode
        index += 1


def _write_image(path: Path, rgb_or_grey: np.ndarray) -> None:
    img = cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR) if rgb_or_grey.ndim == 3 else rgb_or_grey
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise EdgesegError(f"cannot write {path}; check that the folder is writable")


def _write_latency(out: Path, rows: list[dict]) -> None:
    with atomic_path(out / "latency.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LATENCY_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _row(i: int, p: FramePrediction) -> dict:
    return {"frame": i, "name": p.name, **{k: f"{v:.3f}" for k, v in p.timings.items()}}


def is_video(source: Path) -> bool:
    return source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES


def open_video(source: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(source))
    if not cap.isOpened():
        raise EdgesegError(f"cannot open video {source} (unknown codec or not a video); convert it to mp4/avi")
    return cap


def image_paths(source: Path) -> list[Path]:
    """The image, or the images of a folder (sorted by name)."""
    if not source.exists():
        raise EdgesegError(f"input {source} does not exist")
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise EdgesegError(f"folder {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return paths
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    raise EdgesegError(f"{source} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}), a video "
                       f"({', '.join(sorted(VIDEO_SUFFIXES))}) nor a folder")


def frames_of(source: Path):
    """(name, decode) pairs of a video or of images, and a function that releases the source."""
    if is_video(source):
        cap = open_video(source)
        return _video_frames(cap), cap.release
    return _image_frames(image_paths(source)), lambda: None


@contextlib.contextmanager
def _progress(total: int | None, enabled: bool, what: str):
    """A progress bar on stderr (rich); yields a function to call once per frame. Off when not ``enabled``."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn(f"predict {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("predict", total=total or None)
        yield lambda: bar.advance(task)


def predict_path(logits_fn, contract: InputContract, source: Path, out: Path, threshold: float | None = None,
                 progress: bool | None = None) -> dict:
    """Predict an image, a folder of images or a video into ``out``. Returns a summary dict.

    ``threshold``: probability above which a pixel is foreground (default: the contract's). ``progress``:
    show a progress bar on stderr (default: when stderr is a terminal)."""
    source = Path(source)
    if threshold is not None:
        check_threshold(threshold)
    if not source.exists():
        raise EdgesegError(f"input {source} does not exist")
    if progress is None:
        progress = sys.stderr.isatty()
    make_folder(out, "the output folder")
    if is_video(source):
        return _predict_video(logits_fn, contract, source, out, threshold, progress)
    paths = image_paths(source)
    output_names(paths)  # refuse clashing names before anything is written
    make_folder(out / "masks", "the masks folder")
    make_folder(out / "overlays", "the overlays folder")
    rows = []
    with _progress(len(paths), progress, "images") as tick:
        for i, p in enumerate(predict_frames(logits_fn, contract, _image_frames(paths), threshold)):
            _write_image(out / "masks" / f"{p.name}.png", p.mask.astype(np.uint8) * 255)
            _write_image(out / "overlays" / f"{p.name}.png", p.overlay)
            rows.append(_row(i, p))
            tick()
    _write_latency(out, rows)
    return _summary(rows, kind="images", threshold=contract.threshold if threshold is None else threshold)


def _predict_video(logits_fn, contract: InputContract, source: Path, out: Path, threshold: float | None = None,
                   progress: bool = False) -> dict:
    cap = open_video(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # a container's estimate; only the bar uses it
    targets = {"overlay": out / f"{source.stem}_overlay.mp4", "mask": out / f"{source.stem}_mask.mp4"}
    writers: dict[str, cv2.VideoWriter] = {}
    rows = []
    masks = make_folder(out / "masks", "the masks folder")  # lossless per-frame masks beside the lossy mp4
    with contextlib.ExitStack() as stack:  # both videos land together, or neither (temp files removed)
        tmps = {k: stack.enter_context(atomic_path(v)) for k, v in targets.items()}
        tick = stack.enter_context(_progress(count, progress, source.name))
        try:
            for i, p in enumerate(predict_frames(logits_fn, contract, _video_frames(cap), threshold)):
                _write_image(masks / f"{p.name}.png", p.mask.astype(np.uint8) * 255)
                tick()
                if not writers:
                    size = (p.rgb.shape[1], p.rgb.shape[0])
                    writers = {k: cv2.VideoWriter(str(t), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                               for k, t in tmps.items()}
                writers["overlay"].write(cv2.cvtColor(p.overlay, cv2.COLOR_RGB2BGR))
                writers["mask"].write(cv2.cvtColor(p.mask.astype(np.uint8) * 255, cv2.COLOR_GRAY2BGR))
                rows.append(_row(i, p))
        finally:
            cap.release()
            for w in writers.values():
                w.release()
        if not rows:
            raise EdgesegError(f"video {source} has no readable frames")
    _write_latency(out, rows)
    return _summary(rows, kind="video", fps_in=fps, threshold=contract.threshold if threshold is None else threshold)


def _summary(rows: list[dict], **extra) -> dict:
    total = np.array([float(r["total_ms"]) for r in rows])
    infer = np.array([float(r["infer_ms"]) for r in rows])
    return {"frames": len(rows), "total_ms_p50": float(np.median(total)), "infer_ms_p50": float(np.median(infer)),
            "end_to_end_fps": float(1000.0 / total.mean()), **extra}
