"""Import the UltraSeg authors' released weights into an edgeseg checkpoint.

The released file is a bare ``state_dict`` of their 2-logit ``UltraSeg130``. Our module tree was laid out to
mirror theirs, so every released prefix maps to the same prefix here; the map below is still written out
prefix by prefix so that a file with any key outside it (another architecture, a different release) is
refused instead of half-loaded.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from edgeseg.checkpoint import make_checkpoint, save_atomic
from edgeseg.contract import InputContract
from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256
from edgeseg.models._registry import create_model

# released prefix -> our prefix (UltraSeg-130K).
ULTRASEG_130K_KEY_MAP = {
    "attention_alpha": "attention_alpha",
    **{f"encoder{i}.": f"encoder{i}." for i in range(1, 5)},
    "multiscale_fusion.": "multiscale_fusion.",
    "bottleneck.": "bottleneck.",
    **{f"Down{i}.": f"Down{i}." for i in range(1, 4)},
    **{f"merge{i}.": f"merge{i}." for i in range(1, 5)},
    **{f"decoder{i}.": f"decoder{i}." for i in range(1, 5)},
    "pred1.": "pred1.",
    **{f"gate{i}.": f"gate{i}." for i in range(1, 4)},
    **{f"ebn{i}.": f"ebn{i}." for i in range(1, 5)},
    **{f"dbn{i}.": f"dbn{i}." for i in range(1, 5)},
    "final.": "final.",
}
KEY_MAPS = {"ultraseg-130k": (ULTRASEG_130K_KEY_MAP, {"num_classes": 2})}


def map_keys(state_dict: dict, key_map: dict[str, str]) -> dict:
    """Rename released keys through ``key_map``; any key no prefix covers is an error."""
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in key_map if key == p or (p.endswith(".") and key.startswith(p))), None)
        if prefix is None:
            raise EdgesegError(f"released key {key!r} is not in the {len(key_map)}-entry key map; "
                               "these weights are not the UltraSeg-130K release")
        out[key_map[prefix] + key[len(prefix):]] = value
    return out


def import_released(model_name: str, weights: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Map, strictly load and save released weights as an edgeseg checkpoint. Returns ``out``."""
    if model_name not in KEY_MAPS:
        raise EdgesegError(f"no released-weights key map for {model_name!r}; available: {', '.join(KEY_MAPS)}")
    weights = Path(weights)
    if not weights.is_file():
        raise EdgesegError(f"released weights {weights} do not exist")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError):
        raise EdgesegError(f"{weights} is truncated or not a torch state_dict") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EdgesegError(f"{weights} is not a bare state_dict of tensors")
    key_map, kwargs = KEY_MAPS[model_name]
    model = create_model(model_name, **kwargs)
    try:
        model.load_state_dict(map_keys(sd, key_map), strict=True)
    except RuntimeError as e:
        raise EdgesegError(f"{weights} does not load strictly into {model_name}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    # The authors' preprocessing: RGB, bilinear resize to 256, /255, no mean/std; mask = argmax of 2 logits
    # (our 2-class head emits fg - bg, so logit > 0 is exactly that argmax).
    ckpt = make_checkpoint(model.eval(), InputContract(size=256), epoch=None,
                           source={"file": weights.name, "sha256": file_sha256(weights), "kind": "released"})
    return save_atomic(ckpt, out)
