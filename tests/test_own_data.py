"""A new user's own data: a folder of images/ + masks/ (any of jpg, png, bmp, tif) trained on with --data,
fine-tuned with --weights, exported, evaluated and predicted on, all through the CLI; and its bad inputs."""

from __future__ import annotations

import json
import shutil

import cv2
import pytest
import torch

from _helpers import one_line_error

N_FRAMES = 40


@pytest.fixture(scope="module")
def own(data_root, tmp_path_factory):
    """40 real frames (20 Kvasir-SEG, 20 CVC-ClinicDB) converted to PNG, as a user would lay them out."""
    ids = (data_root / "splits" / "pranet-train.txt").read_text().split()
    chosen = [i for i in ids if i.startswith("kvasir")][:N_FRAMES // 2] + \
        [i for i in ids if i.startswith("cvc")][:N_FRAMES // 2]
    folder = tmp_path_factory.mktemp("user") / "own"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for k, sid in enumerate(chosen):
        dataset, name = sid.split("/")
        img = cv2.imread(str(data_root / dataset / "images" / f"{name}.jpg"))
        mask = cv2.imread(str(data_root / dataset / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        scale = 160 / max(img.shape[:2])  # small frames keep the test fast
        size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        assert cv2.imwrite(str(folder / "images" / f"frame{k:03d}.png"), img)
        assert cv2.imwrite(str(folder / "masks" / f"frame{k:03d}.png"), mask)
    return folder


@pytest.fixture(scope="module")
def first_run(own, tmp_path_factory):
    """One epoch at --size 64 on the user's folder."""
    from _helpers import run_main

    out = tmp_path_factory.mktemp("runs") / "first"
    code = run_main("train", "--data", own, "--size", "64", "--epochs", "1", "--batch-size", "8", "--out", out)
    assert code == 0
    return out


def _copy(own, dest):
    shutil.copytree(own, dest)
    return dest


def test_new_user_trains_fine_tunes_exports_evaluates_and_predicts(cli, own, first_run, tmp_path):
    first = torch.load(first_run / "best.pt", weights_only=True)
    assert first["config"]["train_split"] == "all:own" and first["init"] is None
    assert first["splits"]["train_n"] + first["splits"]["val_n"] == N_FRAMES and first["splits"]["val_n"] == 4

    run = tmp_path / "tuned"
    code, out, err = cli("train", "--data", own, "--weights", first_run / "best.pt", "--size", "64", "--epochs", "1",
                         "--batch-size", "8", "--out", run)
    assert code == 0, err
    tuned = torch.load(run / "best.pt", weights_only=True)
    assert tuned["config"]["weights"] == str(first_run / "best.pt")
    assert tuned["init"]["file"] == "best.pt" and tuned["init"]["model"] == "ultraseg-108k"

    art = tmp_path / "art"
    code, out, err = cli("export", run / "best.pt", "--target", "onnx", "--out", art)
    assert code == 0, err
    # parity defaults to the checkpoint's own validation frames, and says that 4 frames are few
    assert "parity ok" in out and "on 4 images (few frames)" in out
    parity = json.loads((art / "parity.json").read_text())
    assert parity["few_frames"] is True and "only 4 frame(s)" in parity["note"]
    assert len(parity["ids"]) == 4 and all(i.startswith("own/frame") for i in parity["ids"])
    assert "the checkpoint's validation frames" in parity["split"]

    code, out, err = cli("evaluate", art, "--data", own, "--json", tmp_path / "eval.json")
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n_images"] == N_FRAMES and result["split"] == "all:own"
    assert result["artefact"]["target"] == "onnx"

    code, out, err = cli("predict", art, own / "images", "--out", tmp_path / "pred")
    assert code == 0, err
    assert f"{N_FRAMES} frame(s)" in out

    # the bundle's golden frame is the first parity frame: found under --data-root, or asked for in one line
    code, out, err = cli("bundle", art, "--out", tmp_path / "unit.tar.gz")
    assert code == 2 and "pass --data-root (the folder that holds own/) or --golden IMAGE" in err
    code, out, err = cli("bundle", art, "--out", tmp_path / "unit.tar.gz", "--data-root", own.parent)
    assert code == 0, err
    code, out, err = cli("verify", tmp_path / "unit.tar.gz")
    assert code == 0, err


def test_calibration_manifest_from_own_data(cli, own, tmp_path):
    code, out, err = cli("calib", "make", "--data", own, "--n", "8", "--out", tmp_path / "c.json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "c.json").read_text())
    assert manifest["split"] == "all:own" and len(manifest["images"]) == 8
    assert all(e["id"].startswith("own/frame") and len(e["sha256"]) == 64 for e in manifest["images"])


def test_mixed_formats_and_suffix_case_are_paired_by_stem(own, tmp_path):
    from edgeseg.data.io import read_pair
    from edgeseg.data.splits import folder_dataset, image_path, mask_path, read_split

    mixed = _copy(own, tmp_path / "mixed")
    img = cv2.imread(str(mixed / "images" / "frame000.png"))
    (mixed / "images" / "frame000.png").unlink()
    cv2.imwrite(str(mixed / "images" / "frame000.JPG"), img)
    (mixed / "images" / "frame001.png").rename(mixed / "images" / "frame001.bmp")  # named by suffix, read by content
    cv2.imwrite(str(mixed / "images" / "frame002.tif"), cv2.imread(str(mixed / "images" / "frame002.png")))
    (mixed / "images" / "frame002.png").unlink()
    (mixed / "images" / "._frame003.png").write_bytes(b"macOS resource fork")  # hidden: left out
    root, spec = folder_dataset(mixed)
    ids = read_split(spec, root)
    assert len(ids) == N_FRAMES and ids[0] == "mixed/frame000"
    assert image_path(root, "mixed/frame000").name == "frame000.JPG"
    assert image_path(root, "mixed/frame002").suffix == ".tif"
    for sid in ids[:3]:
        read_pair(image_path(root, sid), mask_path(root, sid))


def _train(cli, data, out):
    return cli("train", "--data", data, "--size", "64", "--epochs", "1", "--out", out)


def test_bad_own_folders(cli, own, tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    one_line_error(*_train(cli, empty, tmp_path / "o1")[::2], "holds no images or masks")

    no_masks = tmp_path / "nomasks"
    shutil.copytree(own / "images", no_masks / "images")
    one_line_error(*_train(cli, no_masks, tmp_path / "o2")[::2], "has no masks/")
    (tmp_path / "bare").mkdir()
    one_line_error(*_train(cli, tmp_path / "bare", tmp_path / "o3")[::2], "has no images/ and masks/")
    one_line_error(*_train(cli, tmp_path / "missing", tmp_path / "o4")[::2], "--data", "does not exist")

    unpaired = _copy(own, tmp_path / "unpaired")
    for k in range(7):
        (unpaired / "masks" / f"frame{k:03d}.png").unlink()
    one_line_error(*_train(cli, unpaired, tmp_path / "o5")[::2], "7 image(s)", "frame000, frame001",
                   "and 2 more")

    extra_mask = _copy(own, tmp_path / "extramask")
    (extra_mask / "images" / "frame039.png").unlink()
    one_line_error(*_train(cli, extra_mask, tmp_path / "o6")[::2], "1 mask(s)", "frame039")

    two = _copy(own, tmp_path / "two")
    shutil.copy(two / "images" / "frame003.png", two / "images" / "frame003.jpg")
    one_line_error(*_train(cli, two, tmp_path / "o7")[::2], "two images named 'frame003'")

    sizes = _copy(own, tmp_path / "sizes")
    mask = cv2.imread(str(sizes / "masks" / "frame005.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(sizes / "masks" / "frame005.png"), cv2.resize(mask, (64, 48), interpolation=cv2.INTER_NEAREST))
    one_line_error(*_train(cli, sizes, tmp_path / "o8")[::2], "frame005.png", "64x48", "same size")


def test_data_conflicts_with_other_data_options(cli, own, tmp_path, data_root):
    one_line_error(*cli("train", "--data", own, "--data-root", data_root, "--out", tmp_path / "o")[::2],
                   "--data and --data-root")
    one_line_error(*cli("train", "--data", own, "--train-split", "pranet-train", "--out", tmp_path / "o")[::2],
                   "--data and --train-split")
    one_line_error(*cli("evaluate", "--data", own, "--split", "pranet-test-kvasir")[::2], "--data and --split")
    one_line_error(*cli("calib", "make", "--data", own, "--split", "pranet-train", "--out", tmp_path / "c.json")[::2],
                   "--data and --split")


def test_weights_of_another_architecture_or_missing(cli, own, first_run, tmp_path):
    one_line_error(*cli("train", "--data", own, "--model", "microaunet", "--weights", first_run / "best.pt",
                        "--size", "128", "--out", tmp_path / "o1")[::2],
                   "holds a 'ultraseg-108k' model, not --model 'microaunet'")
    one_line_error(*cli("train", "--data", own, "--weights", tmp_path / "nope.pt", "--size", "64",
                        "--out", tmp_path / "o2")[::2], "does not exist")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    one_line_error(*cli("train", "--data", own, "--weights", tmp_path / "text.pt", "--size", "64",
                        "--out", tmp_path / "o3")[::2], "text.pt")


def test_shipped_model_parity_defaults_to_its_validation_frames(data_root):
    from edgeseg.checkpoint import read_checkpoint
    from edgeseg.export.parity import checkpoint_parity_ids, few_frames_note, resolve_parity_ids

    ids, root, desc = checkpoint_parity_ids(read_checkpoint("ultraseg-108k-pranet"), data_root)
    assert ids == resolve_parity_ids(None, data_root)[0] and root == data_root
    assert desc.startswith("carve_validation(pranet-train, 0.1, seed=42)[val][:100]")
    assert checkpoint_parity_ids({"config": {"train_split": "pranet-train"}, "splits": {"val": "0" * 64}},
                                 data_root) is None
    assert few_frames_note(50) is None and "49 frame(s)" in few_frames_note(49)
