"""The parity gate: an artefact, run by its own runtime, against the PyTorch model on the same real frames.

Reported (``parity.json``): ``mdice_ref`` and ``mdice`` (mean per-image Dice at network resolution, as
``edgeseg evaluate`` computes it), ``delta`` = mdice_ref - mdice, ``worst_image_drop`` (largest per-image
Dice loss), ``pixel_agreement`` (fraction of pixels whose mask, logit > 0, matches PyTorch's) and
``max_abs_logit_diff``. The export is rejected when ``delta`` exceeds the precision's budget, or when one
frame loses more than the precision's ``image_budget`` (a polyp lost on one frame while the mean holds); both
default to :data:`edgeseg.tolerances.PARITY`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.tolerances import PARITY

# Default parity split: the first frames of the validation set that training carves from pranet-train.
DEFAULT_SPLIT, DEFAULT_VAL_FRACTION, DEFAULT_SEED, DEFAULT_N = "pranet-train", 0.1, 42, 100
FEW_FRAMES = 50  # parity on fewer frames is recorded as such: a 0.001 budget means little on 4 images
BATCH = 8


class ParityFailure(Exception):
    """The artefact was built but misses its budget; the CLI exits 3 (not an input error)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Frames:
    ids: tuple[str, ...]
    x: np.ndarray           # (N, 3, S, S) float32, through the input contract
    masks: np.ndarray       # (N, S, S) bool ground truth at network size
    description: str        # how the split was chosen, for the record


def resolve_parity_ids(spec: str | None, root: Path) -> tuple[list[str], str]:
    """``spec`` (any split spec) or, by default, ``carve_validation(pranet-train, 0.1, 42)[1][:100]``."""
    from edgeseg.data.splits import carve_validation, read_split

    if spec is not None:
        return read_split(spec, root), spec
    ids = carve_validation(read_split(DEFAULT_SPLIT, root), DEFAULT_VAL_FRACTION, DEFAULT_SEED)[1][:DEFAULT_N]
    return ids, (f"carve_validation({DEFAULT_SPLIT}, {DEFAULT_VAL_FRACTION}, seed={DEFAULT_SEED})"
                 f"[val][:{DEFAULT_N}]")


def checkpoint_parity_ids(ckpt: dict, data_root=None) -> tuple[list[str], Path, str] | None:
    """The checkpoint's own validation frames (its first ``DEFAULT_N``) as (ids, data root, description), when
    its training record (config + split sha256) names them and they are found unchanged: under ``data_root``
    if given, else the root it was trained from, else the default root. None otherwise (no record, data
    moved or edited), and export then uses the default split."""
    from edgeseg.data.splits import resolve_data_root, split_hash, train_val_ids

    cfg, splits = ckpt.get("config"), ckpt.get("splits")
    if not isinstance(cfg, dict) or not isinstance(splits, dict) or not isinstance(splits.get("val"), str):
        return None
    trained_root = cfg.get("data_root")
    try:
        if data_root is None and isinstance(trained_root, str) and Path(trained_root).is_dir():
            root = Path(trained_root)
        else:
            root = resolve_data_root(data_root)
        fraction, seed = cfg.get("val_fraction"), cfg.get("seed")
        ids = train_val_ids(cfg["train_split"], cfg.get("val_split"), fraction, seed, root)[1]
        desc = str(cfg["val_split"]) if cfg.get("val_split") else \
            f"carve_validation({cfg['train_split']}, {fraction}, seed={seed})[val]"
    except (EdgesegError, KeyError, TypeError, ValueError):
        return None
    if split_hash(ids) != splits["val"]:
        return None
    return ids[:DEFAULT_N], root, f"{desc}[:{DEFAULT_N}], the checkpoint's validation frames"


