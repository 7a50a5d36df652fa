"""Where the time goes inside OpenVINO artefacts: per-op-type (and slowest single ops) milliseconds per frame on
one pinned core, 1 thread, from OpenVINO's own counters (PERF_COUNT), for several artefacts side by side.

    python bench/op_profile.py art/ov-fp32 art/ov-int8 [--core 1] [--runs 200] [--top 12]

Each artefact is compiled as its config.json records for the CPU (precision hint included), timed with
PERF_COUNT on, and the counters averaged over ``--runs`` inferences after a warm-up. The per-op sum is a little
below the wall-clock p50 (the gaps between ops are not counted); the wall p50 is printed too.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from edgeseg.contract import InputContract
from edgeseg.export import open_artefact
from edgeseg.profiling import cpu_model, pin_to_core


def profile(folder: Path, runs: int, warmup: int) -> tuple[float, collections.Counter, collections.Counter]:
    import openvino as ov

    folder, config = open_artefact(folder)
    if config["backend"] != "openvino":
        raise SystemExit(f"{folder} is a {config['backend']} artefact; this bench reads OpenVINO's counters")
    props = dict(config["backend_config"]["compile"].get("CPU", {}), INFERENCE_NUM_THREADS=1, PERF_COUNT=True)
    compiled = ov.Core().compile_model(str(folder / config["artefact"]), "CPU", props)
    request = compiled.create_infer_request()
    contract = InputContract.from_dict(config["input_contract"])
    x = contract.preprocess(np.random.default_rng(0).integers(0, 256, (contract.size,) * 2 + (3,), dtype=np.uint8))
    for _ in range(warmup):
        request.infer({0: x})
    by_type, by_op, wall = collections.Counter(), collections.Counter(), []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer({0: x})
        wall.append(time.perf_counter() - t0)
        for p in request.profiling_info:
            ms = p.real_time.total_seconds() * 1e3 / runs
            by_type[f"{p.node_type} ({p.exec_type})"] += ms
            by_op[f"{p.node_name} [{p.node_type}, {p.exec_type}]"] += ms
    return float(np.median(wall) * 1e3), by_type, by_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artefacts", nargs="+", type=Path, help="OpenVINO artefact folders (edgeseg export)")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--top", type=int, default=12, help="how many op types and single ops to list")
    args = ap.parse_args()
    pin_to_core(args.core)
    print(f"one pinned core ({args.core}), 1 thread, {cpu_model() or 'CPU unknown'}; ms per frame, mean of "
          f"{args.runs} runs")
    for folder in args.artefacts:
        wall, by_type, by_op = profile(folder, args.runs, args.warmup)
        config = json.loads((folder / "config.json").read_text())
        print(f"\n{folder}: {config['model']} {config['target']} {config['precision']}: wall p50 {wall:.2f} ms, "
              f"counted {sum(by_type.values()):.2f} ms")
        for name, ms in by_type.most_common(args.top):
            print(f"  {ms:7.3f}  {name}")
        print("  slowest single ops:")
        for name, ms in by_op.most_common(args.top):
            print(f"  {ms:7.3f}  {name}")


if __name__ == "__main__":
    main()
