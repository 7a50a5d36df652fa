"""Data root resolution and split protocols.

A split is a sorted list of ``<dataset>/<id>`` strings. Three protocols produce one:
  * a fixed list file (a path, or a name such as ``pranet-train`` looked up in ``<root>/splits/``);
  * a seeded k:1 split of a whole dataset folder: ``seeded:<dataset>:<k>:<seed>:train|test``
    (the seed papers' 80:20 split is ``seeded:kvasir-seg:4:42:train``);
  * every pair of one dataset folder: ``all:<dataset>`` (how ``--data DIR`` names the user's own folder);
  * a validation subset carved from a training split with a seed (:func:`carve_validation`).

A dataset folder holds ``images/`` and ``masks/`` paired by file stem; images may be JPEG, PNG, BMP or TIFF
(read by content), masks too (PNG preferred). ``--data DIR`` is the data root ``DIR/..`` with the split
``all:<DIR's name>``, so its ids are ``<DIR's name>/<stem>`` and go through the same checks as any other id.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import re
from pathlib import Path

from edgeseg.errors import EdgesegError

ENV_VAR = "EDGESEG_DATA"
# Accepted file suffixes (any case), in lookup order (the shared datasets' .jpg / .png first): the first that
# exists names the file of an id.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
ALL_PREFIX = "all:"


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


def check_id(sid: str, where: str = "") -> str:
    """Refuse an id that could name a file outside the data root; returns ``sid``.

    An id is ``<dataset>/<name>``: '/'-separated parts, none empty, ``.`` or ``..``, and no backslash, NUL or
    leading '/'. So ``ds/../../x`` and ``ds//abs/path`` (which pathlib would turn into ``/abs/path``) are
    refused here, the one place every id passes through on its way to a path.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(sid, str) or "/" not in sid:
        raise EdgesegError(f"{prefix}entry {sid!r} is not of the form <dataset>/<id>")
    parts = sid.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise EdgesegError(f"{prefix}entry {sid!r} is not a plain <dataset>/<id> (empty, '.' or '..' parts, "
                           "backslashes and absolute paths would leave the data root)")
    return sid


def _find(folder: Path, name: str, suffixes: tuple[str, ...]) -> Path:
    """The file ``folder/name.<suffix>`` for the first accepted suffix that exists (as written, upper case, or
    any other case); the first suffix's path when none does, so a missing file is reported by that name."""
    for suffix in suffixes:
        for variant in (suffix, suffix.upper()):
            path = folder / f"{name}{variant}"
            if path.is_file():
                return path
    if folder.is_dir():  # mixed-case suffixes (.Jpg): rare, so only then list the folder
        for suffix in suffixes:
            for path in folder.glob(f"{glob.escape(name)}.*"):
                if path.stem == name and path.suffix.lower() == suffix and path.is_file():
                    return path
    return folder / f"{name}{suffixes[0]}"


def image_path(root: Path, sid: str) -> Path:
    dataset, name = check_id(sid).split("/", 1)
    return _find(root / dataset / "images", name, IMAGE_SUFFIXES)


def mask_path(root: Path, sid: str) -> Path:
    dataset, name = check_id(sid).split("/", 1)
    return _find(root / dataset / "masks", name, MASK_SUFFIXES)


def _stems(folder: Path, suffixes: tuple[str, ...], what: str) -> set[str]:
    """Stems of the accepted files in ``folder``, hidden ones (``._x.jpg`` from macOS) left out; two files of one
    stem (a.jpg and a.png) and names that are not valid UTF-8 are refused."""
    seen: dict[str, str] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file():
            try:
                p.name.encode("utf-8")
            except UnicodeEncodeError:
                raise EdgesegError(f"{folder} holds a file whose name is not valid UTF-8 "
                                   f"({p.name.encode('utf-8', 'replace').decode()!r}); rename it") from None
            if p.stem in seen:
                raise EdgesegError(f"{folder} holds two {what} named {p.stem!r} ({seen[p.stem]} and {p.name}); "
                                   "keep one")
            seen[p.stem] = p.name
    return set(seen)


def _few(names: set[str], n: int = 5) -> str:
    first = sorted(names)[:n]
    return ", ".join(first) + (f" and {len(names) - n} more" if len(names) > n else "")


def _list_dataset(root: Path, dataset: str) -> list[str]:
    folder = root / dataset
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        missing = " and ".join(d for d in ("images/", "masks/") if not (folder / d).is_dir())
        if folder.is_dir():
            raise EdgesegError(f"dataset folder {folder} has no {missing}; it needs images/ and masks/ with one "
                               "mask per image, paired by file name (jpg, png, bmp or tif)")
        known = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
        raise EdgesegError(f"dataset {dataset!r} not found under {root} (needs images/ and masks/); "
                           f"found: {', '.join(known) or 'none'}")
    kinds = "jpg, png, bmp or tif"
    images = _stems(folder / "images", IMAGE_SUFFIXES, "images")
    masks = _stems(folder / "masks", MASK_SUFFIXES, "masks")
    if not images and not masks:
        raise EdgesegError(f"dataset folder {folder} holds no images or masks ({kinds} files in images/ and "
                           "masks/)")
    if images - masks:
        lone = images - masks
        raise EdgesegError(f"{len(lone)} image(s) in {folder / 'images'} have no mask of the same name in "
                           f"{folder / 'masks'}: {_few(lone)}; add the masks or remove the images")
    if masks - images:
        lone = masks - images
        raise EdgesegError(f"{len(lone)} mask(s) in {folder / 'masks'} have no image of the same name in "
                           f"{folder / 'images'}: {_few(lone)}; add the images or remove the masks")
    return sorted(check_id(f"{dataset}/{n}", where=str(folder)) for n in images)


