"""tensorrt-jetson backend: the ONNX a Jetson builds its TensorRT engine from, made and checked here; the engine
itself is built on the Jetson by ``edgeseg build-engine``.

On the export machine (no GPU, no TensorRT)::

    edgeseg export CKPT --target tensorrt-jetson [--precision fp32|fp16|int8 --calib MANIFEST] --out ART

writes ``ART/model.onnx``:

- fp32: the simplified intermediate (opset 17).
- fp16: every float weight and activation in float16, with float32 ``input``/``logits`` (one Cast at each end),
  made by :func:`to_fp16`. The scales/roi of Resize stay float32, as the ONNX spec requires.
- int8: NNCF post-training quantization of the ONNX (``nncf.quantize(onnx.ModelProto, ...)``) into an explicit
  QuantizeLinear/DequantizeLinear (QDQ) graph: symmetric, signed int8 with zero point 0 (what TensorRT's explicit
  quantization accepts; NNCF's uint8 quantizers of non-negative tensors are rewritten as int8 ones with the same
  range), per-channel weights, the norms and gating left in float. The scales travel in the ONNX, so the engine
  build needs no calibrator.

Every model.onnx passes ``onnx.checker.check_model(full_check=True)`` and ``polygraphy check lint``, and gets a
golden pair: ``golden_input.npy`` (one real parity frame, preprocessed, (1, 3, S, S) float32) and
``golden_output.npy`` (its logits from ONNX Runtime on this CPU). ``backend_config`` in config.json records the
checks, the golden tolerance per precision, the ONNX ops missing from the TensorRT parser table below and which
runtime checked parity.

Parity here is a CPU check of the exported ONNX, never a TensorRT measurement: fp32 and int8 run on ONNX
Runtime's CPU provider (it executes the QDQ graph with int8 kernels); fp16 runs in f16 on OpenVINO's CPU plugin
(:mod:`edgeseg.export.f16`) with every tensor rounded exactly to float16, the same on every CPU (an ``f16``
hint would run as bf16 on some, and keeps many ops in f32 on others); parity.json records it. ONNX Runtime is
not used for fp16 parity: its CPU provider has no fp16 Conv/InstanceNormalization kernels and silently wraps
those nodes in Casts to float32.

The engine side (``edgeseg build-engine`` and the GPU runner) lives in :mod:`edgeseg.export.tensorrt_engine`;
:func:`load_runner` hands device None or "GPU" to it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.export.tensorrt_engine import (BUILDER_FLAGS, ENGINE, GOLDEN_INPUT, GOLDEN_OUTPUT, INPUT,
                                          MAX_BATCH, OUTPUT, SIDECAR, engine_runner, read_artefact_config)
from edgeseg.tolerances import GOLDEN


# The ops :func:`to_fp16` knows how to convert (every op of the edgeseg model zoo, and common neighbours).
_FP16_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose",
    "Div", "Erf", "Exp", "Flatten", "Gather", "Gelu", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid",
    "HardSwish", "Identity", "InstanceNormalization", "LeakyRelu", "MatMul", "Max", "MaxPool", "Mul", "Pad", "Pow",
    "PRelu", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})
# Inputs that are tensor(float) whatever the data type (ONNX spec), so they stay float32 in an fp16 graph.
_FLOAT32_INPUTS = {"Resize": (1, 2)}  # roi, scales

# ONNX ops that TensorRT's ONNX parser supports, from the operator support matrix onnx-tensorrt published for
# TensorRT 8.4 (JetPack 5.0.2; later versions add ops). A static name check, not a guarantee: the matrix's
# per-op restrictions (e.g. Resize modes, initializer-only inputs) are not checked.
TRT_PARSER_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum",
    "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GRU",
    "HardSigmoid", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max",
    "MaxPool", "Mean", "Min", "Mul", "Neg", "NonMaxSuppression", "Not", "Or", "Pad", "ParametricSoftplus", "Pow",
    "PRelu", "QuantizeLinear", "RandomUniform", "RandomUniformLike", "Range", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "Round", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Where", "Xor",
})


# --- export (this machine) ---------------------------------------------------------------------------------

def export(source, request, out_dir: Path) -> tuple[Path, dict]:
    """Write the target's model.onnx (fp32, fp16 or int8 QDQ), check it, and write the golden pair."""
    import onnx

    precision = request.precision
    model = onnx.load(str(source.onnx_path))
    info: dict = {}
    if precision == "fp16":
        model, info["fp16_conversion"] = to_fp16(model)
    elif precision == "int8":
        model, info["quantization"] = _quantize(model, request)
    meta = {**source.metadata, "edgeseg.target": request.target.id, "edgeseg.precision": precision}
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        model.metadata_props.add(key=key, value=value)
    path = out_dir / request.target.artefact
    onnx.save(model, str(path))
    info["onnx"] = check_onnx(path, precision)
    info["lint"] = polygraphy_lint(path)
    info["golden"] = write_golden(path, request, out_dir)
    info["parity_device"] = "CPU"
    info["parity_runtime"] = _PARITY_RUNTIME[precision]
    info["engine"] = {"built_by": "edgeseg build-engine ARTEFACT, on the Jetson", "file": ENGINE,
                      "sidecar": SIDECAR, "builder_flags": list(BUILDER_FLAGS[precision]),
                      "profile_batch": {"min": 1, "opt": 1, "max": MAX_BATCH}}
    return path, info


