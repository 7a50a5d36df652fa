"""edgeseg checkpoints: atomic save, safe load (``weights_only=True``), clear errors.

A checkpoint is a plain dict of tensors and primitives:
  format, format_version, model, model_kwargs, state_dict, contract (InputContract dict), config,
  splits (name -> sha256 of its sorted ids), epoch, metrics, edgeseg_version, git_sha, and in training
  checkpoints also optimizer / scheduler state.
"""

from __future__ import annotations

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
DEFAULT_MODEL = Path(__file__).parent / "weights" / "ultraseg-108k-pranet.pt"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def read_checkpoint(path: str | os.PathLike | None) -> dict:
    """Load and validate a checkpoint dict; ``None`` means the shipped default model."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        raise EdgesegError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgesegError(f"{path} is truncated or not a torch checkpoint ({first[:120]}); "
                           "re-copy it or point at another file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EdgesegError(f"{path} is not an edgeseg checkpoint (a bare state_dict?); released weights are "
                           "converted with `edgeseg import-weights`")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise EdgesegError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this edgeseg "
                           f"({FORMAT_VERSION}); upgrade edgeseg")
    return ckpt


def build_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint", expect_model: str | None = None):
    """Instantiate the checkpoint's model and load its weights strictly. Returns (model, contract)."""
    from edgeseg.models import create_model

    if expect_model is not None and ckpt["model"] != expect_model:
        raise EdgesegError(f"{path} holds a {ckpt['model']!r} model, not {expect_model!r}")
    model = create_model(ckpt["model"], **ckpt.get("model_kwargs", {}))
    missing, unexpected = _key_mismatch(model.state_dict(), ckpt["state_dict"])
    if missing or unexpected:
        raise EdgesegError(f"{path}: weights do not fit architecture {ckpt['model']!r} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); it was saved from another "
                           "architecture or edited")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise EdgesegError(f"{path}: weights do not fit architecture {ckpt['model']!r}: "
                           f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return model.eval(), InputContract.from_dict(ckpt["contract"])


def load_model(path: str | os.PathLike | None = None, expect_model: str | None = None):
    """Read + build in one go. Returns (model in eval mode, contract, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, contract = build_from_checkpoint(ckpt, path if path is not None else DEFAULT_MODEL, expect_model)
    return model, contract, ckpt


def _key_mismatch(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))

