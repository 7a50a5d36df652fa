"""Cross-target benchmark: export (or reuse), parity-check and profile every target x precision this host
can run, then write a table (Markdown, CSV, JSON) and plots (Dice vs p50 latency, latency histograms).
The Pareto front ignores differences below the measurement's noise: p50 latencies closer than max(2 %, the
p90 - p50 spread) and mDice closer than 1e-3 are ties (see :func:`pareto_front`).

    edgeseg benchmark [CKPT] --targets all --out bench-out/
    edgeseg benchmark --models ultraseg-108k-pranet,lite0-seg-pranet --test-split pranet-test-kvasir --out b/

With several models (``--models``) each model's artefacts go to ``out/<model>/``, and with ``--test-split``
every artefact is also scored on that split by its own runtime (on the device its parity gate used), so the
plots compare models on frames none of them trained or was selected on: one ``pareto-<target>.png`` per
target, whose front is the choice a user of that device makes.

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
from edgeseg.tolerances import DICE_TIE

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


def model_names(refs: list[str]) -> list[str]:
    """The name each model is shown and filed under: a shipped checkpoint's name, else the file's stem, or its
    folder's name for a training run's best.pt / last.pt. Two models with one name are refused."""
    from edgeseg.checkpoint import resolve_checkpoint, shipped_weights

    names = []
    for ref in refs:
        path = Path(ref)
        shipped = resolve_checkpoint(ref) == shipped_weights().get(str(ref))
        names.append(str(ref) if shipped else path.parent.name if path.stem in ("best", "last") and path.parent.name
                     else path.stem)
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None or any(not n or n.startswith(".") for n in names):
        raise EdgesegError(f"--models names two models {dup!r} (or one without a usable name): give each model a "
                           "distinct file name")
    return names


def test_scores(folder: Path, splits: list[str], root: Path) -> dict[str, float]:
    """mDice (network resolution, per image) of the artefact in ``folder`` on each split, run by its own
    runtime on the device its parity gate used."""
    from edgeseg.data import read_split
    from edgeseg.evaluate import artefact_runner, evaluate_split

    _, _, runner, contract = artefact_runner(folder)
    return {s: evaluate_split(runner, contract, root, read_split(s, root), native=False)["mdice"] for s in splits}


def benchmark_row(checkpoint, ckpt_sha, target, precision, out: Path, calib, data_root, runs, warmup,
                  threads, duration_s: float | None = None, pin_core: int | None = None,
                  test_splits: list[str] = ()) -> dict:
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
    if test_splits:
        from edgeseg.data import resolve_data_root

        row["test"] = test_scores(folder, list(test_splits), resolve_data_root(data_root))
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
                  runs: int | None = None, warmup: int | None = None, threads: int | None = None,
                  duration_s: float | None = None, pin_core: int | None = None, models: list[str] | None = None,
                  test_splits: list[str] = ()) -> list[dict]:
    """Benchmark ``checkpoint`` (or each of ``models``) on ``targets`` (None: all), scoring every artefact on
    ``test_splits`` too; ``runs``, ``warmup`` and ``threads`` default to each target's ``[profile]``. Returns
    the rows; writes the table and plots. Every option, model, split and the output folder are checked before
    the first export."""
    from edgeseg.checkpoint import resolve_checkpoint
    from edgeseg.data import read_split, resolve_data_root
    from edgeseg.fileio import file_sha256
    from edgeseg.profiling import check_timing_options
    from edgeseg.targets import get_target, list_targets

    check_timing_options(runs, warmup, duration_s, threads, pin_core)
    if models and checkpoint is not None:
        raise EdgesegError("give either a checkpoint or --models, not both")
    out = check_output(out, "folder", what="the benchmark folder")
    chosen = list_targets() if not targets or targets == ["all"] else [get_target(t) for t in targets]
    refs = list(models) if models else [checkpoint]
    names = model_names(refs) if models else [None]  # one model: its artefacts straight under ``out``
    shas = []
    for ref in refs:
        path = resolve_checkpoint(ref)
        if not path.is_file():
            raise EdgesegError(f"checkpoint {path} does not exist (see `edgeseg weights` for the shipped ones)")
        shas.append(file_sha256(path))
    for split in test_splits:
        read_split(split, resolve_data_root(data_root))
    calib = calib or DEFAULT_CALIB
    make_folder(out, "the benchmark folder")
    rows = []
    for ref, name, sha in zip(refs, names, shas):
        folder = out if name is None else make_folder(out / name, "a model's benchmark folder")
        for t in chosen:
            for p in t.precisions:
                row = benchmark_row(ref, sha, t, p, folder, calib, data_root, runs, warmup, threads, duration_s,
                                    pin_core, test_splits)
                rows.append(row if name is None else {"model": name, **row})
    write_table(rows, out, list(test_splits))
    plot(rows, out)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def columns(rows: list[dict], test_splits: list[str] = ()) -> list[str]:
    """The table's columns: ``model`` first when several models are compared, a test column per split."""
    return (["model"] if any("model" in r for r in rows) else []) + COLUMNS + [f"test {s}" for s in test_splits]


