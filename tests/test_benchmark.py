"""edgeseg benchmark: every row measured or marked with why not; table files and plots written."""

from __future__ import annotations

import csv
import json
import os

import pytest

from edgeseg.tolerances import DICE_TIE


@pytest.mark.slow
def test_benchmark_rows_files_and_plots(cli, authors_ckpt, data_root, tmp_path):
    ckpt = authors_ckpt
    out = tmp_path / "bench"
    code, stdout, err = cli("benchmark", ckpt, "--targets", "onnx,tensorrt-jetson", "--runs", "5", "--warmup", "1",
                            "--out", out, "--data-root", data_root)
    assert code == 0, err
    rows = json.loads((out / "benchmark.json").read_text())
    by = {(r["target"], r["precision"]): r for r in rows}
    onnx = by[("onnx", "fp32")]
    assert onnx["status"] == "ok" and onnx["p50_ms"] > 0 and onnx["p99_ms"] >= onnx["p50_ms"]
    assert abs(onnx["delta"]) <= 0.001 and onnx["size_kb"] > 100 and len(onnx["samples_ms"]) == 5
    jetson = [r for k, r in by.items() if k[0] == "tensorrt-jetson"]
    assert jetson and all(r["status"] != "ok" and "p50_ms" not in r for r in jetson)  # never a made-up number
    assert (out / "pareto.png").stat().st_size > 0 and (out / "latency_hist.png").stat().st_size > 0
    header = next(csv.reader(open(out / "benchmark.csv")))
    assert header == ["target", "precision", "status", "size_kb", "mdice", "delta", "worst_image_drop", "p50_ms",
                      "p99_ms", "fps", "threads", "runtime"]
    assert 0 <= onnx["worst_image_drop"] <= 0.02
    assert "| onnx | fp32 | ok |" in (out / "benchmark.md").read_text() and "| onnx | fp32 | ok |" in stdout
    # A second run reuses the exported artefact of the same checkpoint instead of exporting again; --duration
    # and --pin-core apply to the timing only (the process is unpinned again afterwards).
    before = (out / "onnx-fp32" / "config.json").stat().st_mtime_ns
    cores = os.sched_getaffinity(0)
    try:
        code, _, err = cli("benchmark", ckpt, "--targets", "onnx", "--duration", "0.2", "--warmup", "1",
                           "--pin-core", min(cores), "--out", out, "--data-root", data_root)
        assert code == 0, err
        assert os.sched_getaffinity(0) == cores
    finally:
        os.sched_setaffinity(0, cores)
    assert (out / "onnx-fp32" / "config.json").stat().st_mtime_ns == before
    rows = json.loads((out / "benchmark.json").read_text())
    assert rows[0]["status"] == "ok" and len(rows[0]["samples_ms"]) >= 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files from the plots


def test_benchmark_compares_models_on_a_test_split(cli, authors_ckpt, data_root, parity16, tmp_path):
    out = tmp_path / "models"
    code, stdout, err = cli("benchmark", "--models", f"ultraseg-108k-pranet,{authors_ckpt}", "--targets", "onnx",
                            "--test-split", parity16, "--runs", "3", "--warmup", "1", "--out", out,
                            "--data-root", data_root)
    assert code == 0, err
    rows = json.loads((out / "benchmark.json").read_text())
    assert [(r["model"], r["target"], r["status"]) for r in rows] == [("ultraseg-108k-pranet", "onnx", "ok"),
                                                                       ("authors", "onnx", "ok")]
    for r in rows:  # scored by the artefact's own runtime on the test split, close to the parity frames' score
        assert (out / r["model"] / "onnx-fp32" / "model.onnx").is_file()
        assert set(r["test"]) == {str(parity16)} and 0.3 < r["test"][str(parity16)] <= 1.0
    header = next(csv.reader(open(out / "benchmark.csv")))
    assert header[:2] == ["model", "target"] and header[-1] == f"test {parity16}"
    assert "| ultraseg-108k-pranet | onnx | fp32 | ok |" in stdout
    assert (out / "pareto-onnx.png").stat().st_size > 0 and (out / "pareto.png").stat().st_size > 0
    for args, words in ((("--models", "ultraseg-108k-pranet,,x"), ("--models", "empty item")),
                        (("--models", f"{authors_ckpt},{authors_ckpt}"), ("two models", "'authors'")),
                        ((authors_ckpt, "--models", "ultraseg-108k-pranet"), ("either a checkpoint or --models",)),
                        (("--models", "no-such-model"), ("does not exist",))):
        code, _, err = cli("benchmark", *args, "--targets", "onnx", "--out", tmp_path / "bad", "--data-root", data_root)
        assert code == 2 and all(w in err for w in words) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def _row(target, p50, mdice, spread=0.0):
    samples = [p50 - spread / 2] * 10 + [p50] + [p50 + spread] * 10  # p50 at p50, p90 at p50 + spread
    return {"target": target, "precision": "fp32", "status": "ok", "p50_ms": p50, "mdice": mdice,
            "samples_ms": samples}


def test_pareto_front_ignores_differences_below_the_noise():
    from edgeseg.benchmark import dominates, pareto_front

    a, b = _row("a", 1.000, 0.834520), _row("b", 1.010, 0.834530)  # 1 % and 1e-5 apart: a tie, both kept
    assert not dominates(a, b) and not dominates(b, a)
    assert {r["target"] for r in pareto_front([a, b])} == {"a", "b"}
    slow = _row("slow", 2.0, 0.8346)  # twice as slow, Dice only 8e-5 better: dominated by a
    worse = _row("worse", 0.999, 0.80)  # no faster than a within noise, clearly less accurate
    fast = _row("fast", 0.5, 0.70)  # clearly faster, clearly worse: on the front
    assert [r["target"] for r in pareto_front([a, b, slow, worse, fast])] == ["fast", "a", "b"]
    noisy = _row("noisy", 1.3, 0.80, spread=0.5)  # 30 % slower than c, but within noisy's p90 - p50 spread
    c = _row("c", 1.0, 0.80)
    assert not dominates(c, noisy) and {r["target"] for r in pareto_front([c, noisy])} == {"c", "noisy"}


def test_plots_have_no_offset_notation_and_mark_p50(tmp_path, monkeypatch):
    import edgeseg.benchmark as bench

    figs = {}

    def keep(fig, path):
        fig.canvas.draw()
        figs[path.name] = fig
        path.write_bytes(b"png")

    monkeypatch.setattr(bench, "_save", keep)
    rows = [_row("onnx", 1.00001, 0.834521, 0.05), _row("openvino-cpu", 1.00002, 0.834531, 0.05),
            {"target": "tensorrt-jetson", "precision": "fp16", "status": "skipped: no device"}]
    bench.plot(rows, tmp_path)
    ax = figs["pareto.png"].axes[0]
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    lo, hi = ax.get_ylim()
    assert hi - lo >= 20 * DICE_TIE  # a 1e-5 Dice difference is drawn as the tie it is
    hist = figs["latency_hist.png"].axes
    assert len(hist) == 2 and all(ax.xaxis.get_offset_text().get_text() == "" for ax in hist)
    assert all(any(t.get_text().startswith("p50 ") for t in ax.get_legend().get_texts()) for ax in hist)
