"""f16 arithmetic on any CPU: the fp16 parity check of openvino-igpu, tensorrt-jetson fp16 and tflite fp16.

Those artefacts deploy where the arithmetic is f16 (the iGPU plugin, a TensorRT fp16 engine, XNNPACK's fp16
kernels on an ARMv8.2 core), so the export machine checks them in f16 on OpenVINO's CPU plugin. The mode is
recorded as ``f16`` in the runner's ``effective`` record (and so in parity.json):

- ``emulated`` (the parity check, on every CPU): the artefact's own graph runs at f32 with its input, every
  weight and every op's output rounded to the nearest float16 value, subnormals and overflow to +-inf included
  (:func:`round_to_f16`). The arithmetic inside one op stays f32, as in f16 kernels that accumulate in f32. The
  rounding is written in f32 arithmetic the plugin cannot fold away (it removes an f32 -> f16 -> f32 Convert
  pair), and before each use a probe checks it bit for bit against numpy's float16 on this CPU and OpenVINO
  version. The same numerics on every CPU, so parity.json does not depend on which machine exported.
- ``native`` (for comparison only): an ``f16`` hint on a CPU with AVX512-FP16 / AMX-FP16. It is not the f16
  of the device: in ACCURACY mode the plugin keeps reductions, interpolations and many elementwise ops in f32
  (81 of 208 ops of the authors' UltraSeg-130K on a Sapphire Rapids, OpenVINO 2026.4.1), and on a CPU without
  f16 the hint silently compiles as bf16 (AMD EPYC with avx512_bf16) or f32, which this mode refuses.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError

_MIN_NORMAL = 2.0 ** -14        # below it float16 has a fixed spacing of 2**-24 (subnormals)
_SPLIT = 2.0 ** 13 + 1          # Veltkamp splitting of a 24-bit f32 significand to float16's 11 bits
EMULATION = ("f32 graph with the input, every weight and every op output rounded to the nearest float16 "
             "(subnormals and overflow included); f32 arithmetic inside each op")


def round_to_f16(output):
    """OpenVINO nodes that round the f32 ``output`` to the nearest float16 value, in f32 arithmetic."""
    import openvino as ov
    import openvino.opset13 as ops

    def const(v):
        return ops.constant(np.float32(v))

    c = ops.multiply(output, const(_SPLIT))
    normal = ops.subtract(c, ops.subtract(c, output))
    # the subnormal grid: exact power-of-two scalings around a round-half-to-even (an add/subtract of a shift
    # constant would be folded away by the plugin)
    subnormal = ops.multiply(ops.round(ops.multiply(output, const(2.0 ** 24)), "half_to_even"), const(2.0 ** -24))
    rounded = ops.select(ops.less(ops.abs(output), const(_MIN_NORMAL)), subnormal, normal)
    # float16 rounds anything at or above 65520 (halfway to the next power) to infinity
    # (tested on the input: 8193 x itself overflows f32 for |x| > 4e34)
    overflow = ops.greater_equal(ops.abs(output), const(65520.0))
    out = ops.select(overflow, ops.multiply(output, const(np.inf)), rounded)
    assert out.get_output_element_type(0) == ov.Type.f32
    return out


def emulate_f16(model):
    """Round every float tensor of the OpenVINO ``model`` (in place) to float16; returns (model, count).

    f16-typed tensors (an fp16 ONNX) are rounded in f32 between two Converts, which the CPU plugin's precision
    conversion then removes, leaving the f32 rounding.
    """
    import openvino as ov
    import openvino.opset13 as ops

    count = 0
    for op in list(model.get_ordered_ops()):
        if op.get_type_name() == "Result":
            continue
        for output in op.outputs():
            kind = output.get_element_type()
            if kind not in (ov.Type.f32, ov.Type.f16):
                continue
            consumers = list(output.get_target_inputs())
            source = output if kind == ov.Type.f32 else ops.convert(output, "f32").output(0)
            rounded = round_to_f16(source).output(0)
            if kind == ov.Type.f16:
                rounded = ops.convert(rounded, "f16").output(0)
            for consumer in consumers:
                consumer.replace_source_output(rounded)
            count += 1
    model.validate_nodes_and_infer_types()
    return model, count


def check_rounding(core) -> None:
    """Refuse to emulate when this CPU and OpenVINO version do not round exactly as numpy's float16."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-20, 12, 4096))).astype(np.float32)
    odd = np.arange(1, 1024, 2, dtype=np.float32)
    ties = np.concatenate([1 + odd * 2.0 ** -11, -(1 + odd * 2.0 ** -11), odd * 2.0 ** -25])  # halfway cases
    x = np.concatenate([x, ties, [0.0, 65519.0, 65520.0, -7e4, 3.4e38, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -30]]).astype(np.float32)
    p = ops.parameter([1, x.size], ov.Type.f32)
    # a fused elementwise chain before the rounding, as in a real graph
    y = ops.add(ops.multiply(p, ops.constant(np.float32(1.0))), ops.constant(np.float32(0.0)))
    compiled = core.compile_model(ov.Model([round_to_f16(y.output(0)).output(0)], [p]), "CPU",
                                  _props("f32", 1))
    got = compiled(x[None])[compiled.outputs[0]][0]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    if not np.array_equal(got, want):
        bad = int(np.sum(got != want))
        raise EdgesegError(f"the f16 emulation does not round exactly on this CPU with OpenVINO "
                           f"{ov.get_version()} ({bad} of {x.size} probe values differ); the fp16 check cannot "
                           "run here")


