"""tensorrt-jetson: fp32, fp16 and int8-QDQ ONNX exports of the authors' UltraSeg-130K through the CLI, gated on
real frames by the CPU parity check; their onnx.checker / polygraphy lint / golden records; and the engine side
that runs without TensorRT (build-engine's error, the engine sidecar check, the L4T release parser). The engine
build itself needs a Jetson and is skipped here."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256
from edgeseg.tolerances import GOLDEN, PARITY
from _helpers import check_f16_runtime, one_line_error, run_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
for _pkg in ("onnxslim", "nncf", "polygraphy", "onnx_graphsurgeon", "openvino"):
    pytest.importorskip(_pkg)

from edgeseg.export import tensorrt as trt_backend  # noqa: E402  (after the skips: it needs nothing, but its tests do)
from edgeseg.export import tensorrt_engine as trt_engine  # noqa: E402

pytestmark = pytest.mark.tensorrt


def _run_cli(*args) -> tuple[int, str, str]:
    """``edgeseg ARGS...`` in-process, output captured here (conftest's ``cli`` is function-scoped)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(*args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(authors_ckpt, data_root, parity16, calib32, tmp_path_factory):
    """precision -> artefact folder, exported once per module through `edgeseg export`."""
    made: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp("trt") / precision
            calib = ("--calib", calib32) if precision == "int8" else ()
            code, stdout, err = _run_cli("export", authors_ckpt, "--target", "tensorrt-jetson", "--precision",
                                         precision, *calib, "--parity-split", parity16, "--data-root", data_root,
                                         "--out", out)
            assert code == 0, err
            assert "parity ok" in stdout and stdout.strip().splitlines()[-1] == str(out)
            made[precision] = out
        return made[precision]

    return get


def _read(folder: Path) -> tuple[dict, dict]:
    return json.loads((folder / "config.json").read_text()), json.loads((folder / "parity.json").read_text())


def _check_common(folder: Path, precision: str, min_agreement: float) -> tuple[dict, dict, object]:
    """What every tensorrt-jetson artefact must carry; returns (config, parity, the loaded ONNX)."""
    config, parity = _read(folder)
    assert config["target"] == "tensorrt-jetson" and config["precision"] == precision
    assert config["artefact"] == "model.onnx"
    assert config["model_files"] == ["golden_input.npy", "golden_output.npy", "model.onnx"]
    # parity: over the precision's budget would have been rejected; pixel agreement on top
    assert parity["n_images"] == 16 and parity["precision"] == precision
    assert parity["budget"] == PARITY[precision].max_delta and parity["delta"] <= parity["budget"]
    assert parity["pixel_agreement"] >= min_agreement, parity
    assert parity["runtime"]["device"] == "CPU" and "not TensorRT" in parity["runtime"]["checks"]
    backend = config["backend_config"]
    assert backend["parity_device"] == "CPU" and "not a TensorRT measurement" in backend["parity_runtime"]
    # the ONNX checks recorded, and true
    assert backend["onnx"]["checker"].endswith("passed") and backend["onnx"]["opset"]["ai.onnx"] == 17
    assert backend["lint"]["passed"] is True and backend["lint"]["tool"].startswith("polygraphy 0.53")
    assert backend["onnx"]["ops_not_in_tensorrt_parser_table"] == []
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgeseg.target"] == "tensorrt-jetson" and meta["edgeseg.precision"] == precision
    assert meta["edgeseg.checkpoint_sha256"] == config["checkpoint"]["sha256"]
    # float32 at the boundary whatever the precision
    assert [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)] == [
        ("input", onnx.TensorProto.FLOAT), ("logits", onnx.TensorProto.FLOAT)]
    # the golden pair: a real parity frame, and ONNX Runtime reproduces its output
    golden = backend["golden"]
    assert golden["frame"] == parity["ids"][0] and golden["tolerance"] == asdict(GOLDEN[precision])
    x, y = np.load(folder / "golden_input.npy"), np.load(folder / "golden_output.npy")
    assert x.shape == (1, 3, 256, 256) and x.dtype == np.float32 and y.shape == (1, 1, 256, 256)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["logits"], {"input": x})[0], y, rtol=0, atol=1e-5)
    assert 0.05 < (y > 0).mean() < 0.95  # a frame with a polyp in it, not an empty mask
    return config, parity, model


