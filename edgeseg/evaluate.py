"""Evaluation of a model (or any ``logits_fn``) on a split, at network and at native mask resolution.

    edgeseg evaluate CKPT --split pranet-test-kvasir --json out.json --overlays worst/

Network resolution: the prediction at ``size`` x ``size`` against the mask resized with nearest neighbour
(the seed papers' protocol). Native: the logits bilinearly resized to the mask's own size.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from edgeseg.contract import InputContract, resize_mask
from edgeseg.data.io import read_pair
from edgeseg.data.splits import image_path, mask_path
from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path, make_folder, write_atomic
from edgeseg.metrics import SegMetrics

LogitsFn = Callable[[np.ndarray], np.ndarray]  # (B, 3, S, S) float32 -> (B, 1, S, S) float32 logits


def torch_logits_fn(model) -> LogitsFn:
    """Wrap a torch model in eval mode as a numpy logits function."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def evaluate_split(logits_fn: LogitsFn, contract: InputContract, root: Path, ids: list[str],
                   batch_size: int = 16, native: bool = True, overlays: Path | None = None,
                   n_worst: int = 8) -> dict:
    """Score ``logits_fn`` on ``ids``. Returns the network-resolution metrics at the top level (keys
    ``mdice, miou, dice_global, acc, spe, sen, hd95, mae, n_images``), ``native`` (the same at the masks'
    own resolution), ``size`` and ``worst`` (the lowest-Dice images)."""
    net, nat = SegMetrics(), SegMetrics()
    frames: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            pairs = list(pool.map(lambda s: read_pair(image_path(root, s), mask_path(root, s)), chunk))
            logits = logits_fn(np.concatenate([contract.preprocess(img) for img, _ in pairs]))[:, 0]
            for sid, (img, mask), z in zip(chunk, pairs, logits):
                net.update(_sigmoid(z), resize_mask(mask, contract.size).astype(bool), name=sid)
                if native:
                    zn = cv2.resize(z, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
                    nat.update(_sigmoid(zn), mask.astype(bool), name=sid)
                if overlays is not None:
                    frames[sid] = (img, mask, z)
    result = {**net.compute(), "size": contract.size}
    if native:
        result["native"] = nat.compute()
    worst = sorted(net.per_image(), key=lambda r: r["dice"])[:n_worst]
    result["worst"] = [{"id": r["name"], "dice": r["dice"]} for r in worst]
    if overlays is not None:
        write_overlays(overlays, [(r["name"], *frames[r["name"]], r["dice"]) for r in worst], contract.size)
    return result


PRED_RGB = (255, 220, 0)  # overlay colour of the predicted contour (yellow)
GT_RGB = (0, 255, 0)  # overlay colour of the ground-truth contour (green)


def overlay(img: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, legend: bool = True) -> np.ndarray:
    """RGB frame with the predicted contour in yellow and (optionally) the ground truth in green; with
    ``legend`` a small key in the top-left corner names the colours shown."""
    out = img.copy()
    if gt is not None:
        cs, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, cs, -1, GT_RGB, 2)
    cs, _ = cv2.findContours(pred.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, cs, -1, PRED_RGB, 2)
    if legend:
        draw_legend(out, [("prediction", PRED_RGB)] + ([("ground truth", GT_RGB)] if gt is not None else []))
    return out


def draw_legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """Draw (in place) a key of coloured line samples and labels on a darkened box, top-left, sized to the
    image (legible on 64 px thumbnails and on HD frames alike)."""
    h, w = img.shape[:2]
    scale = float(np.clip(min(h, w) / 700, 0.3, 1.2))
    thick = max(1, round(scale * 1.5))
    pad, line = max(2, round(6 * scale)), max(6, round(24 * scale))
    sizes = [cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0] for label, _ in entries]
    row_h = max(th for _, th in sizes) + pad
    box_w = min(w, pad * 3 + line + max(tw for tw, _ in sizes))
    box_h = min(h, pad + row_h * len(entries))
    region = img[:box_h, :box_w]
    region[:] = (region * 0.35).astype(img.dtype)  # darkened, so the labels read on any frame
    for i, ((label, colour), (_, th)) in enumerate(zip(entries, sizes)):
        base = pad + row_h * i + th
        y = base - th // 2
        cv2.line(img, (pad, y), (pad + line, y), colour, max(2, thick))
        cv2.putText(img, label, (pad * 2 + line, base), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    return img


def write_overlays(folder: Path, items, size: int) -> None:
    """One PNG per item, each written to a temp name and renamed; an unwritable folder is an EdgesegError."""
    folder = make_folder(folder, "the --overlays folder")
    for rank, (sid, img, mask, z, d) in enumerate(items, 1):
        zn = cv2.resize(z, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
        vis = overlay(img, zn > 0, mask)
        path = folder / f"{rank:02d}_{sid.replace('/', '_')}_dice{d:.3f}.png"
        with atomic_path(path) as tmp:
            if not cv2.imwrite(str(tmp), cv2.cvtColor(vis, cv2.COLOR_RGB2BGR)):
                raise EdgesegError(f"cannot write {path}; check that the folder is writable")


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def artefact_runner(path: Path) -> tuple[Path, dict, LogitsFn, InputContract]:
    """(folder, config, runner, input contract) of the artefact at ``path`` (its folder or a file in it), the
    runner on the device its parity gate used (this machine's check of a GPU target)."""
    from edgeseg.export import make_runner, open_artefact

    folder, config = open_artefact(path)
    runner = make_runner(folder, config, device=config["backend_config"].get("parity_device"))
    return folder, config, runner, InputContract.from_dict(config["input_contract"])


def evaluate_artefact(folder: Path, root: Path, ids: list[str], reference: Path | None = None,
                      overlays: Path | None = None) -> dict:
    """Score an exported artefact with its own runtime, on the device its parity gate used (this machine's
    check of a GPU target), with the same keys as a checkpoint's evaluation plus ``artefact``.

    ``checkpoint`` compares it with the checkpoint it was exported from, run in PyTorch on the same frames:
    ``reference`` (refused unless its sha256 is the one config.json records) or, by default, the shipped
    checkpoint it was exported from, if it was.
    """
    from edgeseg.checkpoint import load_model, resolve_checkpoint, shipped_weights
    from edgeseg.fileio import file_sha256

    folder, config, runner, contract = artefact_runner(folder)
    recorded = config["checkpoint"]["sha256"]
    reference = None if reference is None else resolve_checkpoint(reference)
    if reference is not None and reference.is_file() and file_sha256(reference) != recorded:
        raise EdgesegError(f"--reference {reference} is not the checkpoint {folder} was exported from (sha256 "
                           f"{recorded[:16]}... in its config.json)")
    if reference is None:
        reference = next((p for p in shipped_weights().values() if file_sha256(p) == recorded), None)
    result = evaluate_split(runner, contract, root, ids, overlays=overlays)
    result["model"] = config["model"]
    result["artefact"] = {"folder": str(folder), "target": config["target"], "precision": config["precision"],
                          "runtime": getattr(runner, "effective", {})}
    if reference is not None:
        model, _, _ = load_model(reference)
        ref = evaluate_split(torch_logits_fn(model), contract, root, ids, native=False)
        result["checkpoint"] = {"file": Path(reference).name, "mdice": ref["mdice"],
                                "delta_mdice": ref["mdice"] - result["mdice"]}
    return result
