"""TFLite backend (edgeseg.export.tflite): export-only rewrites, litert-torch conversion of a real checkpoint
at fp32 / fp16 / full int8 on real frames, the runner, and the backend interface.

Conversion runs in the litert interpreter (see the module docstring); when none is configured the fixture
creates the cached venv once (PyPI access). Each (model, precision) is converted once per session.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgeseg.contract import InputContract
from edgeseg.data.io import read_pair
from edgeseg.data.splits import image_path, mask_path, read_split
from edgeseg.export._tflite_rewrites import group_scales, prepare_for_tflite
from edgeseg.targets import get_target
from edgeseg.tolerances import FLOAT64_RTOL, RUNTIME_F32
from _helpers import one_line_error

pytestmark = pytest.mark.tflite

REPO = Path(__file__).resolve().parents[1]
RPI = get_target("tflite-rpi")

if not sys.platform.startswith("linux"):
    pytest.skip("ai-edge-litert / litert-torch wheels used here exist for Linux only", allow_module_level=True)


@pytest.fixture(scope="session")
def tfl():
    try:
        from edgeseg.export import tflite
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the TFLite runtime is missing ({e}); pip install 'ai-edge-litert==2.3.0' (edgeseg[tflite])")
    return tflite


def _frames(root: Path, ids: list[str], contract: InputContract) -> np.ndarray:
    return np.concatenate([contract.preprocess(read_pair(image_path(root, s), mask_path(root, s))[0]) for s in ids])


@pytest.fixture(scope="session")
def real_frames(data_root):
    """32 test frames and 48 disjoint calibration frames from pranet-train, contract preprocessing."""
    ids = read_split("pranet-train", data_root)
    test_ids, calib_ids = ids[0::7][:32], ids[3::7][:48]
    assert not set(test_ids) & set(calib_ids)
    contract = InputContract()
    return {"test": _frames(data_root, test_ids, contract), "calib": _frames(data_root, calib_ids, contract),
            "test_ids": test_ids}


@pytest.fixture(scope="session")
def authors(authors_ckpt):
    """The authors' released UltraSeg-130K weights as (model, contract)."""
    from edgeseg.checkpoint import load_model

    model, contract, _ = load_model(authors_ckpt)
    return model, contract


def _student(name: str):
    from edgeseg.models import create_model

    torch.manual_seed(0)
    return create_model(name).eval()


@pytest.fixture(scope="session")
def convert(tfl, litert_python, authors, real_frames, tmp_path_factory):
    """convert(model_name, precision) -> (model, path, report), cached for the session."""
    out_dir = tmp_path_factory.mktemp("tflite")
    cache: dict = {}

    def run(name: str, precision: str):
        if (name, precision) not in cache:
            model, contract = authors if name == "ultraseg-130k-authors" else (_student(name), InputContract())
            path = out_dir / f"{name}-{precision}.tflite"
            calib = real_frames["calib"] if precision == "int8" else None
            report = tfl.torch_to_tflite(model, contract, path, precision, calib, python=litert_python)
            cache[name, precision] = (model, path, report)
        return cache[name, precision]

    return run


# --- export-only rewrites (torch only) -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ultraseg-130k-authors", "ultraseg-108k", "microaunet"])
def test_rewrite_is_the_same_maths(tfl, authors, real_frames, name):
    """prepare_for_tflite is exact: in float64 it matches the model to rounding, with and without the
    int8 group equalisation, and no GroupNorm / channel LayerNorm / GSB / LSCAB / BN survives in it."""
    model = authors[0] if name == "ultraseg-130k-authors" else _student(name)
    m64 = copy.deepcopy(model).double()
    x = torch.from_numpy(real_frames["test"][:2]).double()
    with torch.no_grad():
        ref = m64(x)
        for scales in (None, group_scales(m64, real_frames["calib"][:8])):
            prepared, report = prepare_for_tflite(m64, 256, scales, x)
            diff = float((prepared(x) - ref).abs().max())
            assert diff <= FLOAT64_RTOL * max(1.0, float(ref.abs().max())), (name, scales is not None, diff)
            assert report["max_abs_diff_fp64"] == pytest.approx(diff, rel=1e-6, abs=1e-15)
    left = {type(m).__name__ for m in prepared.modules()} & {
        "GroupNorm", "ChannelLayerNorm", "GSB", "LSCAB", "BatchNorm2d", "DWDConv", "Down", "TwoLogitHead"}
    assert not left, left


