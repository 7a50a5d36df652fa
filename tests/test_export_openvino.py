"""openvino-cpu (fp32, fp16, int8, accuracy-controlled int8) and openvino-igpu (fp16) exports of the authors'
UltraSeg-130K, gated on real frames; the int8 manifest refusals through the CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edgeseg.calibration import read_manifest, write_manifest
from edgeseg.data.splits import image_path, mask_path
from edgeseg.errors import EdgesegError
from edgeseg.tolerances import PARITY
from _helpers import check_f16_runtime, one_line_error

pytestmark = pytest.mark.openvino

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnxslim")


def _export(cli, ckpt, out, data_root, parity16, *args):
    code, stdout, err = cli("export", ckpt, "--out", out, "--data-root", data_root, "--parity-split", parity16, *args)
    assert code == 0, err
    return stdout, json.loads((out / "config.json").read_text()), json.loads((out / "parity.json").read_text())




def _check_parity(parity, precision, min_agreement):
    assert parity["precision"] == precision and parity["n_images"] == 16
    assert parity["budget"] == PARITY[precision].max_delta and parity["delta"] <= parity["budget"]
    assert parity["pixel_agreement"] >= min_agreement, parity
    assert parity["worst_image_drop"] >= parity["delta"] and 0.5 < parity["mdice_ref"] <= 1.0


def test_openvino_cpu_fp32_and_fp16(cli, authors_ckpt, data_root, parity16, tmp_path):
    sizes = {}
    for precision, agreement in (("fp32", 0.9999), ("fp16", 0.999)):
        out = tmp_path / precision
        _, config, parity = _export(cli, authors_ckpt, out, data_root, parity16, "--target", "openvino-cpu",
                                    "--precision", precision)
        _check_parity(parity, precision, agreement)
        assert config["model_files"] == ["model.bin", "model.xml"] and config["artefact"] == "model.xml"
        assert config["backend_config"]["compile"] == {"CPU": {
            "INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1}}
        assert parity["runtime"]["INFERENCE_PRECISION_HINT"] == "f32"  # what the compiled model really used
        assert config["runtime_versions"]["openvino"] == ov.__version__.split("-")[0]
        model = ov.Core().read_model(out / "model.xml")
        assert model.get_rt_info(["edgeseg", "precision"]).astype(str) == precision
        assert model.get_rt_info(["edgeseg", "target"]).astype(str) == "openvino-cpu"
        sizes[precision] = (out / "model.bin").stat().st_size
    assert sizes["fp16"] < 0.6 * sizes["fp32"]


def test_openvino_cpu_int8(cli, authors_ckpt, data_root, parity16, calib32, tmp_path):
    from edgeseg.export.openvino import quantized_ops

    out = tmp_path / "int8"
    _, config, parity = _export(cli, authors_ckpt, out, data_root, parity16, "--target", "openvino-cpu",
                                "--precision", "int8", "--calib", calib32)
    _check_parity(parity, "int8", 0.98)
    manifest = read_manifest(calib32)
    assert config["calibration"] == {"sha256": manifest.hash, "manifest": "c32.json", "split": "pranet-train",
                                     "n_images": 32}
    assert config["backend_config"]["quantizer"] == "nncf.quantize"
    assert config["backend_config"]["calibration_images"] == 32
    model = ov.Core().read_model(out / "model.xml")
    assert model.get_rt_info(["edgeseg", "calibration_sha256"]).astype(str) == manifest.hash
    quantized = quantized_ops(model)
    assert any("Conv" in name for name in quantized)
    assert not quantized_ops(ov.convert_model(str(_fp32_onnx(cli, authors_ckpt, data_root, parity16, tmp_path))))


def _fp32_onnx(cli, ckpt, data_root, parity16, tmp_path) -> Path:
    out = tmp_path / "onnx"
    _export(cli, ckpt, out, data_root, parity16, "--target", "onnx")
    return out / "model.onnx"


@pytest.mark.slow
def test_openvino_cpu_int8_with_accuracy_control(cli, authors_ckpt, data_root, parity16, calib32, tmp_path):
    out = tmp_path / "ac"
    stdout, config, parity = _export(cli, authors_ckpt, out, data_root, parity16, "--target", "openvino-cpu",
                                     "--precision", "int8", "--calib", calib32, "--max-dice-drop", "0.004")
    backend = config["backend_config"]
    assert backend["quantizer"] == "nncf.quantize_with_accuracy_control" and backend["max_dice_drop"] == 0.004
    assert backend["validation_images"] == 16 and isinstance(backend["kept_float"], list)
    assert f"kept in float by accuracy control ({len(backend['kept_float'])})" in stdout
    # accuracy control validated on these same frames with the same f32 compile
    assert parity["delta"] <= 0.004 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_openvino_igpu(cli, authors_ckpt, data_root, parity16, calib32, tmp_path, precision):
    from edgeseg.export import load_runner

    out = tmp_path / "igpu"
    extra = ["--precision", "int8", "--calib", calib32] if precision == "int8" else []  # fp16 is the default
    _, config, parity = _export(cli, authors_ckpt, out, data_root, parity16, "--target", "openvino-igpu", *extra)
    _check_parity(parity, precision, 0.999 if precision == "fp16" else 0.98)
    compile_config = config["backend_config"]["compile"]
    assert compile_config["GPU"] == {"INFERENCE_PRECISION_HINT": "f16", "EXECUTION_MODE_HINT": "ACCURACY",
                                     "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": "model_cache"}
    assert compile_config["CPU"]["INFERENCE_PRECISION_HINT"] == "f16"
    assert config["backend_config"]["deploy_device"] == "GPU" and parity["runtime"]["device"] == "CPU"
    check_f16_runtime(parity["runtime"])  # parity checked the numerics the GPU uses: f16, never bf16
    # the CPU check is an emulation, whose latency is no measurement of anything
    one_line_error(*cli("profile", out, "--device", "CPU", "--runs", "5")[::2], "only emulates")
    if "GPU" not in ov.Core().available_devices:
        with pytest.raises(EdgesegError, match="OpenVINO device GPU is not available here"):
            load_runner(out)


# --- bad input ---------------------------------------------------------------------------------------------

def test_int8_manifest_refusals(cli, authors_ckpt, data_root, parity16, calib32, tmp_path):
    out = tmp_path / "art"
    base = ["export", authors_ckpt, "--target", "openvino-cpu", "--precision", "int8", "--out", out,
            "--data-root", data_root, "--parity-split", parity16]
    one_line_error(*cli(*base)[::2], "needs a calibration manifest", "--calib")

    m = json.loads(calib32.read_text())
    leak_id = parity16.read_text().split()[5]
    leak = {"id": leak_id, "sha256": read_sha(data_root, leak_id)}
    overlap = write_manifest({**m, "images": m["images"] + [leak]}, tmp_path / "overlap.json")
    one_line_error(*cli(*base, "--calib", overlap)[::2], "overlaps the parity split", leak_id)

    few = write_manifest({**m, "images": m["images"][:3]}, tmp_path / "few.json")
    one_line_error(*cli(*base, "--calib", few)[::2], "lists 3 images, fewer than one batch")
    one_line_error(*cli(*base, "--calib", tmp_path / "nope.json")[::2], "nope.json does not exist")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


def read_sha(root, sid):
    import hashlib

    return hashlib.sha256(image_path(root, sid).read_bytes()).hexdigest()


def test_int8_stale_manifest_through_the_cli(cli, authors_ckpt, data_root, parity16, calib32, tmp_path):
    # A writable data root holding the parity frames and the calibration images; one image then changes.
    root = tmp_path / "data"
    manifest = read_manifest(calib32)
    for sid in parity16.read_text().split():
        for src in (image_path(data_root, sid), mask_path(data_root, sid)):
            dst = root / src.relative_to(data_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    for sid in manifest.ids:
        dst = image_path(root, sid)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path(data_root, sid), dst)
    stale = image_path(root, manifest.ids[7])
    stale.write_bytes(stale.read_bytes()[:-100] + stale.read_bytes()[-100:][::-1])
    code, _, err = cli("export", authors_ckpt, "--target", "openvino-cpu", "--precision", "int8", "--calib",
                       calib32, "--out", tmp_path / "art", "--data-root", root, "--parity-split", parity16)
    one_line_error(code, err, f"calibration image {stale} changed since", "remake the manifest")
    assert not (tmp_path / "art").exists()


def test_missing_openvino_names_the_install_line(cli, authors_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    one_line_error(*cli("export", authors_ckpt, "--target", "openvino-igpu", "--out", tmp_path / "art")[::2],
                    "'openvino'", "not installed: pip install edgeseg[openvino]")
    assert not (tmp_path / "art").exists()
