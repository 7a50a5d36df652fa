"""Bad input through the CLI: one line on stderr naming the file and the fix, exit code 2, no traceback,
nothing half-written."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from edgeseg.checkpoint import make_checkpoint, save_atomic
from edgeseg.contract import InputContract
from edgeseg.models import create_model
from _helpers import one_line_error

IDS = ["cvc-clinicdb/1", "cvc-clinicdb/2", "cvc-clinicdb/3", "cvc-clinicdb/4"]


@pytest.fixture
def root(tmp_path, data_root):
    """A writable copy of four real CVC-ClinicDB pairs plus a split file listing them."""
    r = tmp_path / "data"
    for sub in ("images", "masks"):
        (r / "cvc-clinicdb" / sub).mkdir(parents=True)
    for sid in IDS:
        n = sid.split("/")[1]
        shutil.copy(data_root / "cvc-clinicdb" / "images" / f"{n}.jpg", r / "cvc-clinicdb" / "images")
        shutil.copy(data_root / "cvc-clinicdb" / "masks" / f"{n}.png", r / "cvc-clinicdb" / "masks")
    (r / "splits").mkdir()
    (r / "splits" / "four.txt").write_text("\n".join(IDS) + "\n")
    return r


def _train(cli, root, out, *extra):
    return cli("train", "--data-root", root, "--train-split", "four", "--val-fraction", "0.5", "--epochs", "1",
               "--size", "64", "--batch-size", "2", "--out", out, *extra)




def test_missing_data_root(cli, tmp_path):
    code, _, err = _train(cli, tmp_path / "nope", tmp_path / "out")
    one_line_error(code, err, "nope", "--data-root")
    assert not (tmp_path / "out").exists()


def test_empty_split_file(cli, root, tmp_path):
    (root / "splits" / "four.txt").write_text("\n")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "four.txt", "empty")


def test_unknown_split_entry(cli, root, tmp_path):
    (root / "splits" / "four.txt").write_text("cvc-clinicdb/1\ncvc-clinicdb/9999\n")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "four.txt:2", "cvc-clinicdb/9999")


def test_image_without_mask_and_mask_without_image(cli, root, tmp_path):
    (root / "cvc-clinicdb" / "masks" / "2.png").unlink()
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "2.jpg", "has no mask", "2.png")
    shutil.move(root / "cvc-clinicdb" / "images" / "3.jpg", tmp_path / "3.jpg")
    (root / "splits" / "four.txt").write_text("cvc-clinicdb/3\ncvc-clinicdb/4\n")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "3.png", "has no image")


def test_truncated_jpeg_and_unreadable_png(cli, root, tmp_path, data_root):
    jpg = root / "cvc-clinicdb" / "images" / "2.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "2.jpg", "truncated")
    shutil.copy(data_root / "cvc-clinicdb" / "images" / "2.jpg", jpg)  # repair it
    (root / "cvc-clinicdb" / "masks" / "3.png").write_bytes(b"not a png at all")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "3.png")
    assert not (tmp_path / "out").exists()


def test_mask_size_differs_from_image(cli, root, tmp_path):
    m = root / "cvc-clinicdb" / "masks" / "4.png"
    cv2.imwrite(str(m), cv2.resize(cv2.imread(str(m), 0), (100, 100), interpolation=cv2.INTER_NEAREST))
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "4.png", "4.jpg", "same size")


def test_non_binary_mask_warns_or_refuses_with_strict(cli, root, tmp_path, caplog):
    m = root / "cvc-clinicdb" / "masks" / "1.png"
    grey = cv2.imread(str(m), 0)
    grey[grey == 255] = 200
    cv2.imwrite(str(m), grey)
    one_line_error(*_train(cli, root, tmp_path / "strict", "--strict")[::2], "1.png", "not binary", "--strict")
    code, _, err = _train(cli, root, tmp_path / "out")
    assert code == 0, err
    assert "1.png: mask is not binary" in caplog.text and "thresholding at 127" in caplog.text


def test_unknown_model_suggests_nearest(cli, root, tmp_path):
    code, _, err = _train(cli, root, tmp_path / "out", "--model", "ultraseg108k")
    one_line_error(code, err, "ultraseg108k", "Did you mean 'ultraseg-108k'")


def test_checkpoint_of_another_architecture(cli, root, tmp_path):
    # A checkpoint that claims to be microaunet but holds UltraSeg weights.
    ckpt = make_checkpoint(create_model("ultraseg-108k"), InputContract())
    ckpt["model"] = "microaunet"
    save_atomic(ckpt, tmp_path / "wrong.pt")
    code, _, err = cli("evaluate", tmp_path / "wrong.pt", "--data-root", root, "--split", "four",
                       "--json", tmp_path / "m.json")
    one_line_error(code, err, "wrong.pt", "do not fit architecture 'microaunet'")
    assert not (tmp_path / "m.json").exists()
    torch.save(create_model("microaunet").state_dict(), tmp_path / "bare.pt")
    one_line_error(*cli("evaluate", tmp_path / "bare.pt", "--data-root", root, "--split", "four")[::2],
                    "bare.pt", "import-weights")


def test_truncated_checkpoint(cli, root, tmp_path):
    save_atomic(make_checkpoint(create_model("microaunet"), InputContract()), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    one_line_error(*cli("evaluate", tmp_path / "cut.pt", "--data-root", root, "--split", "four")[::2],
                    "cut.pt", "truncated")


def test_resume_with_a_different_config(cli, root, tmp_path):
    out = tmp_path / "run"
    assert _train(cli, root, out)[0] == 0
    before = (out / "last.pt").read_bytes()
    code, _, err = _train(cli, root, out, "--resume", "--lr", "0.1")
    one_line_error(code, err, "--resume", "lr: 0.001 -> 0.1")
    assert (out / "last.pt").read_bytes() == before  # the run folder is untouched
    one_line_error(*_train(cli, root, tmp_path / "fresh", "--resume")[::2], "last.pt", "--resume")


def test_evaluate_writes_json_and_overlays(cli, root, tmp_path):
    save_atomic(make_checkpoint(create_model("microaunet"), InputContract(size=128)), tmp_path / "m.pt")
    code, out, err = cli("evaluate", tmp_path / "m.pt", "--data-root", root, "--split", "four",
                         "--json", tmp_path / "r.json", "--overlays", tmp_path / "ov")
    assert code == 0, err
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert {"mdice", "miou", "dice_global", "acc", "spe", "sen", "hd95", "mae", "n_images"} <= set(r)
    assert r["n_images"] == 4 and 0 <= r["mdice"] <= 1 and "native" in r
    assert len(list((tmp_path / "ov").glob("*.png"))) == 4
    assert "mdice" in out
    assert np.isfinite(r["acc"])


def test_version(cli):
    from edgeseg import __version__

    code, out, err = cli("--version")
    assert code == 0 and out.strip() == f"edgeseg {__version__}", err


def _leaf_commands(group, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a command group (typer may ship its own click)
            yield from _leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_command_help_shows_examples_that_parse(cli):
    """Each command's --help has an Examples: block; every example names that command and parses with its
    options (unknown options, missing required ones or bad values fail here)."""
    import shlex

    import typer.main

    from edgeseg.cli import app

    for path, cmd in _leaf_commands(typer.main.get_command(app)):
        code, out, err = cli(*path, "--help")
        assert code == 0 and "Examples:" in out, f"edgeseg {' '.join(path)} --help: {out}{err}"
        block = (cmd.help or "").split("Examples:", 1)[1]
        examples = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
        assert examples, path
        for words in examples:
            assert words[:1 + len(path)] == ["edgeseg", *path], words
            cmd.make_context(" ".join(path), words[1 + len(path):])