def test_group_scales_do_not_depend_on_the_thread_count(authors, real_frames):
    """The int8 group scales come from float64 statistics: float32 convs and reductions round differently
    with the torch thread count, which made two exports of one checkpoint differ in a few hundred int8
    outputs. In float64 the float32 scales are the same at 1 and 2 threads."""
    m64 = copy.deepcopy(authors[0]).double()
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append({k: v.float() for k, v in group_scales(m64, real_frames["calib"][:16]).items()})
    finally:
        torch.set_num_threads(threads)
    assert got[0].keys() == got[1].keys() and len(got[0]) == 8
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0]), [k for k in got[0]
                                                                     if not torch.equal(got[0][k], got[1][k])]


# --- conversions of the authors' UltraSeg-130K on real frames -------------------------------------------


@pytest.mark.slow
def test_fp32_matches_torch(tfl, convert, real_frames):
    model, path, rep = convert("ultraseg-130k-authors", "fp32")
    cmp = tfl.compare_to_torch(model, tfl.load_runner(path, RPI, threads=1), real_frames["test"])
    assert cmp["agreement"] == 1.0, cmp
    assert cmp["max_abs_diff"] < 1e-3, cmp
    assert rep["inputs"] == [{"name": rep["inputs"][0]["name"], "shape": [1, 256, 256, 3], "dtype": "float32"}]
    assert rep["outputs"][0]["shape"] == [1, 256, 256, 1] and rep["outputs"][0]["dtype"] == "float32"
    assert rep["transpose_count"] <= 2, rep["ops"]
    assert not rep["quantized"] and rep["rewrite_max_abs_diff_fp64"] < FLOAT64_RTOL


@pytest.mark.slow
def test_fp16_matches_torch(tfl, convert, real_frames):
    model, path, rep = convert("ultraseg-130k-authors", "fp16")
    cmp = tfl.compare_to_torch(model, tfl.load_runner(path, RPI, threads=1), real_frames["test"])
    assert cmp["agreement"] >= 0.999, cmp
    assert rep["ops"].get("DEQUANTIZE", 0) > 0, "fp16 weights are stored as float16 constants + DEQUANTIZE"
    assert rep["inputs"][0]["dtype"] == "float32" and rep["transpose_count"] <= 2
    assert rep["size_bytes"] < convert("ultraseg-130k-authors", "fp32")[2]["size_bytes"]


@pytest.mark.slow
def test_int8_is_full_integer_and_matches_torch(tfl, convert, real_frames):
    model, path, rep = convert("ultraseg-130k-authors", "int8")
    cmp = tfl.compare_to_torch(model, tfl.load_runner(path, RPI, threads=1), real_frames["test"])
    assert cmp["agreement"] >= 0.99, cmp
    (inp,), (out,) = rep["inputs"], rep["outputs"]
    assert inp["dtype"] == "int8" and out["dtype"] == "int8", (inp, out)
    # /255 contract without normalisation: the input scale is exactly 1/255, so int8 = uint8 pixel - 128
    assert inp["zero_point"] == -128 and abs(inp["scale"] - 1 / 255) < 1e-9, inp
    assert isinstance(out["scale"], float) and -128 <= out["zero_point"] <= 127
    assert rep["weight_dtypes"] and all(k.endswith(":int8") for k in rep["weight_dtypes"]), rep["weight_dtypes"]
    assert rep["weight_dtypes"].get("CONV_2D:int8", 0) > 40
    # float islands only where a runtime lacks an int8 kernel
    assert set(rep["float_island_ops"]) <= set(tfl.INT8_FLOAT_OPS), rep["float_islands"]
    assert rep["ops"].get("DEQUANTIZE", 0) == 0, rep["ops"]
    # int16 only in the GroupNorm statistics, and never RSQRT (its int16 kernel is not bit-exact on aarch64)
    assert rep["int16_islands"] and all("GroupNormExport" in f["output"] for f in rep["int16_islands"])
    assert "RSQRT" not in rep["int16_island_ops"] and rep["ops"].get("RSQRT", 0) > 0, rep["int16_island_ops"]
    assert "int16" in rep["int8_recipe"]
    assert rep["transpose_count"] <= 2
    assert rep["size_bytes"] < 0.5 * convert("ultraseg-130k-authors", "fp32")[2]["size_bytes"]


