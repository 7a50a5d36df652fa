"""Single pinned core: PyTorch eager (1 thread, the seed papers' 50 warm-up / 1000 runs protocol) against the
exported artefacts of one or more checkpoints, all measured in this one process run, printed as ms, as ratios to
each checkpoint's own PyTorch eager and, per checkpoint, int8 against fp32 of the same runtime; plus end-to-end
video FPS (decode -> preprocess -> infer -> threshold/overlay) on real CVC-ClinicDB frames.

    python bench/single_core.py [CKPT ...] --artefacts bench-out/onnx-fp32 bench-out/openvino-cpu-int8 ... --core 0

Artefacts come from ``edgeseg export`` / ``edgeseg benchmark``; each is timed with its own runtime at 1 thread
and grouped under the checkpoint it was exported from (matched by the checkpoint's sha256 in its config.json).
Several checkpoints compare model families side by side, e.g. ``lite0-seg-pranet ultraseg-108k-pranet``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from edgeseg.checkpoint import load_model, resolve_checkpoint
from edgeseg.data.splits import resolve_data_root
from edgeseg.export.parity import passed
from edgeseg.fileio import file_sha256
from edgeseg.profiling import cpu_model, pin_to_core, profile_artefact, time_runner


def cvc_video(root: Path, out: Path, n: int = 200) -> Path:
    """The first ``n`` CVC-ClinicDB frames (consecutive video frames) as an MJPG .avi."""
    frames = [cv2.imread(str(root / "cvc-clinicdb" / "images" / f"{i}.jpg")) for i in range(1, n + 1)]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, frames[0].shape[1::-1])
    for f in frames:
        writer.write(f)
    writer.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", default=[None], help="checkpoints or shipped names (default: the "
                    "shipped model)")
    ap.add_argument("--artefacts", nargs="*", default=[], help="exported artefact folders of these checkpoints")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()

    pin_to_core(args.core)
    torch.set_num_threads(1)
    groups = {}  # checkpoint sha256 -> (model name, eager p50, rows)
    for ref_ in args.checkpoints or [None]:
        path = resolve_checkpoint(ref_)
        model, contract, ckpt = load_model(path)
        x = torch.from_numpy(contract.preprocess(np.random.default_rng(0).integers(
            0, 256, (contract.size,) * 2 + (3,), dtype=np.uint8)))
        with torch.inference_mode():
            ref = time_runner(lambda: model(x), args.warmup, args.runs).stats
        groups[file_sha256(path)] = (f"{ckpt['model']} ({path.name})", ref.p50_ms,
                                     [("pytorch eager fp32", ref.p50_ms, ref.p90_ms, ref.fps, None, None)])
    with tempfile.TemporaryDirectory() as tmp:
        video = cvc_video(resolve_data_root(args.data_root), Path(tmp) / "cvc.avi")
        for art in args.artefacts:
            config = json.loads((Path(art) / "config.json").read_text())
            sha = config.get("checkpoint", {}).get("sha256")
            if sha not in groups:
                raise SystemExit(f"{art} was exported from {config.get('checkpoint', {}).get('file')}, not from one "
                                 "of the checkpoints given")
            r = profile_artefact(art, threads=1, warmup=args.warmup, runs=args.runs, end_to_end=video)
            parity = json.loads((Path(art) / "parity.json").read_text())
            gate = "" if passed(parity) else " REJECTED"  # over its parity budget
            groups[sha][2].append((f"{r['target']} {r['precision']}{gate}", r["p50_ms"], r["p90_ms"], r["fps"],
                                   r["end_to_end"]["fps"], parity["delta"]))
    print(f"one pinned core ({args.core}) of {os.cpu_count()} ({cpu_model() or 'CPU unknown'}), {args.warmup} "
          f"warm-up + {args.runs} runs, batch 1, {contract.size}x{contract.size}")
    for name, eager, rows in groups.values():
        print(f"\n{name}")
        print(f"{'engine':32}{'p50 ms':>10}{'p90 ms':>10}{'FPS':>9}{'x PyTorch':>11}{'video FPS':>11}"
              f"{'mDice delta':>13}")
        for engine, p50, p90, fps, video_fps, delta in rows:
            vf = f"{video_fps:11.1f}" if video_fps is not None else f"{'-':>11}"
            dl = f"{delta:+13.4f}" if delta is not None else f"{'-':>13}"
            print(f"{engine:32}{p50:10.2f}{p90:10.2f}{fps:9.1f}{eager / p50:11.2f}{vf}{dl}")
        p50 = {engine: p for engine, p, *_ in rows}
        for runtime in sorted({e.rsplit(" ", 1)[0] for e in p50}):
            if f"{runtime} int8" in p50 and f"{runtime} fp32" in p50:
                print(f"{runtime}: int8 / fp32 p50 = {p50[f'{runtime} int8'] / p50[f'{runtime} fp32']:.2f}")


if __name__ == "__main__":
    main()
