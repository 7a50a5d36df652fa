"""Offline ("cached") logit distillation: the teacher's logits of every training frame, computed once.

The recipes that need only the teacher's logits (``logit``, ``kdas``) can skip the teacher forward on every
student step: the teacher runs once per training frame, in eval mode, on the un-augmented decoded frame, and
its logits at the training size are kept as float16 in an .npz under ``--teacher-cache``. During training the
cached map follows the frame's geometric augmentation (:class:`edgeseg.data.Augment`), not its colour jitter.

The file is keyed by the cache format version, the teacher checkpoint's sha256, the training size, the input
contract's mean/std and the split (its ids and the sha256 of each image file), so a cache made for another
teacher, size or frame is never served: it maps to another file. A file that cannot be read back or does not
match is rebuilt with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeseg.contract import InputContract
from edgeseg.data.datasets import Decoded, check_cache_dir, read_cache_file, split_key
from edgeseg.distill.distiller import LOGIT_RECIPES
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path

log = logging.getLogger(__name__)
CACHE_VERSION = 1
OPTION = "--teacher-cache"


def check_teacher_cache(recipe: str, cache_dir: str | Path) -> None:
    """Refuse, before any work, a recipe that needs more than the teacher's logits or an unusable folder."""
    if recipe not in LOGIT_RECIPES:
        raise EdgesegError(f"{OPTION} applies to the recipes that need only the teacher's logits "
                           f"({', '.join(LOGIT_RECIPES)}), not {recipe!r}; drop {OPTION} or change --recipe")
    if not str(cache_dir).strip():
        raise EdgesegError(f"{OPTION} must name a folder")
    check_cache_dir(Path(cache_dir).expanduser(), OPTION)


@torch.inference_mode()
def compute_teacher_logits(teacher: nn.Module, images: np.ndarray, contract: InputContract,
                           dtype: type = np.float32, batch_size: int = 16) -> np.ndarray:
    """images (N, S, S, 3) RGB uint8 at network size -> the teacher's eval-mode logits (N, S, S) as ``dtype``
    (cast per batch, so float16 never holds the whole float32 array)."""
    was_training = teacher.training
    teacher.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack([contract.normalise(img) for img in images[start:start + batch_size]]))
        out.append(teacher.forward_all(x)["logits"][:, 0].float().numpy().astype(dtype))
    teacher.train(was_training)
    return np.concatenate(out)


def cached_teacher_logits(teacher: nn.Module, teacher_sha256: str, root: Path, decoded: Decoded,
                          contract: InputContract, cache_dir: str | Path) -> np.ndarray:
    """The teacher's logits (N, S, S) float16 of ``decoded`` (read from ``root``), from the cache file under
    ``cache_dir`` when it holds a valid one, else computed and written there atomically."""
    cache_dir = Path(cache_dir).expanduser()
    check_cache_dir(cache_dir, OPTION)
    n, size = len(decoded), contract.size
    key = split_key(root, decoded.ids, f"teacher-v{CACHE_VERSION}|{teacher_sha256}|{size}|{contract.mean}|"
                                        f"{contract.std}", masks=False)
    cache_file = cache_dir / f"teacher-{size}-{key[:24]}.npz"
    if cache_file.is_file():
        cached = read_cache_file(cache_file, decoded.ids, {"logits": ((n, size, size), np.float16)})
        if cached is not None:
            return cached["logits"]
    log.info("computing the teacher's logits of %d training frames once, into %s", n, cache_file)
    logits = compute_teacher_logits(teacher, decoded.images, contract, np.float16)
    with atomic_path(cache_file) as tmp:
        np.savez(tmp, ids=np.array(decoded.ids), logits=logits)
    return logits
