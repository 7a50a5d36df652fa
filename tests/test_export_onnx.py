"""Export preparation (the fused model every backend starts from), the ONNX target end to end on real frames, the artefact
metadata, the parity gate's rejection path and the export CLI's bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgeseg.checkpoint import load_model, make_checkpoint, save_atomic
from edgeseg.contract import InputContract
from edgeseg.export.parity import dice_per_image, load_frames
from edgeseg.export.prepare import prepare
from edgeseg.metrics import dice
from edgeseg.models import create_model
from edgeseg.tolerances import PARITY
from _helpers import one_line_error

pytestmark = pytest.mark.onnx

pytest.importorskip("onnx")
pytest.importorskip("onnxslim")
pytest.importorskip("onnxruntime")

CONFIG_KEYS = {"format", "target", "backend", "device", "precision", "artefact", "model_files", "model",
               "checkpoint", "input_contract", "input", "output", "calibration", "edgeseg_version",
               "runtime_versions", "prepare", "backend_config", "timings_s"}
PARITY_KEYS = {"mdice_ref", "mdice", "delta", "worst_image_drop", "pixel_agreement", "max_abs_logit_diff",
               "n_images", "budget", "precision", "target", "split", "ids"}


# --- preparation -------------------------------------------------------------------------------------------

def test_folding_keeps_the_authors_model_outputs(authors_ckpt, data_root, parity16):
    model, contract, _ = load_model(authors_ckpt)
    prepared, report = prepare(model, contract.size)
    assert report["bn_folded"] == 4 and report["blocks_fused"]["GSB"] == 4  # 3 Down + 1 spatial-attention BN
    assert report["blocks_fused"]["TwoLogitHead"] == 1  # the authors' z_fg - z_bg as one conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert report["max_abs_diff_fp64"] < 1e-9 * 30
    frames = load_frames(data_root, parity16.read_text().split(), contract, "parity16")
    x = torch.from_numpy(frames.x[:4])
    with torch.inference_mode():
        ref, got = model(x), prepared(x)
    assert got.shape == ref.shape == (4, 1, 256, 256)
    diff = float((ref - got).abs().max())
    assert diff < 1e-3 * float(ref.abs().max()), diff  # float rounding only, on |logits| up to ~25
    assert ((ref > 0) == (got > 0)).float().mean() > 0.9999


@pytest.mark.parametrize("name, size", [("ultraseg-108k", 64), ("microaunet", 256)])
def test_folding_is_exact_with_trained_like_batchnorm(name, size):
    torch.manual_seed(0)
    model = create_model(name).eval().double()  # float64: the folds are exact algebra, not approximations
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
    prepared, report = prepare(model, size)
    assert report["bn_folded"] == (3 if name.startswith("ultraseg") else 42)
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-10, atol=1e-10)


def test_vectorised_dice_matches_metrics():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 1, 32, 32)).astype(np.float32)
    masks = rng.random((5, 32, 32)) > 0.6
    masks[4] = False
    logits[4] = -1.0  # both empty -> 1.0
    want = [dice(logits[i, 0] > 0, masks[i]) for i in range(5)]
    np.testing.assert_allclose(dice_per_image(logits, masks), want)


# --- the onnx target end to end ----------------------------------------------------------------------------

def test_onnx_export_parity_and_metadata(cli, authors_ckpt, data_root, parity16, tmp_path):
    import onnx

    from edgeseg.fileio import file_sha256
    from edgeseg.export import load_runner

    out = tmp_path / "art"
    code, stdout, err = cli("export", authors_ckpt, "--target", "onnx", "--parity-split", parity16,
                            "--data-root", data_root, "--out", out)
    assert code == 0, err
    assert "parity ok" in stdout and stdout.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "parity.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    config, parity = json.loads((out / "config.json").read_text()), json.loads((out / "parity.json").read_text())
    assert CONFIG_KEYS <= set(config) and PARITY_KEYS <= set(parity)
    assert config["target"] == "onnx" and config["precision"] == "fp32" and config["model"] == "ultraseg-130k"
    assert config["checkpoint"]["sha256"] == file_sha256(authors_ckpt)
    assert config["input_contract"] == InputContract(size=256).to_dict() and config["calibration"] is None
    assert config["runtime_versions"]["onnxruntime"] and config["runtime_versions"]["torch"].startswith("2.13")
    assert parity["n_images"] == 16 and parity["budget"] == PARITY["fp32"].max_delta == 0.001
    assert abs(parity["delta"]) <= 0.001 and parity["pixel_agreement"] > 0.9999
    assert parity["max_abs_logit_diff"] < 0.05 and 0.5 < parity["mdice_ref"] <= 1.0

    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["edgeseg.input_contract"]) == config["input_contract"]
    assert meta["edgeseg.model"] == "ultraseg-130k" and meta["edgeseg.calibration_sha256"] == "none"
    assert meta["edgeseg.checkpoint_sha256"] == config["checkpoint"]["sha256"] and meta["edgeseg.version"]

    frames = load_frames(data_root, parity["ids"][:3], InputContract(size=256), "x")
    logits = load_runner(out)(frames.x)
    assert logits.shape == (3, 1, 256, 256) and logits.dtype == np.float32


def test_cli_defaults_export_the_default_parity_split(cli, authors_ckpt, data_root, tmp_path):
    out = tmp_path / "art"
    code, _, err = cli("export", authors_ckpt, "--target", "onnx", "--data-root", data_root, "--out", out)
    assert code == 0, err
    parity = json.loads((out / "parity.json").read_text())
    assert parity["n_images"] == 100 and parity["split"].startswith("carve_validation(pranet-train, 0.1, seed=42)")
    assert parity["delta"] <= 0.001
    # exporting again replaces the earlier artefact folder
    code, _, err = cli("export", authors_ckpt, "--target", "onnx", "--data-root", data_root, "--out", out,
                       "--parity-split", "pranet-test-cvc-clinicdb")
    assert code == 0, err
    assert json.loads((out / "parity.json").read_text())["n_images"] == 62


def test_over_budget_is_kept_as_rejected_with_exit_3(cli, authors_ckpt, data_root, parity16, tmp_path,
                                                      monkeypatch):
    import edgeseg.export.parity as parity_mod

    impossible = dataclasses.replace(PARITY["fp32"], max_delta=-1.0)  # better than PyTorch by 1
    monkeypatch.setattr(parity_mod, "PARITY", {**PARITY, "fp32": impossible})
    out = tmp_path / "art"
    code, stdout, err = cli("export", authors_ckpt, "--target", "onnx", "--parity-split", parity16,
                            "--data-root", data_root, "--out", out)
    one_line_error(code, err, "parity failed", "delta", "budget -1.0", "mdice_ref", "pixel_agreement",
                    "max_abs_logit_diff", "art.rejected", exit_code=3)
    assert not out.exists()
    rejected = tmp_path / "art.rejected"
    assert (rejected / "model.onnx").is_file() and json.loads((rejected / "parity.json").read_text())["budget"] == -1


@pytest.mark.slow
def test_one_frame_over_the_image_budget_is_rejected(cli, data_root, tmp_path):
    """The mean may hold while one frame collapses: the worst single-frame Dice loss has its own budget (here
    the shipped model's 100 parity frames, on which fp32 ONNX Runtime moves a few boundary pixels)."""
    out = tmp_path / "art"
    code, stdout, err = cli("export", "--target", "onnx", "--data-root", data_root, "--out", out)
    assert code == 0, err
    parity = json.loads((out / "parity.json").read_text())
    assert parity["image_budget"] == 0.02 and "(budget 0.02)" in stdout
    if parity["worst_image_drop"] <= 0:
        pytest.skip("fp32 matched PyTorch on every frame exactly; no drop to gate on")
    bound = parity["worst_image_drop"] / 2
    code, stdout, err = cli("export", "--target", "onnx", "--data-root", data_root, "--out", out,
                            "--max-image-drop", str(bound))
    one_line_error(code, err, "parity failed", f"(budget {bound})", "art.rejected", exit_code=3)
    assert json.loads((tmp_path / "art.rejected" / "parity.json").read_text())["image_budget"] == bound
    one_line_error(*cli("export", "--target", "onnx", "--max-image-drop", "1.5", "--out", out)[::2],
                   "--max-image-drop must be in [0, 1]")


# --- bad input ---------------------------------------------------------------------------------------------

def test_unknown_target_and_precision(cli, authors_ckpt, tmp_path):
    out = tmp_path / "art"
    one_line_error(*cli("export", authors_ckpt, "--target", "openvino", "--out", out)[::2],
                    "unknown target 'openvino'", "Did you mean 'openvino-cpu'")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--precision", "int4", "--out", out)[::2],
                    "unknown precision 'int4'", "int8")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--precision", "fp16", "--out", out)[::2],
                    "target 'onnx' supports fp32, not fp16", "openvino-cpu")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--calib", "x.json", "--out", out)[::2],
                    "--calib only applies to int8")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--max-dice-drop", "0.01", "--out", out)[::2],
                    "--max-dice-drop", "OpenVINO int8")
    one_line_error(*cli("export", authors_ckpt, "--target", "tensorrt-jetson", "--precision", "int8", "--out",
                        out)[::2], "tensorrt-jetson int8 needs a calibration manifest")
    assert not out.exists()


def test_checkpoint_of_an_unknown_model(cli, tmp_path):
    ckpt = make_checkpoint(create_model("ultraseg-108k"), InputContract())
    ckpt["model"] = "ultraseg-108q"
    save_atomic(ckpt, tmp_path / "odd.pt")
    one_line_error(*cli("export", tmp_path / "odd.pt", "--target", "onnx", "--out", tmp_path / "art")[::2],
                    "unknown model 'ultraseg-108q'", "ultraseg-108k")
    assert not (tmp_path / "art").exists()


def test_out_not_writable_or_not_an_artefact_folder(cli, authors_ckpt, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--out", tmp_path / "file" / "art")[::2],
                    "cannot write the artefact folder", "file/art")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--out", tmp_path / "mine")[::2],
                    "exists and is not an edgeseg artefact folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_runtime_names_the_install_line(cli, authors_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(*cli("export", authors_ckpt, "--target", "onnx", "--out", tmp_path / "art")[::2],
                    "'onnxruntime'", "not installed: pip install edgeseg[onnx]")
    assert not (tmp_path / "art").exists()