def _cells(r: dict) -> dict:
    return {**r, **{f"test {s}": v for s, v in (r.get("test") or {}).items()}}


def markdown(rows: list[dict], test_splits: list[str] = ()) -> str:
    cols = columns(rows, test_splits)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(_cells(r).get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out: Path, test_splits: list[str] = ()) -> None:
    write_atomic(out / "benchmark.md", markdown(rows, test_splits))
    write_atomic(out / "benchmark.json", json.dumps(rows, indent=2, default=str))
    table = io.StringIO(newline="")
    cols = columns(rows, test_splits)
    w = csv.DictWriter(table, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: _fmt(_cells(r).get(c)) for c in cols} for r in rows)
    write_atomic(out / "benchmark.csv", table.getvalue())


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
    """pareto.png (mDice vs p50 latency, p50..p90 as a bar, the noise-aware front of :func:`pareto_front`),
    with several models also pareto-<target>.png per target, and latency_hist.png (one histogram per timed
    row, p50 marked). The mDice is the first test split's when the rows were scored on one, else the parity
    frames'. Axes use plain numbers, never an offset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("status") == "ok"]
    if not timed:
        return
    split = next(iter(timed[0].get("test") or {}), None)
    if split is not None:  # plot (and rank) by the test split's mDice
        timed = [{**r, "mdice": r["test"][split]} for r in timed]
    ylabel = f"mDice ({split})" if split else "mDice (parity frames)"
    models = {r.get("model") for r in timed}

    def name(r, with_target=True):
        return " ".join(str(v) for v in (r.get("model"), r["target"] if with_target else None, r["precision"])
                        if v is not None)

    _pareto_plot(plt, timed, out / "pareto.png", "Dice vs latency", ylabel, name)
    if len(models) > 1:
        for target in dict.fromkeys(r["target"] for r in timed):
            _pareto_plot(plt, [r for r in timed if r["target"] == target], out / f"pareto-{target}.png",
                         f"{target}: Dice vs latency", ylabel, lambda r: name(r, with_target=False))
    fig, axes = plt.subplots(len(timed), 1, figsize=(7, 1.8 * len(timed) + 0.4), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], timed):
        ax.hist(r["samples_ms"], bins=40)
        ax.axvline(r["p50_ms"], color="C3", lw=1.5, label=f"p50 {r['p50_ms']:.3f} ms")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel(name(r).replace(" ", "\n", 1 if len(models) == 1 else 2), fontsize=7)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes[-1, 0].set_xlabel("latency (ms)")
    fig.tight_layout()
    _save(fig, out / "latency_hist.png")


def _pareto_plot(plt, timed: list[dict], path: Path, title: str, ylabel: str, label) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, r in enumerate(timed):
        ax.errorbar(r["p50_ms"], r["mdice"], xerr=[[0.0], [max(_p90(r) - r["p50_ms"], 0.0)]], fmt="o", ms=6,
                    capsize=3)
        ax.annotate(label(r), (r["p50_ms"], r["mdice"]), fontsize=8, textcoords="offset points",
                    xytext=((4, 5), (4, -12), (4, 14), (4, -21))[i % 4])  # near-ties stay legible
    front = pareto_front(timed)
    # the front's points ringed, so that a front of one point shows too
    ax.plot([r["p50_ms"] for r in front], [r["mdice"] for r in front], "k--", lw=1, marker="o", ms=13, mfc="none",
            label=f"Pareto front (ties: mDice < {DICE_TIE:g}, p50 < max(2 %, p90-p50))")
    ax.set(xlabel="p50 latency (ms); bar to p90", ylabel=ylabel, title=title)
    p50s, dices = [r["p50_ms"] for r in timed], [r["mdice"] for r in timed]
    ax.set_ylim(*_min_span(ax.get_ylim(), dices, 20 * DICE_TIE))
    ax.set_xlim(*_min_span(ax.get_xlim(), p50s, 0.2 * max(p50s)))
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
