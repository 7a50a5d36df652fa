"""Cross-target benchmark: export (or reuse), parity-check and profile every target x precision this host
can run, then write a table (Markdown, CSV, JSON) and plots (Dice vs p50 latency, latency histograms).
The Pareto front ignores differences below the measurement's noise: p50 latencies closer than max(2 %, the
p90 - p50 spread) and mDice closer than 1e-3 are ties (see :func:`pareto_front`).

    edgeseg benchmark [CKPT] --targets all --out bench-out/

A target whose runtime is not installed, or whose device is absent (an Intel iGPU, a Jetson), is listed with
its status instead of a number: nothing in the table is estimated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from edgeseg.errors import EdgesegError
from edgeseg.export.parity import failure
from edgeseg.fileio import atomic_path, check_output, make_folder, write_atomic

COLUMNS = ["target", "precision", "status", "size_kb", "mdice", "delta", "worst_image_drop", "p50_ms", "p99_ms",
           "fps", "threads", "runtime"]
RUNTIMES = ("onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime", "tensorrt")  # runner version keys
DEFAULT_CALIB = Path(__file__).resolve().parent / "_calibration" / "pranet-train-300.json"  # calibration/, packaged


def artefact_size_kb(folder: Path) -> float:
    """Size of the artefact's model files (not its config, parity record or caches)."""
    config = json.loads((folder / "config.json").read_text())
    return sum((folder / f).stat().st_size for f in config["model_files"]) / 1024


def _reusable(folder: Path, checkpoint_sha: str) -> bool:
    """An earlier complete artefact of the same checkpoint (config, model files and parity record all intact);
    anything else is exported again."""
    from edgeseg.export import read_config

    if not folder.is_dir():
        return False
    try:
        config = read_config(folder)
        parity = json.loads((folder / "parity.json").read_text())
    except (EdgesegError, OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    measured = isinstance(parity, dict) and all(isinstance(parity.get(k), (int, float))
                                                for k in ("mdice", "delta", "budget"))
    return measured and config["checkpoint"]["sha256"] == checkpoint_sha


def benchmark_row(checkpoint, ckpt_sha, target, precision, out: Path, calib, data_root, runs, warmup,
                  threads, duration_s: float | None = None, pin_core: int | None = None) -> dict:
    """Export (or reuse) ``checkpoint`` for one target x precision under ``out``, then profile it on this host.
    Every number in the row is measured; what could not be measured is said in ``status``."""
    from edgeseg.export import ParityFailure, export, require_runtime
    from edgeseg.profiling import profile_artefact

    row = {"target": target.id, "precision": precision}
    try:
        require_runtime(target)
    except EdgesegError as e:
        return {**row, "status": f"skipped: {e}"}
    folder = out / f"{target.id}-{precision}"
    try:
        if not _reusable(folder, ckpt_sha):
            t0 = time.perf_counter()
            export(checkpoint, target.id, folder, precision=precision, data_root=data_root,
                   calib=calib if target.needs_calibration(precision) else None)
            row["export_s"] = time.perf_counter() - t0
    except ParityFailure as e:  # measured, kept as <folder>.rejected, and not profiled
        parity = json.loads((e.path / "parity.json").read_text())
        return {**row, "status": f"rejected by parity gate ({failure(parity)})",
                **_artefact_facts(e.path, parity)}
    row.update(_artefact_facts(folder, json.loads((folder / "parity.json").read_text())))
    cores = os.sched_getaffinity(0)
    try:
        prof = profile_artefact(folder, threads=threads, pin_core=pin_core, warmup=warmup, runs=runs,
                                duration_s=duration_s)
    except EdgesegError as e:  # exported and parity-checked, but this host lacks the device to time it
        return {**row, "status": f"exported; not profiled: {e}"}
    finally:
        os.sched_setaffinity(0, cores)  # --pin-core pins the timing only, not the next export
    runtime = ", ".join(f"{k} {v}" for k, v in prof["runtime"].items() if k in RUNTIMES)
    return {**row, "status": "ok", "p50_ms": prof["p50_ms"], "p99_ms": prof["p99_ms"], "fps": prof["fps"],
            "threads": prof["threads"], "runtime": runtime, "samples_ms": prof["samples_ms"]}


def _artefact_facts(folder: Path, parity: dict) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {"size_kb": artefact_size_kb(folder), "mdice": parity["mdice"], "delta": parity["delta"],
            "budget": parity["budget"], "worst_image_drop": parity["worst_image_drop"],
            "transposes": config["backend_config"].get("transpose_count")}


def run_benchmark(checkpoint, targets: list[str] | None, out: Path, data_root=None, calib=None,
                  runs: int = 200, warmup: int = 20, threads: int | None = None, duration_s: float | None = None,
                  pin_core: int | None = None) -> list[dict]:
    """Benchmark ``checkpoint`` on ``targets`` (None: all). Returns the rows; writes the table and plots.
    Every option and the output folder are checked before the first export."""
    from edgeseg.checkpoint import resolve_checkpoint
    from edgeseg.fileio import file_sha256
    from edgeseg.profiling import check_timing_options
    from edgeseg.targets import get_target, list_targets

    check_timing_options(runs, warmup, duration_s, threads, pin_core)
    out = check_output(out, "folder", what="the benchmark folder")
    chosen = list_targets() if not targets or targets == ["all"] else [get_target(t) for t in targets]
    ckpt_sha = file_sha256(resolve_checkpoint(checkpoint))
    calib = calib or DEFAULT_CALIB
    make_folder(out, "the benchmark folder")
    rows = [benchmark_row(checkpoint, ckpt_sha, t, p, out, calib, data_root, runs, warmup, threads, duration_s,
                          pin_core)
            for t in chosen for p in t.precisions]
    write_table(rows, out)
    plot(rows, out)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out: Path) -> None:
    write_atomic(out / "benchmark.md", markdown(rows))
    write_atomic(out / "benchmark.json", json.dumps(rows, indent=2, default=str))
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: _fmt(r.get(c)) for c in COLUMNS} for r in rows)
    write_atomic(out / "benchmark.csv", table.getvalue())