_PARITY_RUNTIME = {
    "fp32": "ONNX Runtime CPUExecutionProvider, fp32: a CPU check of model.onnx, not a TensorRT measurement",
    "fp16": "OpenVINO CPU plugin, f32 arithmetic with every tensor rounded exactly to f16 (edgeseg.export.f16): "
            "a CPU check of model.onnx, not a TensorRT measurement",
    "int8": "ONNX Runtime CPUExecutionProvider running the QDQ graph (int8 kernels, float glue in fp32): a CPU "
            "check of model.onnx, not a TensorRT measurement",
}


def to_fp16(model) -> tuple[object, dict]:
    """An fp16 copy of an fp32 ONNX model with float32 ``input``/``logits``: float initializers and Constants to
    float16 (Resize's roi/scales excepted), Cast-to-float becomes Cast-to-float16, a Cast at each end, then
    strict shape/type inference. Raises EdgesegError for an op this conversion does not know."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    unknown = sorted({n.op_type for n in g.node} - _FP16_OPS)
    if unknown:
        raise EdgesegError(f"the fp16 conversion does not know the ONNX op(s) {', '.join(unknown)}; "
                           "export fp32 (TensorRT can still build it with --precision fp32)")
    keep = {n.input[i] for n in g.node for i in _FLOAT32_INPUTS.get(n.op_type, ()) if i < len(n.input)} - {""}
    shared = keep & {x for n in g.node for i, x in enumerate(n.input) if i not in _FLOAT32_INPUTS.get(n.op_type, ())}
    if shared:
        raise EdgesegError(f"fp16 conversion: tensor(s) {sorted(shared)} feed both float32-only and float inputs")
    report = {"initializers": 0, "constants": 0, "out_of_fp16_range": 0, "kept_float32": sorted(keep)}

    def half(t):
        a = numpy_helper.to_array(t)
        report["out_of_fp16_range"] += int((np.abs(a) > np.finfo(np.float16).max).sum())
        return numpy_helper.from_array(np.clip(a, -65504, 65504).astype(np.float16), t.name)

    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(half(init))
            report["initializers"] += 1
    for node in g.node:
        if node.op_type in ("Constant", "ConstantOfShape") and node.output[0] not in keep:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(half(a.t))
                    report["constants"] += 1
                elif a.name in ("value_float", "value_floats"):
                    raise EdgesegError(f"fp16 conversion: Constant {node.name!r} uses {a.name}; not supported")
        elif node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    # float32 at the boundary: the deployed input/output types stay those of every other target
    for node in g.node:
        node.input[:] = [f"{INPUT}_fp16" if x == INPUT else x for x in node.input]
        node.output[:] = [f"{OUTPUT}_fp16" if x == OUTPUT else x for x in node.output]
    g.node.insert(0, helper.make_node("Cast", [INPUT], [f"{INPUT}_fp16"], name="edgeseg_input_to_fp16",
                                      to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", [f"{OUTPUT}_fp16"], [OUTPUT], name="edgeseg_logits_to_fp32",
                                   to=TensorProto.FLOAT))
    del g.value_info[:]  # the fp32 intermediate's types; inferred again below
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError
        raise EdgesegError(f"the fp16 ONNX fails type inference: {str(e).splitlines()[0]}") from None
    return m, report


def _quantize(model, request) -> tuple[object, dict]:
    import nncf  # its import sets the "nncf" logger to INFO; quiet it after the import
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from edgeseg.calibration import batches

    items = [{INPUT: x} for x in batches(request.calib, 1)]  # one image per item, as the OpenVINO backend
    # PERFORMANCE preset: symmetric weights and activations, the only kind TensorRT's explicit quantization takes
    # (zero point 0). No overflow fix: that is for x86 CPUs without VNNI, not for a GPU. TRANSFORMER leaves the
    # LayerNorm/GroupNorm arithmetic and the sigmoid gating in float (see the OpenVINO backend for the
    # measurement behind it).
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    if not os.environ.get("EDGESEG_DEBUG"):
        nncf_log.setLevel(logging.WARNING)
    try:
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE,
                                  advanced_parameters=advanced)
    finally:
        nncf_log.setLevel(level)
    signed = uint8_to_int8(quantized)
    return quantized, {"quantizer": "nncf.quantize (ONNX backend)", "format": "QDQ", "model_type": "transformer",
                       "preset": "performance", "activations": "int8 symmetric per-tensor",
                       "weights": "int8 symmetric per-channel", "calibration_images": len(items),
                       "uint8_quantizers_made_int8": signed}


def uint8_to_int8(model) -> int:
    """Rewrite, in place, NNCF's symmetric uint8 activation quantizers (zero point 0, range [0, 255 s], used on
    non-negative tensors) as int8 ones with the same range: scale 255 s / 127, zero point int8 0. TensorRT's
    Q/DQ takes int8 only, and NNCF's hardware configs refuse to force signedness. Returns how many
    (scale, zero point) pairs were rewritten; the parity check measures the result."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    made: dict[tuple[str, str], tuple[str, str]] = {}
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        scale, zero = node.input[1], node.input[2]
        z = inits.get(zero)
        if z is None or z.data_type != TensorProto.UINT8:
            continue
        if np.any(numpy_helper.to_array(z)):
            raise EdgesegError(f"{node.name}: an asymmetric uint8 quantizer; TensorRT needs zero point 0")
        if (scale, zero) not in made:
            new = (f"{scale}_int8", f"{zero}_int8")
            s = numpy_helper.to_array(inits[scale]).astype(np.float32) * np.float32(255 / 127)
            model.graph.initializer.extend([numpy_helper.from_array(s, new[0]),
                                            numpy_helper.from_array(np.zeros(z.dims, np.int8), new[1])])
            made[(scale, zero)] = new
        node.input[1], node.input[2] = made[(scale, zero)]
        if node.op_type == "QuantizeLinear":
            retyped.add(node.output[0])
    for vi in model.graph.value_info:  # the quantized tensors' recorded element type follows the zero point
        if vi.name in retyped:
            vi.type.tensor_type.elem_type = TensorProto.INT8
    used = {x for n in model.graph.node for x in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(made)


def check_onnx(path: Path, precision: str) -> dict:
    """onnx.checker (full_check) plus what TensorRT needs of a QDQ graph; the record for config.json."""
    import onnx
    from onnx import numpy_helper

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EdgesegError(f"{path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    record = {"checker": f"onnx.checker.check_model(full_check=True), onnx {onnx.__version__}: passed",
              "ir_version": model.ir_version,
              "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
              "ops": dict(sorted(ops.items())),
              "ops_not_in_tensorrt_parser_table": sorted(set(ops) - TRT_PARSER_OPS)}
    if precision == "int8":
        if not ops["QuantizeLinear"] or not ops["DequantizeLinear"]:
            raise EdgesegError(f"{path.name}: the int8 model has no QuantizeLinear/DequantizeLinear nodes")
        zero_points = _qdq_zero_points(model, numpy_helper)
        bad = sorted(name for name, (dtype, nonzero) in zero_points.items() if dtype != "INT8" or nonzero)
        if bad:
            raise EdgesegError(f"{path.name}: TensorRT needs int8 zero points equal to 0; not so for {bad[:3]}")
        record["qdq"] = {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
                         "zero_points": "all int8, all 0", "n_zero_points": len(zero_points)}
    return record


def _qdq_zero_points(model, numpy_helper) -> dict[str, tuple[str, bool]]:
    """Each Q/DQ zero point: (its data type name, whether any value is non-zero)."""
    from onnx import TensorProto

    tensors = {t.name: t for t in model.graph.initializer}
    tensors.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value"})
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) < 3 or not n.input[2]:
                out[n.name] = ("UINT8", False)  # no zero point: the ONNX default is uint8 0
                continue
            t = tensors.get(n.input[2])
            if t is None:
                raise EdgesegError(f"{n.name}: zero point {n.input[2]!r} is not a constant")
            out[n.name] = (TensorProto.DataType.Name(t.data_type), bool(np.any(numpy_helper.to_array(t))))
    return out


