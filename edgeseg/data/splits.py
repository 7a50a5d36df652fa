"""Data root resolution and split protocols.

A split is a sorted list of ``<dataset>/<id>`` strings. Three protocols produce one:
  * a fixed list file (a path, or a name such as ``pranet-train`` looked up in ``<root>/splits/``);
  * a seeded k:1 split of a whole dataset folder: ``seeded:<dataset>:<k>:<seed>:train|test``
    (the seed papers' 80:20 split is ``seeded:kvasir-seg:4:42:train``);
  * a validation subset carved from a training split with a seed (:func:`carve_validation`).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from edgeseg.errors import EdgesegError

ENV_VAR = "EDGESEG_DATA"
IMAGE_SUFFIX, MASK_SUFFIX = ".jpg", ".png"


def resolve_data_root(option: str | os.PathLike | None = None) -> Path:
    """``--data-root`` if given, else ``$EDGESEG_DATA``, else ``../shared/data`` when it exists."""
    for candidate, origin in ((option, "--data-root"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if candidate:
            root = Path(candidate)
            if not root.is_dir():
                raise EdgesegError(f"data root {root} ({origin}) is not a directory; point it at a folder "
                                   "holding <dataset>/images and <dataset>/masks")
            return root
    default = Path("../shared/data")
    if default.is_dir():
        return default
    raise EdgesegError(f"no data root: pass --data-root DIR or set {ENV_VAR}=DIR "
                       "(a folder holding <dataset>/images/<id>.jpg and <dataset>/masks/<id>.png)")


def image_path(root: Path, sid: str) -> Path:
    dataset, name = sid.split("/", 1)
    return root / dataset / "images" / f"{name}{IMAGE_SUFFIX}"


def mask_path(root: Path, sid: str) -> Path:
    dataset, name = sid.split("/", 1)
    return root / dataset / "masks" / f"{name}{MASK_SUFFIX}"


def _list_dataset(root: Path, dataset: str) -> list[str]:
    folder = root / dataset
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        known = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
        raise EdgesegError(f"dataset {dataset!r} not found under {root} (needs images/ and masks/); "
                           f"found: {', '.join(known) or 'none'}")
    images = {p.stem for p in (folder / "images").glob(f"*{IMAGE_SUFFIX}")}
    masks = {p.stem for p in (folder / "masks").glob(f"*{MASK_SUFFIX}")}
    if images - masks:
        name = sorted(images - masks)[0]
        raise EdgesegError(f"image {folder / 'images' / (name + IMAGE_SUFFIX)} has no mask "
                           f"{folder / 'masks' / (name + MASK_SUFFIX)}; add the mask or remove the image")
    if masks - images:
        name = sorted(masks - images)[0]
        raise EdgesegError(f"mask {folder / 'masks' / (name + MASK_SUFFIX)} has no image; "
                           "add the image or remove the mask")
    return sorted(f"{dataset}/{n}" for n in images)


def read_split(spec: str, root: Path) -> list[str]:
    """Resolve a split spec (file path, split name, or ``seeded:...``) into sorted, checked ids."""
    if spec.startswith("seeded:"):
        return _seeded_split(spec, root)
    path = Path(spec)
    if not path.is_file():
        named = root / "splits" / f"{spec.removesuffix('.txt')}.txt"
        if not named.is_file():
            avail = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
            raise EdgesegError(f"split {spec!r} is neither a file nor a name in {root / 'splits'}; "
                               f"available: {', '.join(avail) or 'none'}")
        path = named
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise EdgesegError(f"split file {path} is empty; it needs one <dataset>/<id> per line")
    for lineno, sid in enumerate(ids, 1):
        if "/" not in sid:
            raise EdgesegError(f"{path}:{lineno}: entry {sid!r} is not of the form <dataset>/<id>")
        check_pair_exists(root, sid, where=f"{path}:{lineno}")
    if len(set(ids)) != len(ids):
        dup = next(s for s in ids if ids.count(s) > 1)
        raise EdgesegError(f"split file {path} lists {dup!r} more than once; remove the duplicate")
    return sorted(ids)


def check_pair_exists(root: Path, sid: str, where: str) -> None:
    img, msk = image_path(root, sid), mask_path(root, sid)
    if not img.is_file() and not msk.is_file():
        raise EdgesegError(f"{where}: unknown entry {sid!r}: neither {img} nor {msk} exists")
    if not img.is_file():
        raise EdgesegError(f"{where}: mask {msk} has no image {img}; add the image or drop the entry")
    if not msk.is_file():
        raise EdgesegError(f"{where}: image {img} has no mask {msk}; add the mask or drop the entry")


def _seeded_split(spec: str, root: Path) -> list[str]:
    parts = spec.split(":")
    if len(parts) != 5 or parts[4] not in ("train", "test") or not parts[2].isdigit() or not parts[3].isdigit():
        raise EdgesegError(f"bad split spec {spec!r}; expected seeded:<dataset>:<k>:<seed>:train|test, "
                           "e.g. seeded:kvasir-seg:4:42:train for an 80:20 split")
    _, dataset, k, seed, part = parts
    ids = _list_dataset(root, dataset)
    order = ids[:]
    random.Random(int(seed)).shuffle(order)
    n_test = round(len(ids) / (int(k) + 1))
    chosen = order[:n_test] if part == "test" else order[n_test:]
    return sorted(chosen)


def carve_validation(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (train, val) with a seeded shuffle of the sorted ids."""
    if not 0.0 < fraction < 1.0:
        raise EdgesegError(f"--val-fraction must be in (0, 1), got {fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_hash(ids: list[str]) -> str:
    """sha256 of the sorted id list: identifies a split in checkpoints and calibration manifests."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
