"""Conversion worker for edgeseg.export.tflite, run in the litert interpreter (see that module's docstring).

Standalone on purpose: it imports torch, numpy, litert_torch and ai_edge_quantizer only, never edgeseg, so
it runs in a separate environment whose typing_extensions/pydantic pins would not suit the main one.

    python _litert_worker.py JOB.json

JOB keys: ``program`` (a torch.export .pt2 whose input is NHWC float), ``out`` (.tflite path),
``precision`` (fp32 | fp16 | int8), ``input_shape``, ``calib`` (.npy of NHWC float frames, int8 only) and
``float_ops`` (TFLite op names kept float in the int8 model), ``float_scopes`` (tensor-name regexes kept
float), ``int16_scopes`` (tensor-name regexes computed with int16 activations and int8 weights, RSQRT
excepted, ranges plain min/max), ``input_range`` ([lo, hi] of the model input, int8 only) and
``range_percentile``. Prints one ``EDGESEG_RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _convert_fp32(program_path: str, input_shape, out: Path) -> float:
    import litert_torch
    import torch

    t0 = time.perf_counter()
    module = torch.export.load(program_path).module()
    edge = litert_torch.convert(module, (torch.zeros(*input_shape),))
    edge.export(str(out))
    return time.perf_counter() - t0


def _signature_input(model_path: Path) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    sigs = Interpreter(model_path=str(model_path)).get_signature_list()
    key = next(iter(sigs))
    return key, sigs[key]["inputs"][0]


def _quantize_fp16(fp32: Path, out: Path) -> float:
    from ai_edge_quantizer import quantizer, recipe_manager, qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    t0 = time.perf_counter()
    rm = recipe_manager.RecipeManager()
    rm.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              algorithm_key=AlgorithmName.FLOAT_CASTING)
    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(rm.get_quantization_recipe())
    q.quantize(enable_progress_report=False).export_model(str(out), overwrite=True)
    return time.perf_counter() - t0


def _calibrate(q, fp32: Path, calib, input_range, percentile: float, full_range: list[str]) -> dict:
    """Activation ranges: min/max per calibration frame, then the (100 - p)th percentile of the per-frame
    minima and the p-th percentile of the maxima (p=100 is plain min/max). On UltraSeg-130K this beats
    both ai-edge-quantizer's default moving average (it under-covers, 98.5 % mask agreement) and the plain
    min/max (99.2 %): 99.3 %. Tensors matching a ``full_range`` regex (the int16 islands, whose 65,536
    levels can afford it) get the plain min/max. The model input gets the contract's exact range, so that
    with /255 and no normalisation its scale is exactly 1/255 and a uint8 pixel p is the int8 value p - 128."""
    import re

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    key, name = _signature_input(fp32)
    per_frame = [q.calibrate({key: [{name: frame[None]}]}, num_threads=1) for frame in calib]
    qsv = {}
    for tensor in per_frame[0]:
        mins = np.stack([np.asarray(f[tensor]["min"]) for f in per_frame])
        maxs = np.stack([np.asarray(f[tensor]["max"]) for f in per_frame])
        p = 100.0 if any(re.fullmatch(r, tensor) for r in full_range) else percentile
        qsv[tensor] = {"min": np.percentile(mins, 100.0 - p, axis=0).astype(mins.dtype),
                       "max": np.percentile(maxs, p, axis=0).astype(maxs.dtype)}
    if input_range is not None:
        in_name = Interpreter(model_path=str(fp32)).get_input_details()[0]["name"]
        if in_name in qsv:
            lo, hi = input_range
            qsv[in_name] = {"min": np.full_like(qsv[in_name]["min"], lo), "max": np.full_like(qsv[in_name]["max"], hi)}
    return qsv


def _quantize_int8(fp32: Path, out: Path, calib_path: str, float_ops: list[str], input_range,
                   percentile: float, float_scopes: list[str], int16_scopes: list[str]) -> tuple[float, float]:
    import numpy as np
    from ai_edge_quantizer import quantizer, recipe, qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    calib = np.load(calib_path).astype(np.float32)
    q = quantizer.Quantizer(str(fp32))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    for op in float_ops:
        q.update_quantization_recipe(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op),
                                     algorithm_key=AlgorithmName.NO_QUANTIZE)
    for regex in float_scopes:
        q.update_quantization_recipe(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                     algorithm_key=AlgorithmName.NO_QUANTIZE)
    for regex in int16_scopes:
        q.add_static_config(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                            activation_num_bits=16, weight_num_bits=8)
        # TFLite's int16 RSQRT gives different outputs on x86 and aarch64 for the same inputs (measured
        # with the reference kernels under emulation: 4 of 16 values of one GroupNorm scale, 1 LSB); its
        # int8 kernel is bit-exact, so the scale rsqrt stays int8 inside the int16 island.
        q.add_static_config(regex=regex, operation_name=qtyping.TFLOperationName.RSQRT,
                            activation_num_bits=8, weight_num_bits=8)
    t0 = time.perf_counter()
    qsv = _calibrate(q, fp32, calib, input_range, percentile, int16_scopes)
    t_cal = time.perf_counter() - t0
    q.quantize(qsv, enable_progress_report=False).export_model(str(out), overwrite=True)
    return t_cal, time.perf_counter() - t0 - t_cal


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    precision = job["precision"]
    result: dict = {"converter": {}}
    try:
        import ai_edge_litert
        import litert_torch
        import torch

        result["converter"] = {"litert_torch": litert_torch.__version__, "torch": torch.__version__,
                               "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?")}
        if precision != "fp32":
            import importlib.metadata as md

            result["converter"]["ai_edge_quantizer"] = md.version("ai-edge-quantizer")
    except ImportError as e:  # reported as a failure by the parent
        print(f"litert stack missing in {sys.executable}: {e}", file=sys.stderr)
        raise SystemExit(3)
    with tempfile.TemporaryDirectory(prefix="edgeseg-worker-") as tmp:
        fp32 = out if precision == "fp32" else Path(tmp) / "fp32.tflite"
        result["litert_convert_s"] = round(_convert_fp32(job["program"], job["input_shape"], fp32), 2)
        if precision == "fp16":
            result["quantize_s"] = round(_quantize_fp16(fp32, out), 2)
        elif precision == "int8":
            if not job.get("calib"):
                raise SystemExit("int8 needs calibration frames")
            pct = float(job.get("range_percentile", 90.0))
            scopes, int16 = job.get("float_scopes", []), job.get("int16_scopes", [])
            t_cal, t_q = _quantize_int8(fp32, out, job["calib"], job.get("float_ops", []), job.get("input_range"),
                                        pct, scopes, int16)
            result["calibrate_s"], result["quantize_s"] = round(t_cal, 2), round(t_q, 2)
            result["int8_recipe"] = (
                "ai-edge-quantizer static_wi8_ai8: int8 per-channel symmetric weights, int8 per-tensor "
                f"asymmetric activations, ranges = p{100 - pct:g}/p{pct:g} of per-frame min/max; "
                + "".join(f"int16 activations (int8 weights, RSQRT int8), ranges = plain min/max: scope {r}; "
                          for r in int16)
                + "NO_QUANTIZE: " + (", ".join(job.get("float_ops", []) + [f"scope {r}" for r in scopes]) or "none"))
    print("EDGESEG_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TQDM_DISABLE", "1")
    main(sys.argv[1])
