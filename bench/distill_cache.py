"""Offline (--teacher-cache) vs online logit distillation: how close the cached teacher is, and how much faster.

    python bench/distill_cache.py                                  # lite0-seg teacher, 64 frames at 256, 10 steps
    python bench/distill_cache.py --teacher runs/malunet/best.pt --frames 128 --steps 20

(a) Fidelity: the cache holds the teacher's logits of the un-augmented frame, warped with the frame's
augmentation geometry; training online, the teacher sees the augmented frame itself. Per pixel of the
augmented PraNet training frames: mean |p_cached - p_online| of the sigmoid probabilities and the fraction of
pixels whose p > 0.5 decision differs, against the frame as training sees it (colour jitter included) and with
the geometry only (what the warp alone costs).
(b) Speed: images/s of full distillation steps (student forward, teacher forward or cached logits, loss,
backward, AdamW step) with recipe logit, online and cached, in one process on the same batches, one step of
each in turn, so their ratio is comparable on a loaded machine; absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from edgeseg.checkpoint import load_model, resolve_checkpoint
from edgeseg.contract import InputContract
from edgeseg.data import Augment, SegDataset, load_decoded, read_split, resolve_data_root
from edgeseg.distill import Distiller
from edgeseg.distill.cache import compute_teacher_logits
from edgeseg.distill.distiller import teacher_for_student
from edgeseg.losses import SegLoss
from edgeseg.models import create_model
from edgeseg.profiling import cpu_model


def fidelity(teacher, data: SegDataset, augment: Augment) -> tuple[float, float]:
    """(mean |p_cached - p_online|, fraction of pixels whose p > 0.5 decision differs) over ``data``'s frames
    augmented by ``augment``; ``data`` holds the cached (un-augmented) float16 teacher logits."""
    dec, cached, warped, images = data.decoded, data.teacher_logits, [], []
    for i in range(len(dec)):
        img, _, _, t = augment(dec.images[i], dec.masks[i], dec.boundaries[i], index=i,
                               extra=cached[i].astype(np.float32))
        images.append(img)
        warped.append(t)
    p_cached = torch.sigmoid(torch.from_numpy(np.stack(warped)))
    p_online = torch.sigmoid(torch.from_numpy(compute_teacher_logits(teacher, np.stack(images), data.contract)))
    return (p_cached - p_online).abs().mean().item(), ((p_cached > 0.5) != (p_online > 0.5)).float().mean().item()


def step_fn(student_name: str, teacher, size: int, cached: bool):
    """One recipe-logit distillation step (forward, loss, backward, AdamW) of a fresh student on a batch
    (x, mask, boundary, cached teacher logits), the cached logits used or ignored; returns its seconds."""
    torch.manual_seed(0)
    student = create_model(student_name).to(memory_format=torch.channels_last)  # as training runs it
    d = Distiller(student, teacher, SegLoss(student.region_weights, student.boundary_weights), "logit", size, 1)
    d.train()
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)

    def step(batch) -> float:
        t0 = time.perf_counter()
        x, mask, bnd, t = batch
        loss = d(x.contiguous(memory_format=torch.channels_last), mask, bnd, *([t] if cached else []))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def throughput(student_name: str, teacher, batches: list, size: int, steps: int, warmup: int) -> dict[str, float]:
    """images/s of online and cached distillation steps, interleaved step by step so that a change in the
    machine's load hits both modes alike."""
    modes = {m: step_fn(student_name, teacher, size, m == "cached") for m in ("online", "cached")}
    seconds = dict.fromkeys(modes, 0.0)
    for i in range(warmup + steps):
        for mode, step in modes.items():
            took = step(batches[i % len(batches)])
            if i >= warmup:
                seconds[mode] += took
    return {m: steps * batches[0][0].shape[0] / s for m, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="lite0-seg-pranet", help="teacher checkpoint file or shipped name")
    ap.add_argument("--student", default="ultraseg-108k")
    ap.add_argument("--frames", type=int, default=64, help="PraNet training frames (spread over the split)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="augmentation seed")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_checkpoint(args.teacher)
    teacher, t_contract, _ = load_model(path)
    student = create_model(args.student)
    contract = InputContract(size=args.size, mean=student.mean, std=student.std)  # what training feeds both
    teacher = teacher_for_student(teacher, t_contract, contract, path.name)
    root = resolve_data_root(args.data_root)
    ids = read_split("pranet-train", root)
    ids = ids[:: max(1, len(ids) // args.frames)][: args.frames]
    dec = load_decoded(root, ids, args.size)
    t0 = time.perf_counter()
    logits = compute_teacher_logits(teacher, dec.images, contract, np.float16)  # what --teacher-cache stores
    build_s = time.perf_counter() - t0
    data = SegDataset(dec, contract, Augment(seed=args.seed), logits)

    print(f"CPU {cpu_model()}, torch {torch.__version__}, {args.threads} threads")
    print(f"teacher {path.name}, {len(ids)} pranet-train frames at {args.size}x{args.size}; building the cache took "
          f"{build_s:.2f} s ({len(ids) / build_s:.1f} frames/s)")
    print("(a) cached (warped) vs online teacher on the augmented frame:")
    geometry_only = Augment(seed=args.seed, brightness=0, contrast=0, saturation=0)
    for name, augment in (("as training sees it (colour jitter)", data.augment), ("geometry only", geometry_only)):
        mae, flipped = fidelity(teacher, data, augment)
        print(f"    {name:36} mean |p_cached - p_online| {mae:.4f}   decision (p > 0.5) differs on "
              f"{100 * flipped:.2f}% of pixels")

    n_batches = len(data) // args.batch_size
    if n_batches == 0:
        raise SystemExit(f"--frames {args.frames} is fewer than one batch of {args.batch_size}")
    batches = [tuple(torch.from_numpy(np.stack(t)) for t in zip(*(data[i] for i in range(b, b + args.batch_size))))
               for b in range(0, n_batches * args.batch_size, args.batch_size)]
    rates = throughput(args.student, teacher, batches, args.size, args.steps, args.warmup)
    print(f"(b) distillation steps, student {args.student}, recipe logit, batch {args.batch_size}, {args.steps} timed "
          f"steps each after {args.warmup} warm-up, interleaved:")
    print(f"    online {rates['online']:.1f} images/s   cached {rates['cached']:.1f} images/s   "
          f"speed-up {rates['cached'] / rates['online']:.2f}x")


if __name__ == "__main__":
    main()
