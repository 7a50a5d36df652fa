"""Export matrix: every target x precision for several checkpoints, with export time, artefact size, parity
(mDice, delta), TRANSPOSE count (tflite), and single-thread latency on this machine, plus what export-time
folding buys (PyTorch eager and ONNX Runtime latency before/after), all measured in this one run.

    python bench/export_matrix.py [--models ultraseg-108k-pranet lite0-seg-pranet ultraseg-130k microaunet]
                                  [--targets T ...] [--out bench-out/matrix]

Checkpoints: a shipped name (``edgeseg weights``) is that checkpoint; ``ultraseg-130k`` the UltraSeg authors' released
weights (imported from ../shared/weights); ``microaunet`` has no trained checkpoint in this repository, so it
is its seeded initialisation (size, latency and TRANSPOSE count are meaningful; its Dice is not).
``NAME=CKPT`` uses any checkpoint. Latency: one pinned core, 1 thread, median of ``--runs``. A TensorRT
(Jetson) row is exported and parity-checked on this CPU; its latency needs the Jetson, so it is left empty,
as is the iGPU's when this host has no Intel GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeseg.benchmark import DEFAULT_CALIB, benchmark_row
from edgeseg.checkpoint import load_model, make_checkpoint, save_atomic, shipped_weights
from edgeseg.contract import InputContract
from edgeseg.errors import EdgesegError
from edgeseg.export.prepare import LogitsOnly, prepare
from edgeseg.export.onnx import torch_to_onnx
from edgeseg.profiling import pin_to_core, time_runner
from edgeseg.targets import get_target, list_targets

AUTHORS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "ultraseg-130k-authors.pth"


def checkpoint_for(spec: str, work: Path) -> tuple[str, Path | None, str]:
    """(label, checkpoint path, note)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path), "given checkpoint"
    if spec in shipped_weights():
        return spec, shipped_weights()[spec], "shipped model"
    if spec == "ultraseg-130k":
        from edgeseg.models.authors import import_released

        return spec, import_released("ultraseg-130k", AUTHORS, work / "ultraseg-130k-authors.pt"), "authors' weights"
    from edgeseg.models import create_model

    torch.manual_seed(0)
    model = create_model(spec).eval()
    return spec, save_atomic(make_checkpoint(model, InputContract()), work / f"{spec}-init.pt"), "untrained init"


def folding(ckpt: Path | None, work: Path, runs: int) -> dict:
    """1-thread latency of the checkpoint's model before and after export-time folding, in PyTorch eager
    and as ONNX (both graphs simplified the same way) under ONNX Runtime."""
    import onnxruntime as ort

    model, contract, _ = load_model(ckpt)
    folded, report = prepare(model, contract.size)
    x = torch.from_numpy(contract.preprocess(np.random.default_rng(0).integers(0, 256, (contract.size,) * 2 + (3,),
                                                                                 dtype=np.uint8)))
    out = {"bn_folded": report["bn_folded"], "gates_folded": report["blocks_fused"].get("GSB", 0)}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    for label, module in (("before", LogitsOnly(model).eval()), ("after", folded)):
        with torch.inference_mode():
            out[f"eager_{label}_ms"] = time_runner(lambda: module(x), 20, runs).stats.p50_ms
        path = torch_to_onnx(module, contract.size, work / f"fold-{label}.onnx", {})
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        out[f"ort_{label}_ms"] = time_runner(lambda: session.run(None, {"input": xn}), 20, runs).stats.p50_ms
    return out


def matrix_rows(label: str, ckpt: Path | None, out: Path, runs: int, data_root, targets: list) -> list[dict]:
    """Every precision of ``targets`` for ``ckpt``, exported afresh under ``out/label`` and timed on 1 thread."""
    import shutil

    from edgeseg.checkpoint import resolve_checkpoint
    from edgeseg.fileio import file_sha256

    sha = file_sha256(resolve_checkpoint(ckpt))
    rows = []
    for t in targets:
        for p in t.precisions:
            for folder in (f"{t.id}-{p}", f"{t.id}-{p}.rejected"):  # export times are measured, never reused
                shutil.rmtree(out / label / folder, ignore_errors=True)
            rows.append({"model": label, **benchmark_row(ckpt, sha, t, p, out / label, DEFAULT_CALIB, data_root,
                                                         runs, 20, 1)})
    return rows


