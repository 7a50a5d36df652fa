"""Hostile and careless input on the data and training side: ids that leave the data root, run folders that
would be overwritten or shared, changed splits under --resume, clashing predict outputs, 16-bit masks,
truncated JPEGs that still end in FFD9, splits smaller than a batch, oversized headers, files of the wrong
kind, damaged caches and every out-of-range number. Each must end in one 'error: ...' line and exit code 2
(or, for the silent cases, in the right data), never a traceback and never a lost or half-written file."""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

import edgeseg.train as train_mod
from edgeseg.calibration import check_manifest, make_manifest, read_manifest, write_manifest
from edgeseg.checkpoint import make_checkpoint, save_atomic
from edgeseg.contract import InputContract
from edgeseg.data import load_decoded
from edgeseg.data.io import read_mask, read_rgb
from edgeseg.errors import EdgesegError
from edgeseg.models import create_model
from _helpers import one_line_error

IDS = ["cvc-clinicdb/1", "cvc-clinicdb/2", "cvc-clinicdb/3", "cvc-clinicdb/4"]
LOCK_FILE = getattr(train_mod, "LOCK_FILE", ".edgeseg-run.lock")


def _copy_pair(data_root, root, n: int) -> None:
    for sub, ext in (("images", "jpg"), ("masks", "png")):
        (root / "cvc-clinicdb" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / "cvc-clinicdb" / sub / f"{n}.{ext}", root / "cvc-clinicdb" / sub)


def _make_root(path, data_root):
    """A writable copy of four real CVC-ClinicDB pairs plus a split file 'four' listing them."""
    for sid in IDS:
        _copy_pair(data_root, path, int(sid.split("/")[1]))
    (path / "splits").mkdir()
    (path / "splits" / "four.txt").write_text("\n".join(IDS) + "\n")
    return path


@pytest.fixture
def root(tmp_path, data_root):
    return _make_root(tmp_path / "data", data_root)


def _train(cli, root, out, *extra):
    return cli("train", "--data-root", root, "--train-split", "four", "--val-fraction", "0.5", "--epochs", "1",
               "--size", "64", "--batch-size", "2", "--threads", "1", "--out", out, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """(root, run folder) of one finished 1-epoch run; tests copy both before changing anything."""
    from _helpers import run_main

    base = tmp_path_factory.mktemp("trained")
    root = _make_root(base / "data", data_root)
    code = run_main("train", "--data-root", root, "--train-split", "four", "--val-fraction", "0.5", "--epochs", "1",
                    "--size", "64", "--batch-size", "2", "--threads", "1", "--out", base / "run")
    assert code == 0
    return root, base / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    root, out = trained
    shutil.copytree(root, tmp_path / "data")
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "data", tmp_path / "run"


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory):
    """An untrained UltraSeg-108K checkpoint at 64x64 (fast to evaluate and predict with)."""
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    return save_atomic(make_checkpoint(create_model("ultraseg-108k"), InputContract(size=64)), path)


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


# --- §2: ids never leave the data root -------------------------------------------------------------------------


def test_split_ids_never_leave_the_data_root(cli, root, tmp_path, data_root, ckpt64):
    # A readable pair *outside* the data root, reachable today through '..' or an absolute path in an id.
    shutil.copy(data_root / "cvc-clinicdb" / "images" / "1.jpg", tmp_path / "leak.jpg")
    shutil.copy(data_root / "cvc-clinicdb" / "masks" / "1.png", tmp_path / "leak.png")
    for bad in ("cvc-clinicdb/../../../leak", f"cvc-clinicdb/{tmp_path / 'leak'}", "cvc-clinicdb/./1",
                "../cvc-clinicdb/1"):
        (root / "splits" / "evil.txt").write_text(f"# comment\ncvc-clinicdb/1\n{bad}\n")
        code, _, err = cli("evaluate", ckpt64, "--data-root", root, "--split", "evil")
        one_line_error(code, err, "evil.txt:3", repr(bad), "data root")


