"""Checked image/mask reading and the Canny boundary labels (OpenCV, no torch)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from edgeseg.errors import EdgesegError

log = logging.getLogger(__name__)
_ELLIPSE5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def _decode(path: Path, flags: int) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgesegError(f"cannot read {path}: {e.strerror}") from None
    suffix = path.suffix.lower()
    # libjpeg decodes a truncated file with only a warning: require the end-of-image marker.
    if suffix in (".jpg", ".jpeg") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise EdgesegError(f"{path} is a truncated or corrupt JPEG (no end-of-image marker); re-export the file")
    if suffix == ".png" and b"IEND" not in data[-12:]:
        raise EdgesegError(f"{path} is a truncated or corrupt PNG (no IEND chunk); re-export the file")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if img is None:
        raise EdgesegError(f"{path} is not a readable image; replace or remove it")
    return img


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    return cv2.cvtColor(_decode(Path(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_mask(path: Path, strict: bool = False) -> np.ndarray:
    """Binary mask as uint8 {0, 1} (H, W). Values other than 0/255 are thresholded at 127 with a warning,
    or refused when ``strict``."""
    m = _decode(Path(path), cv2.IMREAD_GRAYSCALE)
    odd = np.count_nonzero((m != 0) & (m != 255))
    if odd:
        msg = f"{path}: mask is not binary ({odd} pixels not 0/255)"
        if strict:
            raise EdgesegError(f"{msg}; binarise it (threshold 127) or drop --strict")
        log.warning("%s; thresholding at 127", msg)
    return (m > 127).astype(np.uint8)


def read_pair(image_file: Path, mask_file: Path, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    img, mask = read_rgb(image_file), read_mask(mask_file, strict)
    if img.shape[:2] != mask.shape:
        raise EdgesegError(f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but image {image_file} is "
                           f"{img.shape[1]}x{img.shape[0]}; they must have the same size")
    return img, mask


def boundary_map(mask01: np.ndarray) -> np.ndarray:
    """UltraSeg boundary label {0, 1}: Canny(30, 90) on the binarised mask, dilated by a 5x5 ellipse."""
    edges = cv2.Canny(mask01.astype(np.uint8) * 255, 30, 90)
    return (cv2.dilate(edges, _ELLIPSE5) > 0).astype(np.uint8)
