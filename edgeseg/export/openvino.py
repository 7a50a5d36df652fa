"""OpenVINO backend (openvino-cpu, openvino-igpu): ONNX -> IR (fp32, fp16 weights, or NNCF int8) and the
OpenVINO runner.

Compile properties are always explicit: the CPU plugin's default inference precision is bf16 on AMX CPUs,
and the GPU plugin's is f16. They come from the target's ``[compile]`` table and are recorded in the
artefact's config.json, which :func:`load_runner` reads back. A CPU compile at f16 (the iGPU target's parity
check) goes through :mod:`edgeseg.export.f16`: every tensor rounded exactly to f16, the same on every CPU (the
plugin would run the hint as bf16 on an AVX512-BF16 CPU without AVX512-FP16, and as mixed f16/f32 with it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError

_QUANTIZED_CONSUMERS = ("Concat",)  # ops that pass a FakeQuantize's int8 tensor straight through
# Ops that move or describe data rather than compute on it: never listed as quantized/float layers.
_NOT_COMPUTE = ("FakeQuantize", "Constant", "Convert", "Parameter", "Result", "Concat", "Reshape", "ShapeOf",
                "Squeeze", "Unsqueeze", "Transpose", "Split", "VariadicSplit", "Slice", "StridedSlice", "Gather")


def compile_properties(target, precision: str, device: str) -> dict:
    """OpenVINO properties for running this target's artefact on ``device`` ("CPU" or "GPU")."""
    c = target.compile
    if device not in (c["device"], c.get("parity_device")):
        raise EdgesegError(f"target {target.id!r} runs on {c['device']}, not {device}")
    # The parity device runs at the deployment device's precision, so it checks the numerics deployed.
    props = {"INFERENCE_PRECISION_HINT": c["inference_precision"][precision],
             "EXECUTION_MODE_HINT": c["execution_mode"], "PERFORMANCE_HINT": "LATENCY"}
    if device == "CPU":
        props.update({"INFERENCE_NUM_THREADS": target.profile.threads, "NUM_STREAMS": 1})
    if "cache_dir" in c and device == c["device"]:
        props["CACHE_DIR"] = c["cache_dir"]  # relative to the artefact folder
    return props


def export(source, request, out_dir: Path) -> tuple[Path, dict]:
    """Convert ``source.onnx_path`` to an IR in ``out_dir``; int8 runs NNCF PTQ (or accuracy control)."""
    import openvino as ov

    target, precision = request.target, request.precision
    model = ov.convert_model(str(source.onnx_path))
    info: dict = {}
    if precision == "int8":
        model, info = _quantize(model, request)
    for key, value in {**source.metadata, "target": target.id, "precision": precision}.items():
        model.set_rt_info(value, ["edgeseg", key.removeprefix("edgeseg.")])
    path = out_dir / target.artefact
    # fp16 stores weights as f16 (half the .bin); int8 keeps its float parts (gates, glue, kept layers) f32.
    ov.save_model(model, str(path), compress_to_fp16=(precision == "fp16"))
    devices = [target.compile["device"], *([target.compile["parity_device"]]
                                           if "parity_device" in target.compile else [])]
    info["compile"] = {d: compile_properties(target, precision, d) for d in devices}
    info["deploy_device"] = target.compile["device"]
    info["parity_device"] = devices[-1]
    return path, info


def _quantize(model, request):
    import nncf  # noqa: F401  (its import sets the "nncf" logger to INFO; set ours after it)

    # NNCF logs every step at INFO; edgeseg reports what matters (kept_float, parity) itself.
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    if not os.environ.get("EDGESEG_DEBUG"):
        nncf_log.setLevel(logging.WARNING)
    try:
        return _nncf_quantize(model, request)
    finally:
        nncf_log.setLevel(level)