def polygraphy_lint(path: Path) -> dict:
    """``polygraphy check lint`` (in a subprocess: it parses with onnx-graphsurgeon and runs ONNX Runtime).
    A failing lint is an EdgesegError; the passed record (with any warnings) goes into config.json."""
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "lint.json"
        cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "check", "lint", str(path), "-o", str(report)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0"})
        except subprocess.TimeoutExpired:
            raise EdgesegError(f"polygraphy check lint took over 10 minutes on {path.name}; stopped") from None
        result = json.loads(report.read_text()) if report.is_file() else None
    if result is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgesegError(f"polygraphy check lint did not run on {path.name}: {tail[0]}")
    failing = result.get("summary", {}).get("failing", [])
    entries = result.get("lint_entries", [])
    errors = [e.get("message", "") for e in entries if e.get("level") == "exception"]
    if done.returncode != 0 or failing or errors:
        first = (errors or [str(e) for e in entries] or ["(no message)"])[0].splitlines()[0]
        raise EdgesegError(f"polygraphy check lint failed on {path.name} ({len(failing)} failing node(s)): {first}")
    return {"tool": f"polygraphy {version('polygraphy')} check lint", "passed": True,
            "passing_nodes": len(result["summary"].get("passing", [])),
            "warnings": [e.get("message", "").splitlines()[0] for e in entries]}


