"""Every target's export of each shipped model passes its parity gate: the default precision and int8 of each
target, from `edgeseg export` with the shipped name (none for the default), on the checkpoint's own 100
validation frames, int8 calibrated with the committed manifest. Slow (about twenty exports), run in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeseg.export import require_runtime
from edgeseg.errors import EdgesegError
from edgeseg.targets import list_targets

pytestmark = [pytest.mark.slow, pytest.mark.onnx, pytest.mark.openvino, pytest.mark.tflite, pytest.mark.tensorrt]

SHIPPED = {"ultraseg-108k-pranet": "ultraseg-108k", "lite0-seg-pranet": "lite0-seg"}  # name -> model
CASES = [pytest.param(name, t, p, id=f"{name}-{t.id}-{p}") for name in SHIPPED for t in list_targets()
         for p in t.precisions if p in (t.precision, "int8")]
CALIB = Path(__file__).resolve().parents[1] / "calibration" / "pranet-train-300.json"


@pytest.mark.parametrize("name, target, precision", CASES)
def test_shipped_model_passes_the_parity_gate(cli, data_root, tmp_path, request, monkeypatch, name, target,
                                              precision):
    try:
        require_runtime(target)
    except EdgesegError as e:
        pytest.fail(f"the test extras install every export runtime: {e}")
    if target.backend == "tflite":
        monkeypatch.setenv("EDGESEG_LITERT_PYTHON", request.getfixturevalue("litert_python"))
    calib = ["--calib", CALIB] if target.needs_calibration(precision) else []
    default = name == "ultraseg-108k-pranet"  # the default model needs no name
    code, out, err = cli("export", *([] if default else [name]), "--target", target.id, "--precision", precision,
                         *calib, "--data-root", data_root, "--out", tmp_path / "art")
    assert code == 0, err  # 3 = over its parity budget
    parity = json.loads((tmp_path / "art" / "parity.json").read_text())
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert parity["n_images"] == 100 and parity["delta"] <= parity["budget"]
    assert config["model"] == SHIPPED[name] and config["checkpoint"]["file"] == f"{name}.pt"
    assert "parity ok" in out
    if name == "lite0-seg-pranet" and target.backend == "tflite" and precision == "int8":
        from edgeseg.export.tflite import inspect_tflite

        # BN + ReLU6 need no int16 or float islands: full-integer, every op on XNNPACK's int8 kernels
        report = inspect_tflite(tmp_path / "art" / "model.tflite")
        assert report["float_islands"] == [] and report["int16_islands"] == [], report
        assert report["inputs"][0]["dtype"] == report["outputs"][0]["dtype"] == "int8"