def _nncf_quantize(model, request):
    import nncf

    from edgeseg.calibration import batches

    # One image per item: NNCF warns that batch-wise statistics can be inaccurate for this model family.
    items = batches(request.calib, 1)
    # TRANSFORMER leaves the channel-LayerNorm/GroupNorm arithmetic and the sigmoid gating (Mul/Add) in
    # float and quantizes the convs. The CNN default also quantizes that glue; on UltraSeg-130K (authors'
    # weights, 300 calibration / 100 parity frames) it lost 0.0065 mDice against 0.0015 for TRANSFORMER.
    common = dict(subset_size=len(items), model_type=nncf.ModelType.TRANSFORMER)
    calib = nncf.Dataset(items)
    plain = nncf.quantize(model, calib, **common)
    info = {"quantizer": "nncf.quantize", "model_type": "transformer", "calibration_images": len(items)}
    if request.max_dice_drop is None:
        return plain, info
    frames = request.validation
    validation = nncf.Dataset([(frames.x[i:i + 1], frames.masks[i]) for i in range(len(frames.ids))])
    controlled = nncf.quantize_with_accuracy_control(
        model, calib, validation, _dice_validation, max_drop=request.max_dice_drop,
        drop_type=nncf.DropType.ABSOLUTE, **common)
    # The layers accuracy control reverted: quantized in plain PTQ (the same placement) but not any more.
    kept = sorted(quantized_ops(plain) - quantized_ops(controlled))
    info.update(quantizer="nncf.quantize_with_accuracy_control", max_dice_drop=request.max_dice_drop,
                validation_split=frames.description, validation_images=len(frames.ids), kept_float=kept)
    return controlled, info


def _dice_validation(compiled, items) -> tuple[float, list[float]]:
    from edgeseg.export.parity import dice_per_image

    out = compiled.outputs[0]
    per_item = [float(dice_per_image(compiled(x)[out], mask[None])[0]) for x, mask in items]
    return float(np.mean(per_item)), per_item


def quantized_ops(model) -> set[str]:
    """Friendly names of the ops that consume int8 data: an input comes from a FakeQuantize, directly or
    through a Concat of FakeQuantizes."""

    def fed_by_fq(node) -> bool:
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        return kind in _QUANTIZED_CONSUMERS and all(
            fed_by_fq(node.input_value(i).get_node()) for i in range(node.get_input_size()))

    names = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() in _NOT_COMPUTE:
            continue
        if any(fed_by_fq(op.input_value(i).get_node()) for i in range(op.get_input_size())):
            names.add(op.get_friendly_name())
    return names


def load_runner(path: Path, target, device: str | None = None, threads: int | None = None):
    """A numpy logits function on OpenVINO with the compile properties recorded for ``device``
    (default: the target's deployment device)."""
    import openvino as ov

    path = Path(path)
    config = json.loads((path.parent / "config.json").read_text())
    backend = config["backend_config"]
    device = device or backend["deploy_device"]
    if device not in backend["compile"]:
        raise EdgesegError(f"{path.parent} has no compile properties for device {device}; "
                           f"recorded: {', '.join(backend['compile'])}")
    props = dict(backend["compile"][device])
    if threads and "INFERENCE_NUM_THREADS" in props:
        props["INFERENCE_NUM_THREADS"] = threads
    if device == "CPU" and props["INFERENCE_PRECISION_HINT"] == "f16":
        # the parity check of an f16 deployment: every tensor rounded to f16, the same on every CPU, never the
        # plugin's bf16 substitute
        from edgeseg.export.f16 import f16_runner

        return f16_runner(path, props.pop("INFERENCE_NUM_THREADS", 1), props=props)
    if "CACHE_DIR" in props:
        props["CACHE_DIR"] = str(path.parent / props["CACHE_DIR"])
    core = ov.Core()
    if device not in core.available_devices:
        raise EdgesegError(f"OpenVINO device {device} is not available here (found: "
                           f"{', '.join(core.available_devices)})")
    compiled: dict[int, object] = {}

    def compile_for(batch: int):
        # One compiled model per batch size, with a static input shape: OpenVINO 2026.4.1's CPU plugin
        # returns an empty (0, 1, S, S) output for an int8 IR with a dynamic batch at f16 inference
        # precision, and static shapes are what the GPU plugin runs best anyway.
        if batch not in compiled:
            model = core.read_model(str(path))
            model.reshape([batch, *config["input"]["shape"][1:]])  # (batch, 3, S, S)
            compiled[batch] = core.compile_model(model, device, props)
        return compiled[batch]

    def run(x: np.ndarray) -> np.ndarray:
        model = compile_for(len(x))
        return model(np.ascontiguousarray(x, np.float32))[model.outputs[0]]

    probe = compile_for(1)
    run.effective = {"device": device, "openvino": ov.get_version(), "input": "static batch per call",
                     **{k: _plain(probe.get_property(k)) for k in ("INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT")}}
    return run


def _plain(value) -> str:
    """An OpenVINO property value as a short string: Type f32 -> "f32", ExecutionMode.ACCURACY -> "ACCURACY"."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return getattr(value, "name", str(value))