def write_golden(path: Path, request, out_dir: Path) -> dict:
    """golden_input.npy: the first parity frame (a real frame, preprocessed); golden_output.npy: its logits from
    ONNX Runtime on this CPU. The device compares its engine's output within :data:`edgeseg.tolerances.GOLDEN`."""
    from edgeseg.export import onnx as onnx_backend

    x = np.ascontiguousarray(request.validation.x[:1], np.float32)
    run = onnx_backend.load_runner(path, request.target, device="CPU", threads=1)
    y = run(x).astype(np.float32)
    np.save(out_dir / GOLDEN_INPUT, x)
    np.save(out_dir / GOLDEN_OUTPUT, y)
    return {"input": GOLDEN_INPUT, "output": GOLDEN_OUTPUT, "frame": request.validation.ids[0],
            "made_by": f"onnxruntime {run.effective['onnxruntime']} CPUExecutionProvider, 1 thread",
            "tolerance": asdict(GOLDEN[request.precision]),
            "tolerance_basis": "CPU runtime comparisons on the export machine, not a Jetson measurement"}


# --- runners -----------------------------------------------------------------------------------------------

def load_runner(path: Path, target, device: str | None = None, threads: int | None = None):
    """A numpy logits function for the artefact's model.onnx folder.

    device None or "GPU": the TensorRT engine (on the Jetson; needs model.engine + model.engine.json from
    ``edgeseg build-engine``). "CPU": the CPU check of model.onnx used by the parity gate (ONNX Runtime for fp32
    and int8, OpenVINO with every tensor rounded to f16 for fp16); its ``effective`` record says which.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = read_artefact_config(folder)
    onnx_path = folder / config["artefact"]
    if device in (None, "GPU"):
        return engine_runner(folder, config)
    if device != "CPU":
        raise EdgesegError(f"tensorrt-jetson runs on the Jetson's GPU (device GPU) or as a CPU check (device "
                           f"CPU), not on {device}")
    precision = config["precision"]
    if precision == "fp16":
        from edgeseg.export.f16 import f16_runner

        run = f16_runner(onnx_path, threads or target.profile.threads)
        run.effective["checks"] = "model.onnx on the CPU, not TensorRT"
        return run
    from edgeseg.export import onnx as onnx_backend

    run = onnx_backend.load_runner(onnx_path, target, device="CPU", threads=threads)
    compute = {"fp32": "fp32", "int8": "int8 QDQ kernels, float parts fp32"}[precision]
    run.effective = {**run.effective, "device": "CPU", "checks": "model.onnx on the CPU, not TensorRT",
                     "compute": compute}
    return run

