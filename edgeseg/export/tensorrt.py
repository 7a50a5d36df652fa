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
Runtime's CPU provider (it executes the QDQ graph with int8 kernels); fp16 runs on OpenVINO's CPU plugin with
``INFERENCE_PRECISION_HINT=f16``, which computes the convolutions, reductions and normalizations in f16 on CPUs
with AVX512-FP16/AMX-FP16 (the op precisions it really used go into parity.json). ONNX Runtime is not used for
fp16 parity where OpenVINO can compute in f16: ONNX Runtime's CPU provider has no fp16 Conv/InstanceNormalization
kernels and silently wraps those nodes in Casts to float32. On a CPU without native f16 the fp16 check falls back
to it, with a warning, and config.json/parity.json say so.

On the Jetson (JetPack's TensorRT Python package and ``cuda-python``)::

    edgeseg build-engine ART [--timing-cache FILE] [--workspace MB]

parses model.onnx with TensorRT's OnnxParser, builds ``model.engine`` (FP16 flag for fp16; INT8 flag alone for
the QDQ graph, explicit quantization, its float parts in fp32 as in the CPU check; TF32 off for fp32) with a batch 1..8 optimization profile, writes the sidecar
``model.engine.json`` (TensorRT, CUDA, L4T/JetPack, GPU, compute capability, precision, sha256 of the ONNX and
of the engine; the plan file itself is TensorRT's bytes only), then runs the golden input and reports PASS/FAIL.
The runner (``load_runner`` with device None or "GPU") refuses an engine whose sidecar does not match the
running TensorRT version and compute capability, or the model.onnx beside it.

The TensorRT/CUDA code paths cannot run on the export machine and are not covered by its tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.fileio import write_atomic

INPUT, OUTPUT = "input", "logits"
ENGINE, SIDECAR = "model.engine", "model.engine.json"
GOLDEN_INPUT, GOLDEN_OUTPUT = "golden_input.npy", "golden_output.npy"
SIDECAR_FORMAT = "edgeseg-tensorrt-engine"
MAX_BATCH = 8  # the engine's optimization profile: batch 1 (opt) .. 8 (the parity gate's batch)
NO_TENSORRT = ("TensorRT is not installed here (`import tensorrt` failed): build and run engines on the Jetson, "
               "where JetPack provides it (sudo apt install python3-libnvinfer; in a venv use "
               "--system-site-packages)")

# Device golden check (TensorRT engine vs golden_output.npy from ONNX Runtime on the export CPU): the largest
# |logit difference| (None: not checked) and the smallest fraction of pixels whose mask (logit > 0) agrees.
# Chosen from CPU runtime comparisons on the authors' UltraSeg-130K (|logits| up to ~25): OpenVINO f16 vs ONNX
# Runtime differs by up to ~0.2 with mask agreement > 0.9997 per frame. Not measured on a Jetson.
GOLDEN_TOLERANCE = {
    "fp32": {"max_abs_logit_diff": 0.05, "min_mask_agreement": 0.999},
    "fp16": {"max_abs_logit_diff": 1.0, "min_mask_agreement": 0.995},
    "int8": {"max_abs_logit_diff": None, "min_mask_agreement": 0.98},  # int8 kernels round differently
}
# BuilderFlag names per precision. int8 sets only INT8: the float parts the quantizer left (norms, gating) stay
# fp32, the numerics the CPU parity check measured.
BUILDER_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}

# The ops :func:`to_fp16` knows how to convert (every op of the edgeseg model zoo, and common neighbours).
_FP16_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose",
    "Div", "Erf", "Exp", "Flatten", "Gather", "Gelu", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid",
    "HardSwish", "Identity", "InstanceNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Pow",
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

log = logging.getLogger(__name__)


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
    info["parity_runtime"] = _PARITY_RUNTIME["fp16-fallback" if precision == "fp16" and not cpu_has_f16()
                                             else precision]
    info["engine"] = {"built_by": "edgeseg build-engine ARTEFACT, on the Jetson", "file": ENGINE,
                      "sidecar": SIDECAR, "builder_flags": list(BUILDER_FLAGS[precision]),
                      "profile_batch": {"min": 1, "opt": 1, "max": MAX_BATCH}}
    return path, info