def _all_split(spec: str, root: Path) -> list[str]:
    dataset = spec[len(ALL_PREFIX):]
    if dataset in ("", ".", "..") or "/" in dataset or "\\" in dataset or "\0" in dataset:
        raise EdgesegError(f"bad split spec {spec!r}; expected all:<dataset>, a folder of the data root holding "
                           "images/ and masks/")
    return _list_dataset(root, dataset)


def folder_dataset(folder: str | os.PathLike) -> tuple[Path, str]:
    """``--data DIR`` as (data root, split spec): the parent folder and ``all:<DIR's name>``, after checking
    that DIR is a folder; its contents are checked when the split is read."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise EdgesegError(f"--data {folder} {what}; give a folder holding images/ and masks/")
    path = path.resolve()
    if path.parent == path:
        raise EdgesegError(f"--data {folder} is the file system root; give a folder holding images/ and masks/")
    return path.parent, f"{ALL_PREFIX}{path.name}"


def train_val_ids(train_split: str, val_split: str | None, val_fraction: float, seed: int,
                  root: Path) -> tuple[list[str], list[str]]:
    """The (train, validation) ids of a run: ``val_split`` (disjoint from the train split), or ``val_fraction``
    of the train split carved with ``seed``."""
    train_ids = read_split(train_split, root)
    if val_split:
        val_ids = read_split(val_split, root)
        overlap = set(train_ids) & set(val_ids)
        if overlap:
            raise EdgesegError(f"validation split {val_split} shares {len(overlap)} ids with the train split "
                               f"(e.g. {sorted(overlap)[0]}); use disjoint splits or --val-fraction")
        return train_ids, val_ids
    return carve_validation(train_ids, val_fraction, seed)


def read_split(spec: str, root: Path) -> list[str]:
    """Resolve a split spec (file path, split name, or ``seeded:...``) into sorted, checked ids."""
    if spec.startswith("seeded:"):
        return _seeded_split(spec, root)
    if spec.startswith(ALL_PREFIX):
        return _all_split(spec, root)
    path = Path(spec)
    if not path.is_file():
        named = root / "splits" / f"{spec.removesuffix('.txt')}.txt"
        if not named.is_file():
            avail = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
            raise EdgesegError(f"split {spec!r} is neither a file nor a name in {root / 'splits'}; "
                               f"available: {', '.join(avail) or 'none'}")
        path = named
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_split_lines(path), 1):  # line numbers count blank and comment lines too
        sid = line.strip()
        if not sid or sid.startswith("#"):
            continue
        check_id(sid, where=f"{path}:{lineno}")
        if sid in seen:
            raise EdgesegError(f"{path}:{lineno}: {sid!r} is listed again (first on line {seen[sid]}); "
                               "remove the duplicate")
        check_pair_exists(root, sid, where=f"{path}:{lineno}")
        seen[sid] = lineno
    if not seen:
        raise EdgesegError(f"split file {path} is empty; it needs one <dataset>/<id> per line")
    return sorted(seen)


MAX_SPLIT_BYTES = 64 << 20  # a split of a million ids is ~40 MB; anything larger is not a split


def _split_lines(path: Path) -> list[str]:
    """The lines of a split file, refusing what is not a UTF-8 text file (an image or a checkpoint given as
    the split) with one line instead of a decode error."""
    hint = "a split is a text file with one <dataset>/<id> per line"
    try:
        if path.stat().st_size > MAX_SPLIT_BYTES:
            raise EdgesegError(f"split file {path} is {path.stat().st_size >> 20} MB, not a split; {hint}")
        data = path.read_bytes()
    except OSError as e:
        raise EdgesegError(f"cannot read split file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise EdgesegError(f"split file {path} is not a text file (binary data, an image?); {hint}")
    return text.splitlines()


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
    if (len(parts) != 5 or parts[4] not in ("train", "test") or not re.fullmatch(r"[0-9]{1,9}", parts[2])
            or not re.fullmatch(r"[0-9]{1,18}", parts[3]) or int(parts[2]) < 1):
        raise EdgesegError(f"bad split spec {spec!r}; expected seeded:<dataset>:<k>:<seed>:train|test with "
                           "k >= 1, e.g. seeded:kvasir-seg:4:42:train for an 80:20 split")
    _, dataset, k, seed, part = parts
    if dataset in ("", ".", "..") or "/" in dataset or "\\" in dataset:
        raise EdgesegError(f"bad split spec {spec!r}: {dataset!r} is not a dataset folder name")
    ids = _list_dataset(root, dataset)
    order = ids[:]
    random.Random(int(seed)).shuffle(order)
    n_test = round(len(ids) / (int(k) + 1))
    chosen = order[:n_test] if part == "test" else order[n_test:]
    if not chosen:
        raise EdgesegError(f"split {spec!r} is empty ({len(ids)} images in {dataset}); use a smaller k or "
                           "more images")
    return sorted(chosen)


def carve_validation(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (train, val) with a seeded shuffle of the sorted ids; both parts are non-empty."""
    if not 0.0 < fraction < 1.0:
        raise EdgesegError(f"--val-fraction must be in (0, 1), got {fraction}")
    order = sorted(ids)
    n_val = max(1, round(len(order) * fraction))
    if n_val >= len(order):
        raise EdgesegError(f"carving a validation fraction of {fraction} from {len(order)} image(s) leaves none "
                           "to train on; use a larger split, a smaller --val-fraction or --val-split")
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_hash(ids: list[str]) -> str:
    """sha256 of the sorted id list: identifies a split in checkpoints and calibration manifests."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