@pytest.mark.slow
def test_int8_with_float_norms_lists_its_float_islands(tfl, authors, real_frames, litert_python, tmp_path):
    model, contract = authors
    path = tmp_path / "mixed.tflite"
    rep = tfl.torch_to_tflite(model, contract, path, "int8", real_frames["calib"], python=litert_python,
                              float_norms=True)
    assert rep["float_islands"] and all("GroupNormExport" in f["output"] or "FusedChannelLayerNorm" in f["output"]
                                        for f in rep["float_islands"]), rep["float_islands"][:5]
    assert rep["inputs"][0]["dtype"] == "int8" and rep["outputs"][0]["dtype"] == "int8"
    assert rep["ops"].get("DEQUANTIZE", 0) > 0 and "scope" in rep["int8_recipe"]
    assert not rep["int16_islands"], rep["int16_island_ops"]  # the float norms replace the int16 ones
    cmp = tfl.compare_to_torch(model, tfl.load_runner(path, RPI, threads=1), real_frames["test"])
    assert cmp["agreement"] >= 0.995, cmp


def test_int8_requires_calibration(tfl, authors, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        tfl.torch_to_tflite(authors[0], authors[1], tmp_path / "x.tflite", "int8", None)
    with pytest.raises(ValueError, match="precision"):
        tfl.torch_to_tflite(authors[0], authors[1], tmp_path / "x.tflite", "bf16", None)


# --- students: TRANSPOSE budget --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ultraseg-108k", "microaunet"])
def test_student_fp32_has_at_most_two_transposes(tfl, convert, real_frames, name):
    model, path, rep = convert(name, "fp32")
    assert rep["transpose_count"] <= 2, rep["ops"]
    cmp = tfl.compare_to_torch(model, tfl.load_runner(path, RPI, threads=1), real_frames["test"][:8])
    with torch.no_grad():
        scale = float(model(torch.from_numpy(real_frames["test"][:8])).abs().max())
    assert cmp["agreement"] >= 0.99999, cmp  # random init: huge logits, a pixel can sit at ~0
    assert cmp["max_abs_diff"] <= RUNTIME_F32 * max(1.0, scale), (cmp, scale)


# --- runner ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_round_trip(tfl, convert, real_frames, data_root):
    from edgeseg.evaluate import evaluate_split, torch_logits_fn

    model, path, _ = convert("ultraseg-130k-authors", "int8")
    run = tfl.load_runner(path, RPI, threads=1)
    x = real_frames["test"][:3]
    raw = run.to_model_input(x)
    assert raw.dtype == np.int8 and raw.shape == (3, 256, 256, 3)
    # int8 input = uint8 pixel - 128, exactly (the contract's /255 meets the 1/255 input scale)
    assert np.array_equal(raw.astype(np.int16) + 128, np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.int16))
    y = run(x)
    assert y.shape == (3, 1, 256, 256) and y.dtype == np.float32
    assert np.array_equal(y, run.from_model_output(run.invoke_raw(raw)))
    assert np.array_equal(y, tfl.load_runner(path, RPI, threads=2)(x))
    with pytest.raises(ValueError):
        run(x.transpose(0, 2, 3, 1))
    # the parity gate's scorer accepts the runner like any other logits function (fp32: same scores)
    ids = real_frames["test_ids"][:4]
    model, path32, _ = convert("ultraseg-130k-authors", "fp32")
    got = evaluate_split(tfl.load_runner(path32, RPI, threads=1), InputContract(), data_root, ids, native=False)
    ref = evaluate_split(torch_logits_fn(model), InputContract(), data_root, ids, native=False)
    assert got["n_images"] == 4 and abs(got["mdice"] - ref["mdice"]) < 1e-4, (got["mdice"], ref["mdice"])


