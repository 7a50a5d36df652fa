"""Calibration manifests: which real frames calibrate an int8 export, by id and sha256 (never the images).

    edgeseg calib make --split pranet-train --n 300 --out calibration/pranet-train-300.json

Images are drawn from the *training part* of the split, carved exactly as training carves its validation
set (``carve_validation(ids, 0.1, seed)``), so the default parity split (that validation set) stays
disjoint. Export re-hashes every file before use and refuses a stale, overlapping or too-small manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg import __version__
from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256, write_atomic

log = logging.getLogger(__name__)

FORMAT = "edgeseg-calibration"
FORMAT_VERSION = 1
BATCH_SIZE = 8          # images per calibration batch; a manifest needs at least one batch
RECOMMENDED_MIN = 300   # fewer images calibrate, but activation ranges get noisier: warn below this
DEFAULT_N = 300


@dataclass(frozen=True)
class Manifest:
    path: Path
    split: str
    ids: tuple[str, ...]
    sha256: tuple[str, ...]  # one per id, of the image file
    data: dict               # the whole JSON document

    @property
    def hash(self) -> str:
        """sha256 identifying the calibration data (ids + image hashes), recorded in every artefact."""
        return images_hash(self.ids, self.sha256)


def images_hash(ids, shas) -> str:
    return hashlib.sha256("\n".join(f"{i} {s}" for i, s in zip(ids, shas)).encode()).hexdigest()


def _sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise EdgesegError(f"cannot read calibration image {path}: {e.strerror}") from None


def make_manifest(split: str, root: Path, n: int = DEFAULT_N, exclude: tuple[str, ...] = (),
                  val_fraction: float = 0.1, seed: int = 42) -> dict:
    """Draw ``n`` images (seeded) from the training part of ``split`` minus every ``exclude`` split."""
    from edgeseg.config import MAX_SEED, check_float, check_int
    from edgeseg.data.splits import carve_validation, image_path, read_split, split_hash

    check_int(n, "--n", 1)
    if n < BATCH_SIZE:
        raise EdgesegError(f"--n {n} is fewer than one calibration batch ({BATCH_SIZE} images)")
    check_float(val_fraction, "--val-fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    check_int(seed, "--seed", 0, MAX_SEED)
    ids = read_split(split, root)
    train_part, val_part = carve_validation(ids, val_fraction, seed)
    excluded = set(val_part)
    for spec in exclude:
        excluded |= set(read_split(spec, root))
    pool = [i for i in train_part if i not in excluded]
    if len(pool) < n:
        raise EdgesegError(f"only {len(pool)} images of {split!r} remain after carving validation and the "
                           f"excluded splits; lower --n (asked for {n})")
    chosen = sorted(random.Random(seed).sample(pool, n))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "split": split,
        "split_sha256": split_hash(ids),
        "carve": {"val_fraction": val_fraction, "seed": seed, "part": "train"},
        "excluded_splits": list(exclude),
        "n": n,
        "seed": seed,
        "edgeseg_version": __version__,
        "images": [{"id": i, "sha256": _sha256(image_path(root, i))} for i in chosen],
    }


def write_manifest(manifest: dict, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename); the folder is created if needed."""
    path = Path(path)
    head = {k: v for k, v in manifest.items() if k != "images"}
    lines = ",\n".join(f"  {json.dumps(entry)}" for entry in manifest["images"])  # one image per line
    return write_atomic(path, json.dumps(head, indent=1)[:-2] + f',\n "images": [\n{lines}\n ]\n}}\n')


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check a manifest: the format, then the schema of every field a reader uses (so a document with
    the right format tag but edited contents is refused with one line, not a KeyError later)."""
    path = Path(path)
    if not path.is_file():
        raise EdgesegError(f"calibration manifest {path} does not exist; make one with `edgeseg calib make`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EdgesegError(f"calibration manifest {path} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EdgesegError(f"{path} is not an edgeseg calibration manifest (made by `edgeseg calib make`)")
    version = data.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise EdgesegError(f"{path}: manifest field 'format_version' is {version!r}, not a version number; remake "
                           "it with `edgeseg calib make`")
    if version > FORMAT_VERSION:
        raise EdgesegError(f"{path} has manifest format {data['format_version']}, newer than this edgeseg")
    split = data.get("split")
    if not isinstance(split, str):
        raise EdgesegError(f"{path}: manifest field 'split' is {split!r}, not a split name; remake it with "
                           "`edgeseg calib make`")
    ids, shas = _image_entries(data.get("images"), path)
    return Manifest(path=path, split=split, ids=ids, sha256=shas, data=data)


def _image_entries(images, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ids, sha256s) of a manifest's 'images' list: each entry an {id, sha256} object with a data-root id
    that stays inside the root and a 64-hex-digit hash, no id twice."""
    from edgeseg.data.splits import check_id

    if not isinstance(images, list) or not images:
        raise EdgesegError(f"{path}: manifest field 'images' must be a non-empty list of {{id, sha256}} entries; "
                           "remake it with `edgeseg calib make`")
    ids, shas, seen = [], [], set()
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise EdgesegError(f"{where} needs an 'id' string and a 'sha256'")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise EdgesegError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
        sid = check_id(entry["id"], where)
        if sid in seen:
            raise EdgesegError(f"{where}: {sid!r} is listed more than once; remake it with `edgeseg calib make`")
        seen.add(sid)
        ids.append(sid)
        shas.append(sha)
    return tuple(ids), tuple(shas)


def check_manifest(manifest: Manifest, root: Path, eval_ids, eval_name: str = "the parity split") -> None:
    """Refuse a manifest that is too small, overlaps ``eval_ids`` or no longer matches the files."""
    from edgeseg.data.splits import image_path

    if len(manifest.ids) < BATCH_SIZE:
        raise EdgesegError(f"calibration manifest {manifest.path} lists {len(manifest.ids)} images, fewer than "
                           f"one batch ({BATCH_SIZE}); make a larger one with `edgeseg calib make --n`")
    overlap = sorted(set(manifest.ids) & set(eval_ids))
    if overlap:
        raise EdgesegError(f"calibration manifest {manifest.path} overlaps {eval_name} ({len(overlap)} images, "
                           f"e.g. {overlap[0]}); calibrate on other frames (`edgeseg calib make --exclude-split`)")
    for sid, sha in zip(manifest.ids, manifest.sha256):
        path = image_path(root, sid)
        if not path.is_file():
            raise EdgesegError(f"calibration image {path} (from {manifest.path}) does not exist")
        if _sha256(path) != sha:
            raise EdgesegError(f"calibration image {path} changed since {manifest.path} was made (sha256 "
                               "mismatch); remake the manifest with `edgeseg calib make`")
    if len(manifest.ids) < RECOMMENDED_MIN:
        log.warning("calibration manifest %s has %d images; %d or more give steadier int8 ranges",
                    manifest.path, len(manifest.ids), RECOMMENDED_MIN)


def load_images(manifest: Manifest, root: Path, contract) -> np.ndarray:
    """The manifest's frames through the input contract: (N, 3, S, S) float32."""
    from edgeseg.data.io import read_rgb
    from edgeseg.data.splits import image_path

    return np.concatenate([contract.preprocess(read_rgb(image_path(root, sid))) for sid in manifest.ids])


def batches(images: np.ndarray, batch_size: int = BATCH_SIZE) -> list[np.ndarray]:
    """Consecutive (B, 3, S, S) slices; the last one may be shorter."""
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
