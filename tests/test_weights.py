"""Shipped checkpoints by name: `edgeseg weights` lists them, and every command that takes a checkpoint takes
the name."""

from __future__ import annotations

import json

import pytest

from _helpers import one_line_error


def test_weights_lists_the_shipped_checkpoints(cli):
    code, out, err = cli("weights")
    assert code == 0, err
    assert "ultraseg-108k-pranet" in out and "ultraseg-108k" in out and "126,021" in out
    assert "0.8175" in out and "0.7718" in out and "measured:" in out
    assert "lite0-seg-pranet" in out and "3,015,027" in out and "0.8864" in out and "0.8929" in out


@pytest.mark.parametrize("name", ["ultraseg-108k-pranet", "lite0-seg-pranet"])
def test_recorded_test_score_is_what_evaluate_measures(cli, data_root, tmp_path, name):
    from edgeseg.checkpoint import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    code, _, err = cli("evaluate", name, "--split", "pranet-test-cvc-clinicdb", "--data-root",
                       data_root, "--json", tmp_path / "cvc.json")
    assert code == 0, err
    measured = json.loads((tmp_path / "cvc.json").read_text())["mdice"]
    assert round(measured, 4) == card["test_mdice"]["pranet-test-cvc-clinicdb"]


def test_a_name_works_wherever_a_checkpoint_is_taken(cli, data_root, parity16, tmp_path):
    code, out, err = cli("export", "ultraseg-108k-pranet", "--target", "onnx", "--parity-split", parity16,
                         "--data-root", data_root, "--out", tmp_path / "art")
    assert code == 0 and "parity ok" in out, err
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["checkpoint"]["file"] == "ultraseg-108k-pranet.pt"
    one_line_error(*cli("evaluate", "ultraseg-108k-pranett", "--split", parity16, "--data-root", data_root)[::2],
                   "does not exist", "shipped checkpoints, by name: ", "ultraseg-108k-pranet", "lite0-seg-pranet")
