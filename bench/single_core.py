"""Single pinned core: PyTorch eager (1 thread, the seed papers' 50 warm-up / 1000 runs protocol) against the
exported artefacts of the same checkpoint, all measured in this one process run, printed as ms and as
ratios to PyTorch; plus end-to-end video FPS (decode -> preprocess -> infer -> threshold/overlay) on real
CVC-ClinicDB frames.

    python bench/single_core.py [CKPT] --artefacts bench-out/onnx-fp32 bench-out/openvino-cpu-int8 ... --core 0

Artefacts come from ``edgeseg export`` / ``edgeseg benchmark``; each is timed with its own runtime at 1 thread.
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

from edgeseg.checkpoint import load_model
from edgeseg.data.splits import resolve_data_root
from edgeseg.profiling import pin_to_core, profile_artefact, time_runner


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
    ap.add_argument("checkpoint", nargs="?", default=None, help="default: the shipped model")
    ap.add_argument("--artefacts", nargs="*", default=[], help="exported artefact folders of the same checkpoint")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()

    pin_to_core(args.core)
    torch.set_num_threads(1)
    model, contract, ckpt = load_model(args.checkpoint)
    x = torch.from_numpy(contract.preprocess(np.random.default_rng(0).integers(0, 256, (contract.size,) * 2 + (3,),
                                                                                dtype=np.uint8)))
    with torch.inference_mode():
        ref = time_runner(lambda: model(x), args.warmup, args.runs).stats
    rows = [("pytorch eager fp32", ref.p50_ms, ref.p90_ms, ref.fps, None, None)]
    with tempfile.TemporaryDirectory() as tmp:
        video = cvc_video(resolve_data_root(args.data_root), Path(tmp) / "cvc.avi")
        for art in args.artefacts:
            r = profile_artefact(art, threads=1, warmup=args.warmup, runs=args.runs, end_to_end=video)
            parity = json.loads((Path(art) / "parity.json").read_text())
            gate = "" if parity["delta"] <= parity["budget"] else " REJECTED"  # over its parity budget
            rows.append((f"{r['target']} {r['precision']}{gate}", r["p50_ms"], r["p90_ms"], r["fps"],
                         r["end_to_end"]["fps"], parity["delta"]))
    print(f"{ckpt['model']}, one pinned core ({args.core}) of {os.cpu_count()}, {args.warmup} warm-up + "
          f"{args.runs} runs, batch 1, {contract.size}x{contract.size}")
    print(f"{'engine':32}{'p50 ms':>10}{'p90 ms':>10}{'FPS':>9}{'x PyTorch':>11}{'video FPS':>11}{'mDice delta':>13}")
    for name, p50, p90, fps, video_fps, delta in rows:
        vf = f"{video_fps:11.1f}" if video_fps is not None else f"{'-':>11}"
        dl = f"{delta:+13.4f}" if delta is not None else f"{'-':>13}"
        print(f"{name:32}{p50:10.2f}{p90:10.2f}{fps:9.1f}{ref.p50_ms / p50:11.2f}{vf}{dl}")


if __name__ == "__main__":
    main()