DICE_TIE = 1e-3  # mDice differences below this are ties (the parity frames cannot resolve them)
LATENCY_TIE_FRACTION = 0.02  # p50 differences below 2 % ...
# ... or below the slower-spread row's p90 - p50 are ties too: run-to-run noise, not a real difference.


def _p90(r: dict) -> float:
    import numpy as np

    samples = r.get("samples_ms")
    return float(np.percentile(samples, 90)) if samples else r["p50_ms"]


def latency_tie(a: dict, b: dict) -> float:
    """The p50 difference under which rows ``a`` and ``b`` count as equally fast: max(2 % of the larger p50,
    the larger of their p90 - p50 spreads)."""
    spread = max(_p90(a) - a["p50_ms"], _p90(b) - b["p50_ms"], 0.0)
    return max(LATENCY_TIE_FRACTION * max(a["p50_ms"], b["p50_ms"]), spread)


def dominates(a: dict, b: dict) -> bool:
    """``a`` beats ``b`` beyond the measurement's noise: no slower and no less accurate (within the ties
    above), and clearly faster or clearly more accurate."""
    tie = latency_tie(a, b)
    faster, slower = b["p50_ms"] - a["p50_ms"] > tie, a["p50_ms"] - b["p50_ms"] > tie
    better, worse = a["mdice"] - b["mdice"] >= DICE_TIE, b["mdice"] - a["mdice"] >= DICE_TIE
    return not slower and not worse and (faster or better)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The timed rows no other row :func:`dominates`, fastest first. Rows that tie (latency within
    :func:`latency_tie`, mDice within ``DICE_TIE``) stay on the front together: a difference the measurement
    cannot resolve never drops a target."""
    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["p50_ms"], -r["mdice"]))


def _min_span(ax_lim: tuple[float, float], values: list[float], span: float) -> tuple[float, float]:
    """Axis limits covering ``ax_lim`` and at least ``span`` wide, centred on the values: a spread smaller
    than the noise is drawn small instead of being stretched across the axis."""
    lo, hi = ax_lim
    if hi - lo >= span:
        return lo, hi
    mid = (min(values) + max(values)) / 2
    return mid - span / 2, mid + span / 2


def plot(rows: list[dict], out: Path) -> None:
    """pareto.png (mDice vs p50 latency, p50..p90 as a bar, the noise-aware front of :func:`pareto_front`)
    and latency_hist.png (one histogram per timed row, p50 marked). Axes use plain numbers, never an offset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("status") == "ok"]
    if not timed:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(timed):
        ax.errorbar(r["p50_ms"], r["mdice"], xerr=[[0.0], [max(_p90(r) - r["p50_ms"], 0.0)]], fmt="o", ms=6,
                    capsize=3)
        ax.annotate(f"{r['target']} {r['precision']}", (r["p50_ms"], r["mdice"]), fontsize=8,
                    xytext=(4, 4 if i % 2 == 0 else -12), textcoords="offset points")  # near-ties stay legible
    front = pareto_front(timed)
    ax.plot([r["p50_ms"] for r in front], [r["mdice"] for r in front], "k--", lw=1,
            label=f"Pareto front (ties: mDice < {DICE_TIE:g}, p50 < max(2 %, p90-p50))")
    ax.set(xlabel="p50 latency (ms); bar to p90", ylabel="mDice (parity frames)", title="Dice vs latency")
    p50s, dices = [r["p50_ms"] for r in timed], [r["mdice"] for r in timed]
    ax.set_ylim(*_min_span(ax.get_ylim(), dices, 20 * DICE_TIE))
    ax.set_xlim(*_min_span(ax.get_xlim(), p50s, 0.2 * max(p50s)))
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "pareto.png")
    fig, axes = plt.subplots(len(timed), 1, figsize=(7, 1.8 * len(timed) + 0.4), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], timed):
        ax.hist(r["samples_ms"], bins=40)
        ax.axvline(r["p50_ms"], color="C3", lw=1.5, label=f"p50 {r['p50_ms']:.3f} ms")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel(f"{r['target']}\n{r['precision']}", fontsize=8)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes[-1, 0].set_xlabel("latency (ms)")
    fig.tight_layout()
    _save(fig, out / "latency_hist.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
