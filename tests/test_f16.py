"""The fp16 parity check computes in f16 on every CPU (edgeseg.export.f16), the same way everywhere: every tensor
of the artefact's graph rounded exactly to float16; never OpenVINO's bf16 substitute.
The export tests (openvino-igpu, tensorrt-jetson fp16) check what parity.json records."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from edgeseg.errors import EdgesegError
from edgeseg.export import f16

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def onnx_and_frames(data_root, tmp_path_factory):
    """The shipped model's ONNX intermediate (as every export makes it) and 4 real parity frames."""
    from edgeseg.checkpoint import load_model
    from edgeseg.export.onnx import torch_to_onnx
    from edgeseg.export.parity import load_frames, resolve_parity_ids
    from edgeseg.export.prepare import prepare

    model, contract, _ = load_model(None)
    prepared, _ = prepare(model, contract.size)
    path = torch_to_onnx(prepared, contract.size, tmp_path_factory.mktemp("f16") / "model.onnx", {})
    ids, _ = resolve_parity_ids(None, data_root)
    return path, load_frames(data_root, ids[:4], contract, "parity[:4]").x


def _exact_f16(a: np.ndarray) -> bool:
    return bool(np.array_equal(a, a.astype(np.float16).astype(np.float32)))


def test_rounding_matches_numpy_float16_bit_for_bit():
    core = ov.Core()
    f16.check_rounding(core)  # the probe every emulated run makes first
    odd = np.arange(1, 2048, 2, dtype=np.float32)
    x = np.concatenate([
        1 + odd * 2.0 ** -11, -(1 + odd * 2.0 ** -11),   # halfway between two float16 values: to even
        odd * 2.0 ** -25, 2.0 ** -14 - odd[:64] * 2.0 ** -34,  # subnormal grid and its edge
        [65504.0, 65519.9, 65520.0, -1e5, 0.0, -0.0, 3.4e38]]).astype(np.float32)  # overflow to +-inf
    p = ops.parameter([1, x.size], ov.Type.f32)
    compiled = core.compile_model(ov.Model([f16.round_to_f16(p.output(0)).output(0)], [p]), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x[None])[compiled.outputs[0]][0]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_emulation_rounds_every_tensor_of_the_real_model(onnx_and_frames):
    path, x = onnx_and_frames
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([1, *x.shape[1:]])
    model, count = f16.emulate_f16(model)
    assert count > 100
    # expose a sample of the rounded tensors (every 5th) next to the logits: each is exactly a float16 value
    rounded = [op for op in model.get_ordered_ops() if op.get_friendly_name().startswith("Select")][1::10]
    model.add_outputs([op.output(0) for op in rounded])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    outputs = list(compiled(x[:1]).values())
    assert len(outputs) > 10 and all(_exact_f16(o) for o in outputs)

    emulated = f16.f16_runner(path, mode="emulated")
    assert emulated.effective["f16"] == "emulated" and emulated.effective["INFERENCE_PRECISION_HINT"] == "f32"
    y16 = emulated(x)
    f32 = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    y32 = np.concatenate([f32(x[i:i + 1])[f32.outputs[0]] for i in range(len(x))])
    assert _exact_f16(y16) and not _exact_f16(y32)
    diff = np.abs(y16 - y32)
    assert 1e-3 < diff.max() < 0.5  # really rounded, and still the same segmentation
    assert ((y16 > 0) == (y32 > 0)).mean() > 0.999


@pytest.mark.slow
def test_native_f16_or_refusal(onnx_and_frames):
    """The parity check is the emulation on every CPU. Where the CPU has native f16 the native mode runs an f16
    hint and agrees with the emulation; elsewhere an f16 hint compiles as something else (bf16 on AVX512-BF16
    CPUs) and the native mode refuses instead of checking the wrong numerics."""
    path, x = onnx_and_frames
    core = ov.Core()
    hinted = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f16"})
    hint = hinted.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert f16.f16_runner(path).effective["f16"] == "emulated"
    if not f16.cpu_has_f16(core):
        assert hint != "f16"
        with pytest.raises(EdgesegError, match="not f16"):
            f16.f16_runner(path, mode="native")
        return
    native, emulated = f16.f16_runner(path, mode="native"), f16.f16_runner(path, mode="emulated")
    assert hint == "f16" and native.effective["f16"] == "native"
    a, b = native(x), emulated(x)
    assert np.abs(a - b).max() < 0.5 and ((a > 0) == (b > 0)).mean() > 0.999