def cpu_has_f16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin offers native f16 compute here (AVX512-FP16 / AMX-FP16)."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "FP16" in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _props(hint: str, threads: int) -> dict:
    return {"INFERENCE_PRECISION_HINT": hint, "EXECUTION_MODE_HINT": "ACCURACY", "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}


def f16_runner(path: str | Path, threads: int = 1, mode: str = "emulated", props: dict | None = None):
    """A numpy logits function running ``path`` (OpenVINO IR, ONNX or TFLite) in f16 on the CPU.

    ``mode``: "emulated" (the parity check) or "native" (see the module docstring). ``props``: extra
    compile properties (e.g. an artefact's recorded CPU properties); the precision hint is set here. Input
    (B, 3, S, S) float32 NCHW; a model with an NHWC input (TFLite) is transposed here, both ways.
    """
    import openvino as ov

    core = ov.Core()
    if mode not in ("native", "emulated"):
        raise ValueError(f"mode must be emulated or native, got {mode!r}")
    if mode == "emulated":
        check_rounding(core)
    base = {**(props or {}), **_props("f16" if mode == "native" else "f32", threads)}
    compiled: dict[int, object] = {}
    rounded = 0

    def compile_for(batch: int):
        # one static-shape compile per batch size (dynamic-batch outputs were unreliable in the CPU plugin)
        nonlocal rounded
        if batch not in compiled:
            model = core.read_model(str(path))
            shape = list(model.inputs[0].get_partial_shape().get_min_shape())
            model.reshape([batch, *shape[1:]])
            if mode == "emulated":
                model, rounded = emulate_f16(model)
            compiled[batch] = core.compile_model(model, "CPU", base)
        return compiled[batch]

    probe = compile_for(1)
    nhwc = probe.inputs[0].get_shape()[-1] == 3 and probe.inputs[0].get_shape()[1] != 3

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        model = compile_for(len(x))
        y = np.asarray(model(x.transpose(0, 2, 3, 1) if nhwc else x)[model.outputs[0]], np.float32)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if nhwc else y

    hint = probe.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if mode == "native" and hint != "f16":
        raise EdgesegError(f"OpenVINO compiled the f16 check at {hint}, not f16, on this CPU; use mode 'emulated'")
    ops = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in probe.get_runtime_model().get_ordered_ops()
                  if op.get_rt_info()["layerType"].astype(str) not in ("Const", "Input", "Output", "Reorder"))
    run.effective = {"device": "CPU", "openvino": ov.get_version(), "compute": "f16", "f16": mode,
                     "INFERENCE_PRECISION_HINT": hint, "threads": threads, "input": "static batch per call",
                     "EXECUTION_MODE_HINT": probe.get_property("EXECUTION_MODE_HINT").name,
                     "op_runtime_precisions": dict(sorted(ops.items()))}
    if mode == "emulated":
        run.effective.update(emulation=EMULATION, rounded_tensors=rounded)
    return run
