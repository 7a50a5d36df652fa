"""`edgeseg evaluate ARTEFACT`: the deployed model's accuracy with its own runtime, next to its checkpoint's."""

from __future__ import annotations

import json

import pytest

from _helpers import one_line_error


@pytest.fixture(scope="module")
def onnx_artefact(data_root, parity16, tmp_path_factory):
    """The shipped model exported for the onnx target (parity on 16 frames)."""
    from edgeseg.export import export

    return export(None, "onnx", tmp_path_factory.mktemp("eval") / "onnx", parity_split=str(parity16),
                  data_root=data_root).path


def test_artefact_has_the_checkpoint_keys_and_its_difference(cli, onnx_artefact, parity16, data_root, tmp_path):
    code, out, err = cli("evaluate", onnx_artefact, "--split", parity16, "--data-root", data_root,
                         "--json", tmp_path / "art.json")
    assert code == 0, err
    assert "ultraseg-108k onnx fp32" in out and "delta (checkpoint - artefact)" in out
    art = json.loads((tmp_path / "art.json").read_text())
    code, _, err = cli("evaluate", "--split", parity16, "--data-root", data_root, "--json", tmp_path / "ckpt.json")
    assert code == 0, err
    ckpt = json.loads((tmp_path / "ckpt.json").read_text())
    assert set(ckpt) <= set(art) and set(art) - set(ckpt) == {"artefact", "checkpoint"}
    assert art["artefact"]["target"] == "onnx" and art["artefact"]["runtime"]["provider"] == "CPUExecutionProvider"
    # the shipped model was found by its sha256, and the fp32 artefact scores as it does
    assert art["checkpoint"]["file"] == "ultraseg-108k-pranet.pt"
    assert art["checkpoint"]["mdice"] == pytest.approx(ckpt["mdice"], abs=1e-9)
    assert abs(art["mdice"] - ckpt["mdice"]) < 1e-3 and art["n_images"] == ckpt["n_images"] == 16


def test_reference_must_be_the_exported_checkpoint(cli, onnx_artefact, authors_ckpt, parity16, data_root):
    args = ("--split", parity16, "--data-root", data_root)
    one_line_error(*cli("evaluate", onnx_artefact, "--reference", authors_ckpt, *args)[::2],
                   "is not the checkpoint", "was exported from")
    one_line_error(*cli("evaluate", authors_ckpt, "--reference", authors_ckpt, *args)[::2],
                   "--reference applies to an artefact folder")