_PARITY_RUNTIME = {
    "fp32": "ONNX Runtime CPUExecutionProvider, fp32: a CPU check of model.onnx, not a TensorRT measurement",
    "fp16": "OpenVINO CPU plugin, INFERENCE_PRECISION_HINT f16 (f16 compute): a CPU check of model.onnx, not a "
            "TensorRT measurement",
    "int8": "ONNX Runtime CPUExecutionProvider running the QDQ graph (int8 kernels, float glue in fp32): a CPU "
            "check of model.onnx, not a TensorRT measurement",
    "fp16-fallback": "ONNX Runtime CPUExecutionProvider on the fp16 ONNX: fp16 weights and fp16 tensors between "
                     "nodes, but fp32 arithmetic in Conv/normalization (no f16 CPU here; ONNX Runtime casts nodes "
                     "without fp16 kernels): a weaker CPU check of model.onnx, not a TensorRT measurement",
}


def cpu_has_f16() -> bool:
    """Whether this CPU computes f16 natively for OpenVINO (AVX512-FP16 / AMX-FP16): the fp16 parity check."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


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
    ONNX Runtime on this CPU. The device compares its engine's output with GOLDEN_TOLERANCE[precision]."""
    from edgeseg.export import onnx as onnx_backend

    x = np.ascontiguousarray(request.validation.x[:1], np.float32)
    run = onnx_backend.load_runner(path, request.target, device="CPU", threads=1)
    y = run(x).astype(np.float32)
    np.save(out_dir / GOLDEN_INPUT, x)
    np.save(out_dir / GOLDEN_OUTPUT, y)
    return {"input": GOLDEN_INPUT, "output": GOLDEN_OUTPUT, "frame": request.validation.ids[0],
            "made_by": f"onnxruntime {run.effective['onnxruntime']} CPUExecutionProvider, 1 thread",
            "tolerance": GOLDEN_TOLERANCE[request.precision],
            "tolerance_basis": "CPU runtime comparisons on the export machine, not a Jetson measurement"}


# --- runners -----------------------------------------------------------------------------------------------