def few_frames_note(n: int) -> str | None:
    """A note for the parity record when it rests on fewer than ``FEW_FRAMES`` frames, else None."""
    if n >= FEW_FRAMES:
        return None
    return (f"parity measured on only {n} frame(s) (fewer than {FEW_FRAMES}); pass --parity-split with more "
            "held-out frames for a firmer gate")


def load_frames(root: Path, ids: list[str], contract, description: str) -> Frames:
    from edgeseg.contract import resize_mask
    from edgeseg.data.io import read_pair
    from edgeseg.data.splits import image_path, mask_path

    xs, masks = [], []
    for sid in ids:
        img, mask = read_pair(image_path(root, sid), mask_path(root, sid))
        xs.append(contract.preprocess(img))
        masks.append(resize_mask(mask, contract.size).astype(bool))
    return Frames(tuple(ids), np.concatenate(xs), np.stack(masks), description)


def run_batched(fn, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch]), np.float32) for i in range(0, len(x), batch)])


def dice_per_image(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image Dice of (logit > 0) against ``masks``; 1.0 when both are empty (edgeseg.metrics rules)."""
    pred = logits[:, 0] > 0
    tp = (pred & masks).sum((1, 2))
    den = pred.sum((1, 2)) + masks.sum((1, 2))
    return np.where(den == 0, 1.0, 2.0 * tp / np.maximum(den, 1))


def measure(ref_logits: np.ndarray, logits: np.ndarray, masks: np.ndarray) -> dict:
    """The parity numbers of one artefact. Shapes: logits (N, 1, S, S), masks (N, S, S) bool."""
    if logits.shape != ref_logits.shape:
        raise EdgesegError(f"artefact output shape {logits.shape} != PyTorch output shape {ref_logits.shape}")
    d_ref, d_art = dice_per_image(ref_logits, masks), dice_per_image(logits, masks)
    mdice_ref, mdice = float(d_ref.mean()), float(d_art.mean())
    return {
        "mdice_ref": mdice_ref,
        "mdice": mdice,
        "delta": mdice_ref - mdice,
        "worst_image_drop": float((d_ref - d_art).max()),
        "pixel_agreement": float(((ref_logits > 0) == (logits > 0)).mean()),
        "max_abs_logit_diff": float(np.abs(ref_logits - logits).max()),
        "n_images": int(len(masks)),
    }


def budget(precision: str, max_delta: float | None) -> float:
    return PARITY[precision].max_delta if max_delta is None else float(max_delta)


def image_budget(precision: str, max_image_drop: float | None) -> float:
    return PARITY[precision].max_image_drop if max_image_drop is None else float(max_image_drop)


def passed(p: dict) -> bool:
    """The gate's decision on a parity record: mDice delta within ``budget`` and the worst frame's drop within
    ``image_budget`` (records written before that bound existed have none)."""
    return p["delta"] <= p["budget"] and p["worst_image_drop"] <= p.get("image_budget", float("inf"))


def failure(p: dict) -> str:
    """Why a record failed its gate, in a few words."""
    if p["delta"] > p["budget"]:
        return f"delta {p['delta']:+.4f} over budget {p['budget']}"
    return f"worst_image_drop {p['worst_image_drop']:.4f} over image budget {p['image_budget']}"


def summary_line(target_id: str, precision: str, p: dict) -> str:
    image = f" (budget {p['image_budget']})" if "image_budget" in p else ""
    return (f"{target_id} {precision}: delta {p['delta']:+.5f} (budget {p['budget']}) mdice_ref "
            f"{p['mdice_ref']:.4f} mdice {p['mdice']:.4f} worst_image_drop {p['worst_image_drop']:.4f}{image} "
            f"pixel_agreement {p['pixel_agreement']:.5f} max_abs_logit_diff {p['max_abs_logit_diff']:.3g} "
            f"on {p['n_images']} images" + (" (few frames)" if p.get("few_frames") else "")
            + (f", f16 {f16}" if (f16 := p.get("runtime", {}).get("f16")) else ""))
