"""Distillation ablation on the PraNet protocol: the student alone vs each recipe, same epochs, seeds and data.

    python bench/distill_ablation.py --teacher lite0-seg-pranet --student ultraseg-108k --epochs 30 \
        --recipes none logit --seeds 0 1 2 --teacher-cache runs/teacher-cache --out runs/ablation

Every (recipe, seed) run lives in its own folder under --out and is resumed or skipped when it already
finished, so the ablation can span several sessions, and two invocations with ``--threads 1`` and disjoint
``--seeds`` use both cores (a last invocation with every seed then only prints the table).

Every run validates on the teacher's own validation carve (the carve recorded in the teacher checkpoint's
config, checked against its split hash), so no student is selected on frames its teacher trained on; a seed
sets the student's init, sampling and augmentation. The table reports mean +/- std over seeds of the
per-image mDice on the validation carve and both PraNet test lists, printed and written to ablation.md /
ablation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgeseg.checkpoint import load_model, read_checkpoint, resolve_checkpoint
from edgeseg.config import DistillConfig, build_config
from edgeseg.data import read_split, resolve_data_root, train_val_ids
from edgeseg.data.splits import split_hash
from edgeseg.distill import RECIPES
from edgeseg.distill.distiller import LOGIT_RECIPES
from edgeseg.evaluate import evaluate_split, torch_logits_fn
from edgeseg.train import run

TESTS = ("pranet-test-kvasir", "pranet-test-cvc-clinicdb")


def teacher_splits(args) -> tuple[str, str]:
    """Split files (train, val) under --out: the teacher's train split minus its validation carve, and the carve."""
    ckpt = read_checkpoint(args.teacher)
    cfg, root = ckpt["config"], resolve_data_root(args.data_root)
    train_ids, val_ids = train_val_ids(cfg["train_split"], cfg["val_split"], cfg["val_fraction"], cfg["seed"], root)
    if split_hash(val_ids) != ckpt["splits"]["val"]:
        raise SystemExit(f"cannot rebuild the validation carve of {args.teacher} from its config")
    files = []
    for name, ids in (("train", train_ids), ("val", val_ids)):
        path = Path(args.out) / f"teacher-{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(ids) + "\n")
        files.append(str(path))
    return files[0], files[1]


def one_run(args, splits: tuple[str, str], recipe: str, seed: int) -> dict:
    out = Path(args.out) / f"{recipe}-seed{seed}"
    distill = None if recipe == "none" else DistillConfig(
        teacher=str(args.teacher), recipe=recipe, stage1_epochs=args.stage1_epochs,
        teacher_cache=args.teacher_cache if recipe in LOGIT_RECIPES else None)
    cfg = build_config("default", model=args.student, epochs=args.epochs, seed=seed, threads=args.threads,
                       train_split=splits[0], val_split=splits[1], data_root=args.data_root,
                       cache_dir=args.cache_dir, out=str(out), distill=distill)
    done = (out / "last.pt").is_file() and read_checkpoint(out / "last.pt")["epoch"] >= args.epochs
    if not done:
        run(cfg, resume=(out / "last.pt").is_file())
    return test_scores(out / "best.pt", out / "test.json", args.data_root)


def test_scores(checkpoint: Path, result_file: Path, data_root) -> dict:
    """Per-image mDice of ``checkpoint`` on both PraNet test lists (256x256) and its best validation mDice,
    cached in ``result_file``."""
    if not result_file.is_file():
        model, contract, ckpt = load_model(checkpoint)
        root = resolve_data_root(data_root)
        scores = {s: evaluate_split(torch_logits_fn(model), contract, root, read_split(s, root), native=False)["mdice"]
                  for s in TESTS}
        scores["val"] = ckpt["best_mdice"]
        result_file.write_text(json.dumps(scores))
    return json.loads(result_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (or shipped name) trained on pranet-train")
    ap.add_argument("--student", default="microaunet")
    ap.add_argument("--recipes", nargs="+", default=["none", *RECIPES], choices=["none", *RECIPES])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--stage1-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--teacher-cache", default=None, help="logit, kdas: the teacher's cached logits (offline)")
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args()
    args.teacher = str(resolve_checkpoint(args.teacher))  # a file or a shipped name

    splits = teacher_splits(args)
    results = {r: [one_run(args, splits, r, s) for s in args.seeds] for r in args.recipes}
    teacher_ckpt = read_checkpoint(args.teacher)
    teacher = test_scores(Path(args.teacher), Path(args.out) / "teacher-test.json", args.data_root)
    lines = [f"Student {args.student}, {args.epochs} epochs per run, seeds {args.seeds}; teacher "
             f"{teacher_ckpt['model']} (epoch {teacher_ckpt['epoch']}). Per-image mDice at 256x256, mean +/- std "
             "over seeds; Δ = mean difference to the student alone (none).", "",
             "| recipe | val | " + " | ".join(TESTS) + " | Δ " + " | Δ ".join(TESTS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in TESTS * 2) + " |"]
    base = results.get("none")
    for recipe, runs in results.items():
        cells = [f"{np.mean([r[k] for r in runs]):.4f} +/- {np.std([r[k] for r in runs]):.4f}" for k in ("val", *TESTS)]
        cells += [f"{np.mean([r[k] for r in runs]) - np.mean([r[k] for r in base]):+.4f}" if base else "n/a"
                  for k in TESTS]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines.append(f"| teacher | {teacher['val']:.4f} | " + " | ".join(f"{teacher[k]:.4f}" for k in TESTS)
                 + " |" + " |" * len(TESTS))
    table = "\n".join(lines)
    print(table)
    Path(args.out, "ablation.md").write_text(table + "\n")
    Path(args.out, "ablation.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