def test_manifest_ids_never_leave_the_data_root(data_root, tmp_path):
    base = make_manifest("pranet-train", data_root, n=8)
    leak = {"id": "cvc-clinicdb/../../../leak", "sha256": base["images"][0]["sha256"]}
    path = write_manifest({**base, "images": base["images"] + [leak]}, tmp_path / "m.json")
    with pytest.raises(EdgesegError, match=r"images\[8\].*data root"):
        check_manifest(read_manifest(path), data_root, [])


# --- §3: no data lost or silently wrong --------------------------------------------------------------------------


def test_train_never_replaces_a_run_without_resume(cli, run_copy):
    root, out = run_copy
    before = _snapshot(out)
    code, _, err = _train(cli, root, out)
    one_line_error(code, err, str(out), "already holds a run", "--resume", "--out")
    assert _snapshot(out) == before
    (out / "last.pt").unlink()  # best.pt / metrics.csv alone still mark a run
    one_line_error(*_train(cli, root, out)[::2], "already holds a run")


def test_two_runs_on_one_folder_are_locked(cli, root, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _train(cli, root, out)
        one_line_error(code, err, str(out), "in use by another edgeseg run", "--out")
        assert not (out / "last.pt").exists()
    code, _, err = _train(cli, root, out)  # released: the run goes ahead
    assert code == 0, err


def test_resume_refuses_a_changed_split(cli, run_copy, data_root):
    root, out = run_copy
    before = _snapshot(out)
    _copy_pair(data_root, root, 5)
    (root / "splits" / "four.txt").write_text("\n".join(IDS[:3] + ["cvc-clinicdb/5"]) + "\n")
    code, _, err = _train(cli, root, out, "--resume")
    one_line_error(code, err, "--resume", "split changed")
    assert _snapshot(out) == before


def test_predict_never_writes_two_inputs_to_one_name(cli, tmp_path, data_root, ckpt64):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(data_root / "cvc-clinicdb" / "images" / "1.jpg", src / "frame.jpg")
    cv2.imwrite(str(src / "frame.png"), cv2.imread(str(data_root / "kvasir-seg" / "images" /
                                                      sorted((data_root / "kvasir-seg" / "images").iterdir())[0].name)))
    code, _, err = cli("predict", ckpt64, src, "--out", tmp_path / "pred")
    assert code == 0, err
    masks = sorted(p.name for p in (tmp_path / "pred" / "masks").iterdir())
    assert len(masks) == 2, masks  # one mask per input, none overwritten
    sizes = {cv2.imread(str(tmp_path / "pred" / "masks" / m), 0).shape for m in masks}
    assert len(sizes) == 2  # each mask has its own input's size
    rows = (tmp_path / "pred" / "latency.csv").read_text().splitlines()[1:]
    assert len({r.split(",")[1] for r in rows}) == 2


@pytest.mark.parametrize("full", [255, 65535])
def test_16bit_masks_are_read_by_value(tmp_path, data_root, full):
    src = data_root / "cvc-clinicdb" / "masks" / "1.png"
    eight = read_mask(src)
    m16 = (cv2.imread(str(src), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint16) * full
    cv2.imwrite(str(tmp_path / "m16.png"), m16)
    assert cv2.imread(str(tmp_path / "m16.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert np.array_equal(read_mask(tmp_path / "m16.png", strict=True), eight)
    assert eight.sum() > 0


def test_truncated_jpeg_ending_in_ffd9_is_refused(cli, root, tmp_path):
    jpg = root / "cvc-clinicdb" / "images" / "2.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # cut short, then given an end-of-image marker
    with pytest.raises(EdgesegError, match="truncated"):
        read_rgb(jpg)
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "2.jpg", "truncated")
    assert not (tmp_path / "out").exists()
    # a complete image that really ends in flat mid-grey is still read
    cv2.imwrite(str(tmp_path / "grey.jpg"), np.full((40, 56, 3), 128, np.uint8))
    assert read_rgb(tmp_path / "grey.jpg").shape == (40, 56, 3)


def test_split_smaller_than_one_batch_and_zero_epochs_are_refused(cli, root, tmp_path):
    code, _, err = _train(cli, root, tmp_path / "out", "--batch-size", "4")  # 2 training images
    one_line_error(code, err, "2 image(s)", "fewer than one batch of 4", "--batch-size")
    one_line_error(*_train(cli, root, tmp_path / "out", "--epochs", "0")[::2], "--epochs", "got 0")
    assert not (tmp_path / "out").exists()


# --- §4: one line and exit 2 instead of a traceback ---------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_headers_beyond_the_pixel_limit(cli, root, tmp_path, data_root):
    (root / "cvc-clinicdb" / "masks" / "3.png").write_bytes(_png_header(40000, 40000))
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "3.png", "40000x40000")
    jpg = root / "cvc-clinicdb" / "images" / "4.jpg"
    data = bytearray(jpg.read_bytes())
    pos = 2
    while data[pos + 1] != 0xC0:  # walk the marker segments to the baseline start-of-frame
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    data[pos + 5:pos + 9] = struct.pack(">HH", 60000, 60000)  # its height and width
    jpg.write_bytes(bytes(data))
    _copy_pair(data_root, root, 3)  # repair the mask
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "4.jpg", "60000x60000")
    assert not (tmp_path / "out").exists()


def test_an_image_given_as_a_split(cli, root, tmp_path, ckpt64):
    jpg = root / "cvc-clinicdb" / "images" / "1.jpg"
    code, _, err = cli("train", "--data-root", root, "--train-split", jpg, "--out", tmp_path / "out")
    one_line_error(code, err, "1.jpg", "not a text file")
    one_line_error(*cli("evaluate", ckpt64, "--data-root", root, "--split", jpg)[::2], "not a text file")


def test_text_and_wrong_schema_checkpoints(cli, root, tmp_path, ckpt64):
    text = tmp_path / "notes.pt"
    text.write_text("these are my training notes\nnot a checkpoint\n")
    one_line_error(*cli("evaluate", text, "--data-root", root, "--split", "four")[::2], "notes.pt")
    good = torch.load(ckpt64, weights_only=True)
    bad_cases = {
        "only-tag": {"format": "edgeseg-checkpoint", "format_version": 1},
        "str-version": {**good, "format_version": "1"},
        "str-weights": {**good, "state_dict": "weights"},
        "no-contract": {k: v for k, v in good.items() if k != "contract"},
        "bad-size": {**good, "contract": {**good["contract"], "size": "large"}},
        "bad-mean": {**good, "contract": {**good["contract"], "mean": [0.5], "std": [1.0, 1.0, 1.0]}},
        "bad-kwargs": {**good, "model_kwargs": {"no_such_option": 3}},
        "nan-weight": {**good, "state_dict": {k: (v * float("nan") if i == 0 else v)
                                              for i, (k, v) in enumerate(good["state_dict"].items())}},
    }
    for name, ckpt in bad_cases.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        code, _, err = cli("evaluate", tmp_path / f"{name}.pt", "--data-root", root, "--split", "four")
        one_line_error(code, err, f"{name}.pt")
    code, _, err = cli("distill", "--teacher", text, "--student", "ultraseg-108k", "--data-root", root, "--train-split",
                       "four", "--val-fraction", "0.5", "--epochs", "1", "--size", "64", "--batch-size", "2",
                       "--out", tmp_path / "kd")
    one_line_error(code, err, "notes.pt")


def test_manifest_with_the_right_format_but_a_bad_schema(data_root, tmp_path):
    base = make_manifest("pranet-train", data_root, n=8)
    cases = {
        "version": {**base, "format_version": "1"},
        "images-dict": {**base, "images": {"id": "x"}},
        "no-slash": {**base, "images": base["images"][:7] + [{"id": "nodataset", "sha256": "0" * 64}]},
        "sha-int": {**base, "images": base["images"][:7] + [{"id": base["images"][7]["id"], "sha256": 7}]},
        "split-list": {**base, "split": ["a"]},
    }
    for name, doc in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        with pytest.raises(EdgesegError, match=f"{name}.json"):
            check_manifest(read_manifest(tmp_path / f"{name}.json"), data_root, [])


def test_cache_dir_that_is_a_file_or_unwritable(cli, root, tmp_path):
    (tmp_path / "cachefile").write_text("x")
    for cache in (tmp_path / "cachefile", tmp_path / "cachefile" / "sub"):
        code, _, err = _train(cli, root, tmp_path / "out", "--cache-dir", cache)
        one_line_error(code, err, "--cache-dir", str(cache))
    assert not (tmp_path / "out").exists()


def test_truncated_cache_is_rebuilt(root, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = load_decoded(root, IDS, 64, cache)
    (npz,) = cache.glob("*.npz")
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    again = load_decoded(root, IDS, 64, cache)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)
    assert "rebuilding" in caplog.text
    with np.load(npz) as z:  # rewritten whole
        assert z["images"].shape == (4, 64, 64, 3)


def test_best_pt_given_as_last_pt_to_resume(cli, run_copy):
    root, out = run_copy
    shutil.copy(out / "best.pt", out / "last.pt")
    code, _, err = _train(cli, root, out, "--resume")
    one_line_error(code, err, "last.pt", "no training state")


def test_a_one_image_split(cli, root, tmp_path):
    (root / "splits" / "one.txt").write_text("cvc-clinicdb/1\n")
    code, _, err = cli("train", "--data-root", root, "--train-split", "one", "--epochs", "1", "--size", "64",
                       "--batch-size", "1", "--out", tmp_path / "out")
    one_line_error(code, err, "1 image(s)", "none to train on")
    assert not (tmp_path / "out").exists()


NUMERIC = [("--size", "0"), ("--size", "-32"), ("--size", "48"), ("--batch-size", "0"), ("--lr", "nan"),
           ("--lr", "-0.1"), ("--lr", "inf"), ("--threads", "-1"), ("--workers", "-1"), ("--epochs", "0"),
           ("--epochs", "-2"), ("--val-fraction", "0"), ("--val-fraction", "1"), ("--val-fraction", "nan"),
           ("--seed", "-1")]


@pytest.mark.parametrize("option,value", NUMERIC)
def test_train_numbers_out_of_range(cli, root, tmp_path, option, value):
    code, _, err = _train(cli, root, tmp_path / "out", option, value)
    one_line_error(code, err, option)
    assert not (tmp_path / "out").exists()


def test_size_too_small_for_the_model(cli, root, tmp_path):
    code, _, err = _train(cli, root, tmp_path / "out", "--model", "microaunet")  # its padding needs 128
    one_line_error(code, err, "microaunet", "--size 64", "larger --size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--epochs", "0"), ("--tau", "0"), ("--tau", "nan"),
                                          ("--alpha", "-1"), ("--rho", "nan"), ("--stage1-epochs", "-1"),
                                          ("--size", "0")])
