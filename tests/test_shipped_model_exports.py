"""Every target's export of the shipped default model passes its parity gate: the default precision and int8
of each target, from `edgeseg export` with no checkpoint, on the default parity split (100 validation frames
carved from pranet-train), int8 calibrated with the committed manifest. Slow (about ten exports), run in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeseg.export import require_runtime
from edgeseg.errors import EdgesegError
from edgeseg.targets import list_targets

pytestmark = pytest.mark.slow

CASES = [pytest.param(t, p, id=f"{t.id}-{p}") for t in list_targets() for p in t.precisions
         if p in (t.precision, "int8")]
CALIB = Path(__file__).resolve().parents[1] / "calibration" / "pranet-train-300.json"


@pytest.mark.parametrize("target, precision", CASES)
def test_shipped_model_passes_the_parity_gate(cli, data_root, tmp_path, request, monkeypatch, target, precision):
    try:
        require_runtime(target)
    except EdgesegError as e:
        pytest.fail(f"the test extras install every export runtime: {e}")
    if target.backend == "tflite":
        monkeypatch.setenv("EDGESEG_LITERT_PYTHON", request.getfixturevalue("litert_python"))
    calib = ["--calib", CALIB] if target.needs_calibration(precision) else []
    code, out, err = cli("export", "--target", target.id, "--precision", precision, *calib,
                         "--data-root", data_root, "--out", tmp_path / "art")
    assert code == 0, err  # 3 = over its parity budget
    parity = json.loads((tmp_path / "art" / "parity.json").read_text())
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert parity["n_images"] == 100 and parity["delta"] <= parity["budget"]
    assert config["model"] == "ultraseg-108k" and config["checkpoint"]["file"] == "ultraseg-108k-pranet.pt"
    assert "parity ok" in out
