"""edgeseg checkpoints: atomic save, safe load (``weights_only=True``), clear errors.

A checkpoint is a plain dict of tensors and primitives:
  format, format_version, model, model_kwargs, state_dict, contract (InputContract dict), config,
  splits (name -> sha256 of its sorted ids), epoch, metrics, edgeseg_version, git_sha, and in training
  checkpoints also optimizer / scheduler state.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import torch

from edgeseg import __version__
from edgeseg.contract import InputContract
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path

FORMAT = "edgeseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"  # shipped checkpoints: NAME.pt, and NAME.json with its test scores
DEFAULT_MODEL = WEIGHTS_DIR / "ultraseg-108k-pranet.pt"


def shipped_weights() -> dict[str, Path]:
    """Name -> file of every checkpoint shipped inside the package (``edgeseg weights`` lists them)."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))}


def resolve_checkpoint(ref: str | os.PathLike | None) -> Path:
    """The checkpoint file meant by ``ref``: an existing path, else a shipped checkpoint's name; None is the
    shipped default. Anything else is returned as a path (reading it then says it does not exist)."""
    if ref is None:
        return DEFAULT_MODEL
    path = Path(ref)
    if not path.exists() and str(ref) in shipped_weights():
        return shipped_weights()[str(ref)]
    return path


def make_checkpoint(model, contract: InputContract, **extra) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.model_name,
        "model_kwargs": dict(getattr(model, "build_kwargs", {})),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "contract": contract.to_dict(),
        "edgeseg_version": __version__,
        "git_sha": git_sha(),
        **extra,
    }


def git_sha() -> str | None:
    """The commit of the edgeseg source tree, when it is a git checkout (None for an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def read_checkpoint(path: str | os.PathLike | None) -> dict:
    """Load and validate a checkpoint dict from a path or a shipped name; ``None`` means the shipped default."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        raise EdgesegError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise EdgesegError(f"checkpoint {path} does not exist (shipped checkpoints, by name: "
                           f"{', '.join(shipped_weights())}; see `edgeseg weights`)")
    if not zipfile.is_zipfile(path):  # torch.save's format since 1.6, and every file edgeseg writes
        raise EdgesegError(f"{path} is not a PyTorch checkpoint (not a torch.save zip file); point at an edgeseg "
                           "checkpoint (last.pt / best.pt of a run, or one from `edgeseg import-weights`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise EdgesegError(f"{path} holds Python objects that a checkpoint never contains; edgeseg loads "
                               "only tensors and plain values (weights_only=True); point at an edgeseg "
                               "checkpoint") from None
        raise _not_a_checkpoint(path, e) from None
    except Exception as e:  # torch.load on arbitrary bytes raises almost anything (KeyError for a text file)
        raise _not_a_checkpoint(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EdgesegError(f"{path} is not an edgeseg checkpoint (a bare state_dict?); released weights are "
                           "converted with `edgeseg import-weights`")
    version = ckpt.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise EdgesegError(f"{path}: checkpoint field 'format_version' is {version!r}, not a version number; "
                           "the file was edited or damaged")
    if version > FORMAT_VERSION:
        raise EdgesegError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this edgeseg "
                           f"({FORMAT_VERSION}); upgrade edgeseg")
    check_schema(ckpt, path)
    return ckpt


def _not_a_checkpoint(path: Path, e: Exception) -> EdgesegError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EdgesegError(f"{path} is truncated or not a torch checkpoint ({first[:120]}); "
                        "re-copy it or point at another file")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Every field a loader reads: name -> (check, what it must be, required). Optional fields may be absent or None
# (training-only ones: --resume checks that they are present).
_SCHEMA = {
    "model": (lambda v: isinstance(v, str) and v != "", "a model name", True),
    "model_kwargs": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of options",
                     False),
    "state_dict": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                         for k, t in v.items()), "a dict of named tensors", True),
    "contract": (lambda v: isinstance(v, dict), "an input-contract dict", True),
    "config": (lambda v: isinstance(v, dict), "a dict", False),
    "splits": (lambda v: isinstance(v, dict), "a dict", False),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an epoch number", False),
    "best_mdice": (_is_number, "a number", False),
    "train_state": (lambda v: isinstance(v, dict), "a dict", False),
}


def check_schema(ckpt: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Refuse a checkpoint whose fields have the wrong types (right format tag, edited or foreign contents)."""
    for key, (ok, what, required) in _SCHEMA.items():
        if ckpt.get(key) is None:
            if required:
                raise EdgesegError(f"{path}: checkpoint has no {key!r} field; the file was edited or damaged")
            continue
        if not ok(ckpt[key]):
            raise EdgesegError(f"{path}: checkpoint field {key!r} is not {what} ({type(ckpt[key]).__name__}); "
                               "the file was edited or damaged")
    c = ckpt["contract"]
    size, mean, std = c.get("size"), c.get("mean"), c.get("std")
    if not _is_int(size) or size < 32 or size % 32:
        raise EdgesegError(f"{path}: contract size {size!r} is not a positive multiple of 32; the file was edited "
                           "or damaged")
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_number, v))):
            raise EdgesegError(f"{path}: contract {name} {v!r} is not None or three numbers; the file was edited "
                               "or damaged")
    if (mean is None) != (std is None) or (std is not None and not all(x > 0 for x in std)):
        raise EdgesegError(f"{path}: contract mean/std {mean!r}/{std!r} need each other and a positive std; the "
                           "file was edited or damaged")
    threshold, scale = c.get("threshold", 0.5), c.get("scale", 1 / 255)
    if not (_is_number(threshold) and 0 < threshold < 1 and _is_number(scale) and scale > 0):
        raise EdgesegError(f"{path}: contract threshold {threshold!r} / scale {scale!r} out of range; the file was "
                           "edited or damaged")


def build_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint", expect_model: str | None = None):
    """Instantiate the checkpoint's model and load its weights strictly. Returns (model, contract)."""
    from edgeseg.models import create_model

    if expect_model is not None and ckpt["model"] != expect_model:
        raise EdgesegError(f"{path} holds a {ckpt['model']!r} model, not {expect_model!r}")
    try:
        model = create_model(ckpt["model"], **ckpt.get("model_kwargs", {}))
    except (TypeError, ValueError) as e:
        raise EdgesegError(f"{path}: cannot build {ckpt['model']!r} with the recorded options "
                           f"{ckpt.get('model_kwargs')} ({e}); the file was edited or damaged") from None
    missing, unexpected = _key_mismatch(model.state_dict(), ckpt["state_dict"])
    if missing or unexpected:
        raise EdgesegError(f"{path}: weights do not fit architecture {ckpt['model']!r} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it was saved from another "
                           "architecture or edited")
    diverged = next((k for k, v in ckpt["state_dict"].items()
                     if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if diverged is not None:
        raise EdgesegError(f"{path}: weight {diverged!r} holds NaN or infinite values; the training run diverged "
                           "or the file was edited")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise EdgesegError(f"{path}: weights do not fit architecture {ckpt['model']!r}: "
                           f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return model.eval(), InputContract.from_dict(ckpt["contract"])


def load_model(path: str | os.PathLike | None = None, expect_model: str | None = None):
    """Read + build in one go (a path or a shipped name). Returns (model in eval mode, contract, checkpoint dict)."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    model, contract = build_from_checkpoint(ckpt, path, expect_model)
    return model, contract, ckpt


def _key_mismatch(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))