@pytest.mark.slow
def test_runner_needs_no_torch(tfl, convert, real_frames, tmp_path):
    """On a device (numpy + ai-edge-litert, no torch) the module imports and its runner gives the same logits."""
    import subprocess

    _, path, _ = convert("ultraseg-130k-authors", "int8")
    x = real_frames["test"][:2]
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np\n"
            "from edgeseg.export.tflite import load_runner\n"
            "from edgeseg.targets import get_target\n"
            f"run = load_runner({str(path)!r}, get_target('tflite-rpi'), threads=1)\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, run(np.load({str(tmp_path / 'x.npy')!r})))\n"
            "assert 'torch' not in sys.modules, 'the runner imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), tfl.load_runner(path, RPI, threads=1)(x))


@pytest.mark.slow
def test_backend_interface(tfl, convert, litert_python, monkeypatch, tmp_path):
    """export(source, request, out_dir) -> (path, info) and load_runner(path, target) as edgeseg.export calls them."""
    monkeypatch.setenv("EDGESEG_LITERT_PYTHON", litert_python)
    model = _student("microaunet")
    target = SimpleNamespace(id="tflite-rpi", artefact="model.tflite", profile=SimpleNamespace(threads=2))
    source = SimpleNamespace(model=model, contract=InputContract())
    request = SimpleNamespace(target=target, precision="fp32", calib=None)
    path, info = tfl.export(source, request, tmp_path)
    assert path == tmp_path / "model.tflite" and path.is_file()
    assert info["transpose_count"] <= 2 and info["layout"] == "NHWC" and info["converter"]["litert_torch"]
    run = tfl.load_runner(path, target)
    assert run.effective["threads"] == 2 and run.effective["kernels"] == "xnnpack"
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(run(x) - ref).max() <= RUNTIME_F32 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("precision, extra", [("fp32", []), pytest.param("fp16", [], marks=pytest.mark.slow)])
def test_pipeline_export_passes_its_parity_gate(cli, litert_python, authors_ckpt, data_root, tmp_path,
                                                monkeypatch, precision, extra):
    """`edgeseg export --target tflite-rpi` end to end: conversion, config, parity on real frames."""
    import json

    monkeypatch.setenv("EDGESEG_LITERT_PYTHON", litert_python)
    code, out, err = cli("export", authors_ckpt, "--target", "tflite-rpi", "--precision", precision, "--out",
                         tmp_path / "art", "--parity-split", "pranet-test-cvc-clinicdb", "--data-root", data_root,
                         *extra)
    assert code == 0, err
    parity = json.loads((tmp_path / "art" / "parity.json").read_text())
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert parity["delta"] <= parity["budget"] and parity["n_images"] == 62
    assert config["backend_config"]["layout"] == "NHWC" and config["precision"] == precision
    assert config["backend_config"]["transpose_count"] <= 2


def test_failed_conversion_is_one_line_and_leaves_nothing(cli, authors_ckpt, data_root, parity16, tmp_path,
                                                          monkeypatch):
    """A converter that fails (here: an interpreter without litert-torch) is a one-line error, no traceback,
    and no artefact folder or staging left behind."""
    monkeypatch.setenv("EDGESEG_LITERT_PYTHON", sys.executable)  # the test env has no litert_torch
    code, out, err = cli("export", authors_ckpt, "--target", "tflite-rpi", "--out", tmp_path / "art",
                         "--parity-split", parity16, "--data-root", data_root)
    one_line_error(code, err, "TFLite conversion failed", "litert_torch")
    assert list(tmp_path.iterdir()) == []


def test_conversion_env_is_per_python_environment(tmp_path, monkeypatch):
    """The conversion venv shares its parent environment's torch and edgeseg, so each environment gets its own
    (keyed by sys.prefix), and a missing one is named with the command that makes it."""
    from edgeseg.export import tflite

    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGESEG_LITERT_PYTHON", raising=False)
    mine = tflite.default_litert_venv()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    other = tflite.default_litert_venv()
    assert mine.parent == other.parent == tmp_path and mine != other and mine.name.startswith("venv-litert-")
    monkeypatch.setattr(tflite.importlib.util, "find_spec", lambda name: None)  # litert not in this environment
    with pytest.raises(ImportError, match=r"`edgeseg setup tflite` \(a venv at .*venv-litert-"):
        tflite.litert_python()