@pytest.mark.slow
def test_fp16_onnx_checked_on_openvino_at_f16(exported):
    folder = exported("fp16")
    config, parity, model = _check_common(folder, "fp16", 0.999)
    # every float weight is float16; only Resize's scales stay float32 (the ONNX spec says so)
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    fp32 = {n for n, k in kinds.items() if k == onnx.TensorProto.FLOAT}
    assert sum(k == onnx.TensorProto.FLOAT16 for k in kinds.values()) > 100
    resize_inputs = {x for n in model.graph.node if n.op_type == "Resize" for x in n.input[1:3]}
    assert fp32 and fp32 <= resize_inputs
    # parity ran in f16 on OpenVINO's CPU plugin (the exact emulation), never in bf16
    check_f16_runtime(parity["runtime"])
    assert config["backend_config"]["engine"]["builder_flags"] == ["FP16"]
    assert "openvino" in config["runtime_versions"] and "polygraphy" in config["runtime_versions"]


@pytest.mark.slow
def test_int8_is_a_qdq_graph_with_int8_zero_points(exported, calib32):
    folder = exported("int8")
    config, parity, model = _check_common(folder, "int8", 0.99)
    assert config["calibration"]["n_images"] == 32 and config["calibration"]["manifest"] == "c32.json"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    # TensorRT's explicit quantization: every zero point is an int8 zero
    tensors = {t.name: t for t in model.graph.initializer}
    zero_points = [tensors[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(zero_points) == ops.count("QuantizeLinear") + ops.count("DequantizeLinear")
    assert {z.data_type for z in zero_points} == {onnx.TensorProto.INT8}
    assert not any(np.any(onnx.numpy_helper.to_array(z)) for z in zero_points)
    # every convolution reads dequantized int8 weights
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producer.get(n.input[1]) == "DequantizeLinear" for n in convs)
    backend = config["backend_config"]
    assert backend["onnx"]["qdq"]["zero_points"] == "all int8, all 0"
    assert backend["quantization"]["calibration_images"] == 32 and backend["engine"]["builder_flags"] == ["INT8"]
    assert parity["runtime"]["provider"] == "CPUExecutionProvider"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgeseg.calibration_sha256"] == config["calibration"]["sha256"]


def test_fp32_is_the_intermediate(exported):
    folder = exported("fp32")
    config, parity, model = _check_common(folder, "fp32", 0.9999)
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert parity["max_abs_logit_diff"] < 0.05 and config["backend_config"]["engine"]["builder_flags"] == []


# --- the engine side, without TensorRT -----------------------------------------------------------------------

def test_build_engine_without_tensorrt_is_a_one_line_error(cli, exported, monkeypatch, tmp_path):
    folder = exported("fp32")  # the engine side is the same for every precision
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this machine, even if a stub gets installed
    one_line_error(*cli("build-engine", folder)[::2], "TensorRT is not installed", "python3-libnvinfer",
                   "on the Jetson")
    one_line_error(*cli("build-engine", tmp_path / "nowhere")[::2], "is not an artefact folder")
    assert not (folder / "model.engine").exists()
    # the device runner (profile/predict default) needs the engine: the same error, never an ORT stand-in
    one_line_error(*cli("profile", folder, "--runs", "2", "--warmup", "1")[::2], "TensorRT is not installed")


def test_engine_side_needs_no_export_stack(exported):
    """On the Jetson only TensorRT + cuda-python exist: the engine module, build-engine and the GPU runner must not
    import torch, onnx, ONNX Runtime, OpenVINO or Polygraphy (here they fail on the missing TensorRT instead)."""
    import subprocess

    folder = exported("fp32")
    blocked = ["torch", "onnx", "onnxruntime", "onnxslim", "openvino", "nncf", "polygraphy", "tensorrt"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "from edgeseg.export import load_runner\nfrom edgeseg.export.tensorrt_engine import build_engine\n"
            "from edgeseg.errors import EdgesegError\n"
            f"for call in (lambda: build_engine({str(folder)!r}), lambda: load_runner({str(folder)!r})):\n"
            "    try:\n        call()\n    except EdgesegError as e:\n"
            "        assert 'TensorRT is not installed' in str(e), e\n"
            "    else:\n        raise AssertionError('no error without TensorRT')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_engine_runner_refuses_a_mismatched_sidecar(cli, exported, monkeypatch, tmp_path):
    """The runner's checks before TensorRT deserializes anything, with fake TensorRT/CUDA handles."""
    import shutil

    work = shutil.copytree(exported("fp32"), tmp_path / "art")
    (work / "model.engine").write_bytes(b"not a real plan")
    running = {"tensorrt": "10.3.0", "compute_capability": "8.7", "gpu": "Orin", "cuda_runtime": "12.6"}
    monkeypatch.setattr(trt_engine, "_import_tensorrt", lambda: object())
    monkeypatch.setattr(trt_engine, "_import_cudart", lambda: object())
    monkeypatch.setattr(trt_engine, "running_versions", lambda trt=None, cudart=None: dict(running))
    one_line_error(*cli("profile", work)[::2], "no model.engine + model.engine.json yet", "edgeseg build-engine")
    sidecar = {"format": trt_engine.SIDECAR_FORMAT, "tensorrt": "8.6.2", "compute_capability": "8.7",
               "onnx_sha256": file_sha256(work / "model.onnx"),
               "engine_sha256": file_sha256(work / "model.engine")}
    (work / "model.engine.json").write_text(json.dumps(sidecar))
    one_line_error(*cli("profile", work)[::2], "built with TensorRT 8.6.2 for compute capability 8.7",
                   "runs TensorRT 10.3.0 with compute capability 8.7", "rebuild")
    (work / "model.engine").write_bytes(b"another plan")
    sidecar["tensorrt"] = "10.3.0"
    (work / "model.engine.json").write_text(json.dumps(sidecar))
    one_line_error(*cli("profile", work)[::2], "does not match the sha256 in its sidecar")


def test_sidecar_check():
    check = trt_engine.check_engine_sidecar
    sidecar = {"format": trt_engine.SIDECAR_FORMAT, "tensorrt": "10.3.0", "compute_capability": "8.7",
               "onnx_sha256": "a" * 64, "engine_sha256": "b" * 64}
    here = {"tensorrt": "10.3.0", "compute_capability": "8.7", "gpu": "Orin"}
    check(sidecar, here, onnx_sha256="a" * 64, engine_sha256="b" * 64)  # a match passes
    with pytest.raises(EdgesegError, match=r"TensorRT 10\.3\.0 for compute capability 8\.7, but this device runs "
                                           r"TensorRT 8\.6\.2 with compute capability 8\.7"):
        check(sidecar, {**here, "tensorrt": "8.6.2"})
    with pytest.raises(EdgesegError, match=r"compute capability 8\.7, but .* compute capability 7\.2"):
        check(sidecar, {**here, "compute_capability": "7.2"})  # an engine from an Orin on a Xavier
    with pytest.raises(EdgesegError, match="built from another model.onnx"):
        check(sidecar, here, onnx_sha256="c" * 64)
    with pytest.raises(EdgesegError, match="does not match the sha256"):
        check(sidecar, here, engine_sha256="c" * 64)
    with pytest.raises(EdgesegError, match="not an edgeseg engine record"):
        check({**sidecar, "format": "x"}, here)


def test_l4t_release(tmp_path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 "
                 "01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n")
    assert trt_engine.l4t_release(f) == "R36.4.3"
    f.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 "
                 "19:57:35 UTC 2023\n")
    assert trt_engine.l4t_release(f) == "R35.4.1"
    assert trt_engine.l4t_release(tmp_path / "missing") is None


def test_fp16_conversion_of_a_small_graph():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "scales"], ["logits"], mode="linear")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # ORT 1.31: IR <= 13
    half, report = trt_backend.to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert report["initializers"] == 1 and report["kept_float32"] == ["scales"]
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    session = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, half)]
    want, got = (s.run(None, {"input": x})[0] for s in session)
    assert got.dtype == np.float32 and got.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(got, want, atol=0.05)
    model.graph.node.append(helper.make_node("LpNormalization", ["logits"], ["n"]))
    with pytest.raises(EdgesegError, match="does not know the ONNX op.*LpNormalization"):
        trt_backend.to_fp16(model)


def test_engine_build_on_a_jetson(exported):
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if not hasattr(tensorrt, "Builder"):
        pytest.skip("TensorRT is not installed: engine build runs on a Jetson")
    from edgeseg.export import load_runner

    folder = exported("fp16")
    sidecar = trt_engine.build_engine(folder)
    assert sidecar["golden_check"]["passed"], sidecar["golden_check"]
    assert sidecar["tensorrt"] == tensorrt.__version__ and sidecar["precision"] == "fp16"
    assert json.loads((folder / "model.engine.json").read_text())["engine_sha256"] == sidecar["engine_sha256"]
    x = np.load(folder / "golden_input.npy")
    assert load_runner(folder)(x).shape == (1, 1, 256, 256)
