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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.contract import InputContract, resize_image, resize_mask
from edgeseg.data.io import boundary_map, read_pair
from edgeseg.data.splits import image_path, mask_path
from edgeseg.data.transforms import Augment
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


def _decode_one(root: Path, sid: str, size: int, strict: bool):
    img, mask = read_pair(image_path(root, sid), mask_path(root, sid), strict)
    # Boundary labels are made at native resolution (as UltraSeg does), then resized like the mask.
    return resize_image(img, size), resize_mask(mask, size), resize_mask(boundary_map(mask), size)


def load_decoded(root: Path, ids: list[str], size: int, cache_dir: Path | None = None,
                 strict: bool = False) -> Decoded:
    """Decode ``ids`` at ``size`` x ``size``, through the on-disk cache when ``cache_dir`` is given."""
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{strict}".encode())
        for sid in ids:
            h.update(f"|{sid}|{_file_key(image_path(root, sid))}|{_file_key(mask_path(root, sid))}".encode())
        cache_file = Path(cache_dir) / f"decoded-{size}-{h.hexdigest()[:24]}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as z:
                if list(z["ids"]) == list(ids):
                    return Decoded(list(ids), z["images"], z["masks"], z["boundaries"])
            log.warning("cache %s does not match its key; rebuilding", cache_file)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # OpenCV releases the GIL
        out = list(pool.map(lambda s: _decode_one(root, s, size, strict), ids))
    dec = Decoded(list(ids), *(np.stack(a) for a in zip(*out)))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            np.savez(tmp, ids=np.array(ids), images=dec.images, masks=dec.masks, boundaries=dec.boundaries)
    return dec


class SegDataset:
    """Map-style dataset over :class:`Decoded` samples.

    Returns ``(x, mask, boundary)``: x (3, S, S) float32 through the input contract, mask and boundary
    (1, S, S) float32 in {0, 1}. With ``augment`` the same geometric transform is applied to all three.
    """

    def __init__(self, decoded: Decoded, contract: InputContract, augment: Augment | None = None):
        self.decoded, self.contract, self.augment = decoded, contract, augment

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, i: int):
        img, mask, bnd = self.decoded.images[i], self.decoded.masks[i], self.decoded.boundaries[i]
        if self.augment is not None:
            img, mask, bnd = self.augment(img, mask, bnd, index=i)
        x = self.contract.normalise(img)
        return x, mask[None].astype(np.float32), bnd[None].astype(np.float32)