def _cell(v, fmt="{:.4f}") -> str:
    return "" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[*shipped_weights(), "ultraseg-130k", "microaunet"])
    ap.add_argument("--out", type=Path, default=Path("bench-out/matrix"))
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--targets", nargs="+", default=None, help="target ids (default: all)")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    try:
        targets = list_targets() if args.targets is None else [get_target(t) for t in args.targets]
    except EdgesegError as e:
        ap.error(str(e))

    pin_to_core(args.core)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            label, ckpt, note = checkpoint_for(spec, Path(tmp))
            model, contract, _ = load_model(ckpt)
            x = torch.from_numpy(contract.preprocess(np.zeros((contract.size,) * 2 + (3,), np.uint8)))
            with torch.inference_mode():
                eager = time_runner(lambda: model(x), 20, args.runs).stats.p50_ms
            results.append({"model": label, "note": note, "eager_ms": eager,
                            "folding": folding(ckpt, Path(tmp), args.runs),
                            "rows": matrix_rows(label, ckpt, args.out, args.runs, args.data_root, targets)})
    args.out.mkdir(parents=True, exist_ok=True)
    name = "matrix.json" if args.targets is None else f"matrix-{'-'.join(t.id for t in targets)}.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")

    print(f"one pinned core ({args.core}), 1 thread, p50 of {args.runs} runs; parity on the default parity split")
    print("| model | target | precision | status | export s | size KiB | mDice | delta | worst frame | TRANSPOSE "
          "| p50 ms | x eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            speedup = res["eager_ms"] / r["p50_ms"] if r.get("p50_ms") else None
            status = r["status"].split(":")[0]
            print(f"| {r['model']} | {r['target']} | {r['precision']} | {status} | {_cell(r.get('export_s'), '{:.1f}')} "
                  f"| {_cell(r.get('size_kb'), '{:.0f}')} | {_cell(r.get('mdice'))} | {_cell(r.get('delta'), '{:+.4f}')} "
                  f"| {_cell(r.get('worst_image_drop'))} "
                  f"| {_cell(r.get('transposes'))} | {_cell(r.get('p50_ms'), '{:.2f}')} | {_cell(speedup, '{:.2f}')} |")
    print("\nPyTorch eager (1 thread) and export-time folding (BN into convs, UltraSeg's GSB gates as constants):")
    print("| model | checkpoint | eager ms | eager folded ms | ORT unfolded ms | ORT folded ms | BN folded | gates folded |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        f = res["folding"]
        print(f"| {res['model']} | {res['note']} | {res['eager_ms']:.2f} | {f['eager_after_ms']:.2f} "
              f"| {f['ort_before_ms']:.2f} | {f['ort_after_ms']:.2f} | {f['bn_folded']} | {f['gates_folded']} |")
    for res in results:
        ov = next((r for r in res["rows"] if r["target"] == "openvino-cpu" and r["precision"] == "int8"
                   and r.get("p50_ms")), None)
        if ov:
            print(f"{res['model']}: openvino-cpu int8 is {res['eager_ms'] / ov['p50_ms']:.2f}x PyTorch eager "
                  f"(goal >= 4x), delta {ov['delta']:+.4f} (budget {ov['budget']})")
        fp32 = next((r for r in res["rows"] if r["target"] == "openvino-cpu" and r["precision"] == "fp32"
                     and r.get("p50_ms")), None)
        if ov and fp32:
            print(f"{res['model']}: openvino-cpu int8 / fp32 p50 = {ov['p50_ms'] / fp32['p50_ms']:.2f}")


if __name__ == "__main__":
    main()
