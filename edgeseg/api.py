"""The Python API, with the same checks as the command line (bad input raises :class:`EdgesegError`)::

    from edgeseg import api

    model = api.load("ultraseg-108k-pranet")                # a checkpoint path or shipped name, or an artefact
    mask = model.predict(rgb)                                # (H, W) bool for an RGB uint8 (H, W, 3) frame
    scores = model.evaluate("pranet-test-kvasir")            # metrics on a split, as a dict
    scores = api.evaluate("art/ov", "pranet-test-kvasir")    # what `edgeseg evaluate` prints, as a dict
    result = api.export("ultraseg-108k-pranet", "openvino-cpu", "art/ov")   # parity-gated, like the CLI
    deployed = api.load(result.path)                         # the artefact, run by its own runtime

A checkpoint runs in PyTorch; an artefact folder (what ``edgeseg export`` writes) runs with its own runtime and
needs only that runtime installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeseg.contract import InputContract
from edgeseg.errors import EdgesegError
from edgeseg.export import export  # noqa: F401  (part of the API: checkpoint -> parity-gated artefact)

__all__ = ["Segmenter", "load", "evaluate", "export"]


@dataclass
class Segmenter:
    """A loaded model: ``logits`` maps a (B, 3, S, S) float32 batch (the input contract's preprocessing) to
    (B, 1, S, S) float32 logits."""
    logits: Callable[[np.ndarray], np.ndarray]
    contract: InputContract
    info: dict = field(default_factory=dict)  # kind ("checkpoint" | "artefact"), model, path, target, precision

    def predict(self, rgb: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The (H, W) bool mask of one RGB uint8 (H, W, 3) frame, at the frame's own size; a pixel is
        foreground where its probability exceeds ``threshold`` (default: the contract's, 0.5)."""
        from edgeseg.predict import predict_frames

        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
            raise EdgesegError(f"predict takes one RGB uint8 frame of shape (H, W, 3), got {rgb.dtype} "
                               f"{rgb.shape}")
        frame = next(predict_frames(self.logits, self.contract, iter([("frame", lambda: rgb)]), threshold))
        return frame.mask

    def evaluate(self, split: str = "pranet-test-kvasir", data_root: str | os.PathLike | None = None,
                 overlays: str | os.PathLike | None = None) -> dict:
        """Metrics on a split (a name, a list file or a ``seeded:``/``all:`` spec), as ``edgeseg evaluate``."""
        from edgeseg.data import read_split, resolve_data_root
        from edgeseg.evaluate import evaluate_split

        root = resolve_data_root(data_root)
        result = evaluate_split(self.logits, self.contract, root, read_split(split, root),
                                overlays=None if overlays is None else Path(overlays))
        return {**result, "model": self.info.get("model"), "split": split}


def load(source: str | os.PathLike | None = None, threads: int | None = None) -> Segmenter:
    """A checkpoint (a path or a shipped name, see ``edgeseg weights``; None is the shipped model) or an
    exported artefact folder (or a model file in one), run with ``threads`` threads (None: the default)."""
    path = None if source is None else Path(source)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise EdgesegError(f"threads must be a positive integer, got {threads!r}")
    if _is_artefact(path):
        from edgeseg.export import make_runner, open_artefact

        folder, config = open_artefact(path)
        info = {"kind": "artefact", "path": str(folder), "model": config["model"], "target": config["target"],
                "precision": config["precision"]}
        return Segmenter(make_runner(folder, config, threads=threads),
                         InputContract.from_dict(config["input_contract"]), info)
    from edgeseg.checkpoint import load_model, resolve_checkpoint
    from edgeseg.evaluate import torch_logits_fn

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    model, contract, ckpt = load_model(path)
    info = {"kind": "checkpoint", "path": str(resolve_checkpoint(path)), "model": ckpt["model"]}
    return Segmenter(torch_logits_fn(model), contract, info)


def _is_artefact(path: Path | None) -> bool:
    # A .pt file is a checkpoint even beside a config.json (a training run folder holds one too).
    return path is not None and (path.is_dir() or (path.suffix != ".pt" and (path.parent / "config.json").is_file()))


def evaluate(source: str | os.PathLike | None = None, split: str = "pranet-test-kvasir",
             data_root: str | os.PathLike | None = None, overlays: str | os.PathLike | None = None,
             reference: str | os.PathLike | None = None) -> dict:
    """``edgeseg evaluate``: the metrics of a checkpoint (PyTorch; a path, a shipped name, None for the shipped
    model) or of an exported artefact, run by its own runtime on the device its parity gate used and compared
    with the checkpoint it came from (``reference``, or the shipped checkpoint it records), on a split."""
    from edgeseg.data import read_split, resolve_data_root
    from edgeseg.evaluate import evaluate_artefact

    path = None if source is None else Path(source)
    if reference is not None and not _is_artefact(path):
        raise EdgesegError("--reference applies to an artefact folder (evaluate ARTEFACT --reference CKPT)")
    if not _is_artefact(path):
        return load(path).evaluate(split, data_root, overlays)
    root = resolve_data_root(data_root)
    result = evaluate_artefact(path, root, read_split(split, root), None if reference is None else Path(reference),
                               None if overlays is None else Path(overlays))
    return {**result, "split": split}
