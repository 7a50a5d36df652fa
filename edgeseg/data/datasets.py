"""Decoded, resized samples (cached) and the training/evaluation datasets.

Decoding full-size JPEGs every epoch would dominate a 2-core training run, so each split is decoded once
into uint8 arrays at network size. The optional on-disk cache is keyed by the sha256 and byte size of
every image and mask file, the network size and the cache format version, so an edited file, a different
size or new code can never be served stale: it simply maps to another key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.contract import InputContract, resize_image, resize_mask
from edgeseg.data.io import boundary_map, read_pair
from edgeseg.data.splits import image_path, mask_path
from edgeseg.data.transforms import Augment
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class Decoded:
    """A split at network size: ``images`` (N, S, S, 3) RGB uint8, ``masks`` and ``boundaries`` (N, S, S)
    uint8 in {0, 1}."""

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    boundaries: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _file_key(path: Path) -> str:
    data = path.read_bytes()
    return f"{hashlib.sha256(data).hexdigest()}:{len(data)}"


def split_key(root: Path, ids: list[str], prefix: str, masks: bool = True) -> str:
    """sha256 hex digest of ``prefix`` and, per id in order, the id and the sha256 and byte size of its image (and
    mask) file: a cache key that changes when any file, the order or ``prefix`` (format version, size...) does."""
    h = hashlib.sha256(prefix.encode())
    for sid in ids:
        mask_key = f"|{_file_key(mask_path(root, sid))}" if masks else ""
        h.update(f"|{sid}|{_file_key(image_path(root, sid))}{mask_key}".encode())
    return h.hexdigest()


def _decode_one(root: Path, sid: str, size: int, strict: bool):
    img, mask = read_pair(image_path(root, sid), mask_path(root, sid), strict)
    # Boundary labels are made at native resolution (as UltraSeg does), then resized like the mask.
    return resize_image(img, size), resize_mask(mask, size), resize_mask(boundary_map(mask), size)


def load_decoded(root: Path, ids: list[str], size: int, cache_dir: Path | None = None,
                 strict: bool = False) -> Decoded:
    """Decode ``ids`` at ``size`` x ``size``, through the on-disk cache when ``cache_dir`` is given.

    A cache file that cannot be read back (truncated by a full disk or a kill, edited, another format) is
    rebuilt with a warning, never trusted and never fatal. A ``cache_dir`` that is a file or cannot be
    written is refused before anything is decoded.
    """
    if not ids:
        raise EdgesegError("no images to decode: the split is empty")
    cache_file = None
    if cache_dir is not None:
        check_cache_dir(cache_dir)
        key = split_key(root, ids, f"v{CACHE_VERSION}|{size}|{strict}")
        cache_file = Path(cache_dir) / f"decoded-{size}-{key[:24]}.npz"
        if cache_file.is_file():
            cached = _read_cache(cache_file, ids, size)
            if cached is not None:
                return cached
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # OpenCV releases the GIL
        out = list(pool.map(lambda s: _decode_one(root, s, size, strict), ids))
    dec = Decoded(list(ids), *(np.stack(a) for a in zip(*out)))
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            np.savez(tmp, ids=np.array(ids), images=dec.images, masks=dec.masks, boundaries=dec.boundaries)
    return dec


def check_cache_dir(cache_dir: Path, option: str = "--cache-dir") -> None:
    """Create ``cache_dir`` if needed and prove it writable with a probe file; EdgesegError naming ``option``
    otherwise."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise EdgesegError(f"{option} {cache_dir} is a file, not a folder; give a folder (created if missing)")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as e:
        raise EdgesegError(f"{option} {cache_dir} cannot be written ({e.strerror or e}); give a writable "
                           f"folder or drop {option}") from None


def read_cache_file(cache_file: Path, ids: list[str], expected: dict[str, tuple[tuple[int, ...], type]]) \
        -> dict[str, np.ndarray] | None:
    """The arrays of an .npz cache file, or None (with one warning line) when it cannot be read or does not match
    its key: its ``ids`` must be ``ids`` and each array of ``expected`` (name -> (shape, dtype)) must be there
    with that shape and dtype. A damaged cache is never trusted and never fatal: the caller rebuilds it."""
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in expected}
            same_ids = [str(i) for i in z["ids"]] == list(ids)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        log.warning("cache %s is unreadable (%s); rebuilding it", cache_file, str(e).splitlines()[0][:80] or
                    type(e).__name__)
        return None
    if not (same_ids and all(a.shape == expected[k][0] and a.dtype == expected[k][1] for k, a in arrays.items())):
        log.warning("cache %s does not match its key; rebuilding it", cache_file)
        return None
    return arrays


def _read_cache(cache_file: Path, ids: list[str], size: int) -> Decoded | None:
    """The cached split, or None (with a warning) when the file is damaged or does not match its key."""
    n = len(ids)
    labels = ((n, size, size), np.uint8)
    z = read_cache_file(cache_file, ids, {"images": ((n, size, size, 3), np.uint8), "masks": labels,
                                          "boundaries": labels})
    return None if z is None else Decoded(list(ids), z["images"], z["masks"], z["boundaries"])


class SegDataset:
    """Map-style dataset over :class:`Decoded` samples.

    Returns ``(x, mask, boundary)``: x (3, S, S) float32 through the input contract, mask and boundary
    (1, S, S) float32 in {0, 1}. With ``teacher_logits`` ((N, S, S), e.g. the float16 offline-distillation
    cache) a 4th item follows: that sample's teacher logits, (1, S, S) float32. With ``augment`` the same
    geometric transform is applied to all of them (the colour jitter to x only).
    """

    def __init__(self, decoded: Decoded, contract: InputContract, augment: Augment | None = None,
                 teacher_logits: np.ndarray | None = None):
        self.decoded, self.contract, self.augment = decoded, contract, augment
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, i: int):
        img, mask, bnd = self.decoded.images[i], self.decoded.masks[i], self.decoded.boundaries[i]
        extra = [] if self.teacher_logits is None else [self.teacher_logits[i].astype(np.float32)]
        if self.augment is not None:
            img, mask, bnd, *extra = self.augment(img, mask, bnd, index=i, extra=extra[0] if extra else None)
        x = self.contract.normalise(img)
        return (x, mask[None].astype(np.float32), bnd[None].astype(np.float32), *(e[None] for e in extra))