def test_distill_numbers_out_of_range(cli, root, tmp_path, ckpt64, option, value):
    code, _, err = cli("distill", "--teacher", ckpt64, "--data-root", root, "--train-split", "four", "--val-fraction",
                       "0.5", "--epochs", "2", "--size", "64", "--batch-size", "2", "--out", tmp_path / "kd",
                       option, value)
    one_line_error(code, err, option)
    assert not (tmp_path / "kd").exists()


@pytest.mark.parametrize("option,value", [("--n", "0"), ("--n", "-5"), ("--val-fraction", "1"),
                                          ("--val-fraction", "-0.5"), ("--seed", "-1")])
def test_calib_make_numbers_out_of_range(cli, data_root, tmp_path, option, value):
    code, _, err = cli("calib", "make", "--n", "16", "--out", tmp_path / "m.json", "--data-root", data_root,
                       option, value)
    one_line_error(code, err, option)
    assert not (tmp_path / "m.json").exists()


def test_split_error_line_numbers_count_every_line(cli, root, tmp_path):
    (root / "splits" / "four.txt").write_text("# my split\n\ncvc-clinicdb/1\n\ncvc-clinicdb/9999\n")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "four.txt:5", "cvc-clinicdb/9999")
    (root / "splits" / "four.txt").write_text("cvc-clinicdb/1\n# again:\ncvc-clinicdb/1\n")
    one_line_error(*_train(cli, root, tmp_path / "out")[::2], "four.txt:3", "first on line 1")
