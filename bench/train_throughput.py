"""Training throughput (images/s) of the students and teachers at 256x256, batch 8, on this CPU.

    python bench/train_throughput.py                      # all students/teachers, eager | channels_last | compile
    python bench/train_throughput.py --models ultraseg-108k --modes eager channels_last bf16 --steps 20
    python bench/train_throughput.py --epochs ultraseg-108k  # whole epochs of `edgeseg train`, per set-up

Each configuration runs full training steps (forward, deep-supervision loss, backward, AdamW step) on real
augmented PraNet frames. The modes of one model are measured back to back in the same process, so their
ratios are comparable even on a noisy 2-core machine; absolute numbers move with the machine's load.

``--epochs MODEL`` instead runs real 2-epoch trainings (`edgeseg train`, data loading, validation and
checkpoints included) one after another, one per set-up in SETUPS (threads x processes, batch size, bf16,
torch.compile), and prints each one's training images/s of epoch 2 and its seconds per epoch (training +
validation + checkpoint), from which the wall time of a 100-epoch run follows.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeseg.contract import InputContract
from edgeseg.data import Augment, SegDataset, load_decoded, read_split, resolve_data_root
from edgeseg.losses import SegLoss
from edgeseg.models import create_model

STUDENTS = ["ultraseg-108k", "ultraseg-130k", "microaunet", "microaunet-84k"]
TEACHERS = ["malunet", "ultraseg-500k", "ultraseg-1m", "unet-small"]
MODES = ["eager", "channels_last", "compile"]


def measure(name: str, mode: str, batches: list, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = create_model(name).train()
    cl = mode in ("channels_last", "compile", "bf16")
    if cl:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if mode == "compile" else model
    crit = SegLoss(model.region_weights, model.boundary_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i):
        x, mask, bnd = batches[i % len(batches)]
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = net(x)
        loss = crit(out, mask, bnd)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):  # includes torch.compile's compilation
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batches[0][0].shape[0] / (time.perf_counter() - t0)


# name -> (processes, extra `edgeseg train` options); batch sizes are per process
SETUPS = {
    "1 process x 2 threads, batch 8": (1, ["--threads", "2", "--batch-size", "8"]),
    "2 processes x 1 thread, batch 4 (global 8)": (2, ["--threads", "1", "--batch-size", "4"]),
    "1 process x 2 threads, batch 16": (1, ["--threads", "2", "--batch-size", "16"]),
    "1 process x 2 threads, batch 8, bf16": (1, ["--threads", "2", "--batch-size", "8", "--bf16"]),
    "1 process x 2 threads, batch 8, compile": (1, ["--threads", "2", "--batch-size", "8", "--compile"]),
}


def epoch_setups(model: str, data_root: str | None, cache_dir: str | None) -> None:
    print(f"{model}: 2-epoch runs of `edgeseg train` on pranet-train; epoch 2 measured")
    print(f"{'set-up':48}{'train img/s':>12}{'s/epoch':>9}{'100 epochs':>12}")
    for name, (procs, options) in SETUPS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "edgeseg.cli", "train", "--model", model, "--epochs", "2", "--out", str(out),
                   *options, *(["--data-root", data_root] if data_root else []),
                   *(["--cache-dir", cache_dir] if cache_dir else [])]
            if procs > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                       "-m", "edgeseg.cli", *cmd[3:]]
            env = {**os.environ, "OMP_NUM_THREADS": options[options.index("--threads") + 1]}
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            saves = []  # the times last.pt was written: one per finished epoch
            while proc.poll() is None:
                time.sleep(0.2)
                if (out / "last.pt").is_file() and (not saves or (out / "last.pt").stat().st_mtime > saves[-1]):
                    saves.append((out / "last.pt").stat().st_mtime)
            if proc.returncode:
                raise SystemExit(f"{name}: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
            saves = sorted({*saves, (out / "last.pt").stat().st_mtime})
            if len(saves) < 2:
                raise SystemExit(f"{name}: did not see epoch 1's checkpoint being written")
            rows = list(csv.DictReader((out / "metrics.csv").open()))
        rate = float(rows[1]["img_per_s"])
        per_epoch = saves[-1] - saves[0]  # epoch 2: training, validation and checkpoints
        print(f"{name:48}{rate:12.1f}{per_epoch:9.1f}{100 * per_epoch / 60:9.0f} min", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=STUDENTS + TEACHERS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES + ["bf16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=None, help="decoded-sample cache for --epochs runs")
    ap.add_argument("--epochs", metavar="MODEL", default=None, help="measure whole epochs of this model instead")
    args = ap.parse_args()
    if args.epochs:
        return epoch_setups(args.epochs, args.data_root, args.cache_dir)
    torch.set_num_threads(args.threads)

    root = resolve_data_root(args.data_root)
    ids = read_split("pranet-train", root)[:: max(1, 1450 // (args.batch_size * 8))][: args.batch_size * 8]
    ds = SegDataset(load_decoded(root, ids, 256), InputContract(), Augment(seed=0))
    batches = []
    for b in range(0, len(ds), args.batch_size):
        items = [ds[i] for i in range(b, b + args.batch_size)]
        batches.append(tuple(torch.from_numpy(np.stack(t)) for t in zip(*items)))

    print(f"images/s, batch {args.batch_size}, 256x256, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':16}" + "".join(f"{m:>15}" for m in args.modes) + "   best")
    for name in args.models:
        rates = {m: measure(name, m, batches, args.steps, args.warmup) for m in args.modes}
        best = max(rates, key=rates.get)
        print(f"{name:16}" + "".join(f"{rates[m]:15.1f}" for m in args.modes) + f"   {best} "
              f"({rates[best] / rates[args.modes[0]]:.2f}x {args.modes[0]})", flush=True)


if __name__ == "__main__":
    main()
