"""edgeseg benchmark: every row measured or marked with why not; table files and plots written."""

from __future__ import annotations

import csv
import json
import os



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
    assert header == ["target", "precision", "status", "size_kb", "mdice", "delta", "p50_ms", "p99_ms", "fps",
                      "threads", "runtime"]
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