def load_runner(path: Path, target, device: str | None = None, threads: int | None = None):
    """A numpy logits function for the artefact's model.onnx folder.

    device None or "GPU": the TensorRT engine (on the Jetson; needs model.engine + model.engine.json from
    ``edgeseg build-engine``). "CPU": the CPU check of model.onnx used by the parity gate (ONNX Runtime for fp32
    and int8, OpenVINO f16 for fp16 where the CPU has native f16, else ONNX Runtime); its ``effective`` record
    says which.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = _read_config(folder)
    onnx_path = folder / config["artefact"]
    if device in (None, "GPU"):
        return _trt_runner(folder, config)
    if device != "CPU":
        raise EdgesegError(f"tensorrt-jetson runs on the Jetson's GPU (device GPU) or as a CPU check (device "
                           f"CPU), not on {device}")
    precision = config["precision"]
    if precision == "fp16" and cpu_has_f16():
        return _openvino_f16_runner(onnx_path, target, config["input_contract"]["size"], threads)
    from edgeseg.export import onnx as onnx_backend

    if precision == "fp16":
        log.warning("this CPU has no native f16: the fp16 check runs on ONNX Runtime, which computes Conv and the "
                    "normalizations in fp32 (recorded in parity.json)")
    run = onnx_backend.load_runner(onnx_path, target, device="CPU", threads=threads)
    compute = {"fp32": "fp32", "int8": "int8 QDQ kernels, float parts fp32",
               "fp16": "fp16 storage, fp32 arithmetic in nodes without ONNX Runtime fp16 kernels"}[precision]
    run.effective = {**run.effective, "device": "CPU", "checks": "model.onnx on the CPU, not TensorRT",
                     "compute": compute}
    return run


def _openvino_f16_runner(onnx_path: Path, target, size: int, threads: int | None):
    import openvino as ov

    core = ov.Core()
    props = {"INFERENCE_PRECISION_HINT": "f16", "INFERENCE_NUM_THREADS": threads or target.profile.threads,
             "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    compiled: dict[int, object] = {}

    def compile_for(batch: int):
        # a static shape per batch size, as the OpenVINO backend does (dynamic-batch outputs were unreliable)
        if batch not in compiled:
            model = core.read_model(str(onnx_path))
            model.reshape([batch, 3, size, size])
            compiled[batch] = core.compile_model(model, "CPU", props)
        return compiled[batch]

    def run(x: np.ndarray) -> np.ndarray:
        model = compile_for(len(x))
        return np.asarray(model(np.ascontiguousarray(x, np.float32))[model.outputs[0]], np.float32)

    probe = compile_for(1)
    ops = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in probe.get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) not in ("Const", "Input", "Output", "Reorder"))
    run.effective = {"device": "CPU", "openvino": ov.get_version(), "checks": "model.onnx on the CPU, not TensorRT",
                     "INFERENCE_PRECISION_HINT": probe.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                     "compute": "f16", "op_runtime_precisions": dict(sorted(ops.items())),
                     "threads": props["INFERENCE_NUM_THREADS"]}
    return run


def _read_config(folder: Path) -> dict:
    from edgeseg.export import read_config
    from edgeseg.targets import get_target

    config = read_config(folder)
    if get_target(config["target"]).backend != "tensorrt":
        raise EdgesegError(f"{folder} is a {config['target']} artefact, not a TensorRT (tensorrt-jetson) one")
    return config


# --- engine build and runner (on the Jetson) ---------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgesegError(NO_TENSORRT) from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package
        raise EdgesegError(NO_TENSORRT)
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EdgesegError("running a TensorRT engine needs cuda-python (for CUDA memory and streams): pip "
                               "install cuda-python==<the JetPack CUDA major version>.*") from None
    return cudart


def _cuda(result):
    """Unpack a cuda-python call's (error, value...) tuple; a CUDA error becomes an EdgesegError."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgesegError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def l4t_release(path: str | os.PathLike = "/etc/nv_tegra_release") -> str | None:
    """The L4T release from /etc/nv_tegra_release ("# R36 (release), REVISION: 4.0, ..." -> "R36.4.0");
    None off a Jetson."""
    try:
        first = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = [f.strip() for f in first.lstrip("# ").split(",")]
    major = fields[0].split()[0] if fields and fields[0] else ""
    revision = next((f.split(":", 1)[1].strip() for f in fields if f.upper().startswith("REVISION:")), None)
    if not major.startswith("R"):
        return first.strip() or None
    return f"{major}.{revision}" if revision else major


def _jetpack_version() -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    try:
        done = subprocess.run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def running_versions(trt=None, cudart=None) -> dict:
    """What an engine is tied to on this device: TensorRT, CUDA, GPU and compute capability, L4T/JetPack."""
    trt = trt or _import_tensorrt()
    cudart = cudart or _import_cudart()
    runtime = _cuda(cudart.cudaRuntimeGetVersion())
    device = _cuda(cudart.cudaGetDevice())
    props = _cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt": trt.__version__, "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
            "gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}",
            "l4t": l4t_release(), "jetpack": _jetpack_version(), "machine": platform.machine()}


def check_engine_sidecar(sidecar: dict, running: dict, *, onnx_sha256: str | None = None,
                         engine_sha256: str | None = None, engine: str = ENGINE) -> None:
    """Refuse an engine that this device cannot trust: built by another TensorRT version or for another compute
    capability (TensorRT plans are tied to both), from another model.onnx, or changed since it was built."""
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise EdgesegError(f"{engine}: its sidecar is not an edgeseg engine record; rebuild with `edgeseg "
                           "build-engine`")
    built = (sidecar.get("tensorrt"), sidecar.get("compute_capability"))
    here = (running.get("tensorrt"), running.get("compute_capability"))
    if built != here:
        raise EdgesegError(f"{engine} was built with TensorRT {built[0]} for compute capability {built[1]}, but this "
                           f"device runs TensorRT {here[0]} with compute capability {here[1]}; engines are tied to "
                           "both: rebuild it here with `edgeseg build-engine`")
    if onnx_sha256 is not None and sidecar.get("onnx_sha256") != onnx_sha256:
        raise EdgesegError(f"{engine} was built from another model.onnx (sha256 {str(sidecar.get('onnx_sha256'))[:12]}"
                           f"..., this one is {onnx_sha256[:12]}...): rebuild it with `edgeseg build-engine`")
    if engine_sha256 is not None and sidecar.get("engine_sha256") != engine_sha256:
        raise EdgesegError(f"{engine} does not match the sha256 in its sidecar (changed or copied half-way); "
                           "rebuild it with `edgeseg build-engine`")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_engine(artefact: str | os.PathLike, timing_cache: str | os.PathLike | None = None,
                 workspace_mb: int | None = None) -> dict:
    """Build model.engine + model.engine.json from a tensorrt-jetson artefact on this (Jetson) device, then run
    its golden check. Returns the sidecar dict (``golden_check`` holds PASS/FAIL and the numbers).

    Not runnable without TensorRT and a CUDA GPU; not covered by the export machine's tests.
    """
    folder = Path(artefact)
    if not folder.is_dir():
        raise EdgesegError(f"{folder} is not an artefact folder (make one with `edgeseg export --target "
                           "tensorrt-jetson`)")
    config = _read_config(folder)
    if workspace_mb is not None and workspace_mb < 1:
        raise EdgesegError(f"--workspace must be at least 1 MB, got {workspace_mb}")
    trt = _import_tensorrt()
    cudart = _import_cudart()
    running = running_versions(trt, cudart)
    onnx_path = folder / config["artefact"]
    precision = config["precision"]
    size = config["input_contract"]["size"]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 8.x needs the explicit-batch flag; 10.x has only explicit batch (the flag is deprecated there).
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    flags = 1 << int(explicit) if explicit is not None and int(trt.__version__.split(".")[0]) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgesegError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    build_config = builder.create_builder_config()
    if workspace_mb is not None:
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in BUILDER_FLAGS[precision]:
        build_config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        build_config.clear_flag(trt.BuilderFlag.TF32)  # on by default on Ampere (Orin): fp32 means fp32 here
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (1, 3, size, size), (1, 3, size, size), (MAX_BATCH, 3, size, size))
    build_config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        cache = build_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        build_config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, build_config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise EdgesegError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log "
                           "above)")
    if cache_path is not None:
        write_atomic(cache_path, bytes(build_config.get_timing_cache().serialize()))
    engine_bytes = bytes(plan)
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": 1, "engine": ENGINE, **running,
        "precision": precision, "builder_flags": list(BUILDER_FLAGS[precision]) + (
            ["no TF32"] if precision == "fp32" else []),
        "workspace_mb": workspace_mb, "timing_cache": cache_path.name if cache_path else None,
        "profile": {"input": {"min": [1, 3, size, size], "opt": [1, 3, size, size],
                              "max": [MAX_BATCH, 3, size, size]}},
        "onnx": onnx_path.name, "onnx_sha256": _sha256(onnx_path),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "build_s": round(build_s, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the sidecar first: an engine never lies next to a record of another build without its sha256 failing
    write_atomic(folder / SIDECAR, (json.dumps(sidecar, indent=2) + "\n").encode())
    write_atomic(folder / ENGINE, engine_bytes)
    sidecar["golden_check"] = golden_check(_trt_runner(folder, config, trt, cudart), folder, precision)
    write_atomic(folder / SIDECAR, (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def golden_check(runner, folder: Path, precision: str) -> dict:
    """Run golden_input.npy and compare with golden_output.npy at GOLDEN_TOLERANCE[precision]."""
    try:
        x, want = np.load(folder / GOLDEN_INPUT), np.load(folder / GOLDEN_OUTPUT)
    except OSError:
        raise EdgesegError(f"{folder} has no {GOLDEN_INPUT}/{GOLDEN_OUTPUT}; export it again") from None
    got = np.asarray(runner(x), np.float32)
    if got.shape != want.shape:
        raise EdgesegError(f"engine output shape {got.shape} != golden output shape {want.shape}")
    tol = GOLDEN_TOLERANCE[precision]
    diff = float(np.abs(got - want).max())
    agreement = float(((got > 0) == (want > 0)).mean())
    passed = agreement >= tol["min_mask_agreement"] and (
        tol["max_abs_logit_diff"] is None or diff <= tol["max_abs_logit_diff"])
    return {"passed": bool(passed), "max_abs_logit_diff": diff, "mask_agreement": agreement, "tolerance": tol}


def _trt_runner(folder: Path, config: dict, trt=None, cudart=None):
    """The engine on the Jetson's GPU through TensorRT's own API and cuda-python (no pycuda, no torch): one CUDA
    stream, device buffers grown on demand, name-based I/O (TensorRT >= 8.5, i.e. JetPack 5.1+).

    Not runnable without TensorRT and a CUDA GPU; not covered by the export machine's tests.
    """
    import weakref

    trt = trt or _import_tensorrt()
    cudart = cudart or _import_cudart()
    engine_path, sidecar_path = folder / ENGINE, folder / SIDECAR
    if not engine_path.is_file() or not sidecar_path.is_file():
        raise EdgesegError(f"{folder} has no {ENGINE} + {SIDECAR} yet: build them on this device with "
                           f"`edgeseg build-engine {folder}`")
    engine_bytes = engine_path.read_bytes()
    check_engine_sidecar(json.loads(sidecar_path.read_text()), running_versions(trt, cudart),
                         onnx_sha256=_sha256(folder / config["artefact"]),
                         engine_sha256=hashlib.sha256(engine_bytes).hexdigest(), engine=str(engine_path))
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise EdgesegError(f"TensorRT {trt.__version__} could not load {engine_path}")
    for name in (INPUT, OUTPUT):
        if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
            raise EdgesegError(f"{engine_path}: tensor {name!r} is {engine.get_tensor_dtype(name)}, expected float32")
    context = engine.create_execution_context()
    stream = _cuda(cudart.cudaStreamCreate())
    buffers: dict[str, list] = {INPUT: [0, 0], OUTPUT: [0, 0]}  # name -> [device pointer, bytes]
    h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def device_buffer(name: str, nbytes: int) -> int:
        ptr, size = buffers[name]
        if nbytes > size:
            if ptr:
                _cuda(cudart.cudaFree(ptr))
            buffers[name] = [int(_cuda(cudart.cudaMalloc(nbytes))), nbytes]
        return buffers[name][0]

    def run_batch(x: np.ndarray) -> np.ndarray:
        context.set_input_shape(INPUT, tuple(x.shape))
        y = np.empty(tuple(context.get_tensor_shape(OUTPUT)), np.float32)
        d_in, d_out = device_buffer(INPUT, x.nbytes), device_buffer(OUTPUT, y.nbytes)
        context.set_tensor_address(INPUT, d_in)
        context.set_tensor_address(OUTPUT, d_out)
        _cuda(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, stream))
        if not context.execute_async_v3(int(stream)):
            raise EdgesegError(f"TensorRT failed to run {engine_path}")
        _cuda(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, d2h, stream))
        _cuda(cudart.cudaStreamSynchronize(stream))
        return y

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        return np.concatenate([run_batch(x[i:i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)])

    def release(buffers=buffers, stream=stream):
        for ptr, _ in buffers.values():
            if ptr:
                cudart.cudaFree(ptr)
        cudart.cudaStreamDestroy(stream)

    weakref.finalize(run, release)
    run.keep_alive = (runtime, engine, context)  # the engine must outlive the context
    run.effective = {"device": "GPU", "tensorrt": trt.__version__, "engine": ENGINE,
                     "precision": config["precision"]}
    return run
