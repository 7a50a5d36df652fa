"""Calibration manifests: `edgeseg calib make`, the committed default manifest, and every refusal of a bad
manifest (too small, overlapping the parity split, stale sha256, missing file, not a manifest)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgeseg.calibration import (BATCH_SIZE, check_manifest, load_images, make_manifest, read_manifest,
                                 write_manifest)
from edgeseg.contract import InputContract
from edgeseg.data.splits import carve_validation, image_path, read_split
from edgeseg.errors import EdgesegError
from edgeseg.export.parity import resolve_parity_ids
from _helpers import one_line_error

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO / "calibration" / "pranet-train-300.json"




def test_calib_make_draws_from_the_training_part(cli, data_root, tmp_path):
    out = tmp_path / "cal" / "m.json"
    code, stdout, err = cli("calib", "make", "--split", "pranet-train", "--n", "32", "--out", out,
                            "--data-root", data_root)
    assert code == 0, err
    assert "32 images" in stdout
    m = read_manifest(out)
    train, val = carve_validation(read_split("pranet-train", data_root), 0.1, 42)
    assert len(m.ids) == 32 and list(m.ids) == sorted(m.ids) and set(m.ids) <= set(train)
    assert not set(m.ids) & set(val)
    for sid, sha in zip(m.ids, m.sha256):
        assert hashlib.sha256(image_path(data_root, sid).read_bytes()).hexdigest() == sha
    assert m.data["split"] == "pranet-train" and m.data["carve"] == {"val_fraction": 0.1, "seed": 42, "part": "train"}
    assert all(set(e) == {"id", "sha256"} for e in m.data["images"])  # ids and hashes, never pixels
    # deterministic: the same call gives the same manifest
    assert make_manifest("pranet-train", data_root, n=32)["images"] == m.data["images"]


def test_calib_make_exclude_split(data_root, tmp_path):
    first = make_manifest("pranet-train", data_root, n=16)
    excluded = tmp_path / "ex.txt"
    excluded.write_text("\n".join(e["id"] for e in first["images"][:8]) + "\n")
    again = make_manifest("pranet-train", data_root, n=16, exclude=(str(excluded),))
    assert not {e["id"] for e in again["images"]} & set(excluded.read_text().split())
    assert again["excluded_splits"] == [str(excluded)]


def test_calib_make_bad_input(cli, data_root, tmp_path):
    one_line_error(*cli("calib", "make", "--n", "4", "--out", tmp_path / "m.json", "--data-root", data_root)[::2],
                    "fewer than one calibration batch", str(BATCH_SIZE))
    one_line_error(*cli("calib", "make", "--n", "5000", "--out", tmp_path / "m.json", "--data-root",
                         data_root)[::2], "only 1305 images", "lower --n")
    one_line_error(*cli("calib", "make", "--split", "pranet-trian", "--out", tmp_path / "m.json", "--data-root",
                         data_root)[::2], "pranet-trian")
    assert not (tmp_path / "m.json").exists()


def test_default_manifest_is_valid_and_disjoint_from_the_parity_split(data_root):
    m = read_manifest(DEFAULT_MANIFEST)
    assert len(m.ids) == 300 and m.split == "pranet-train"
    parity_ids, _ = resolve_parity_ids(None, data_root)
    check_manifest(m, data_root, parity_ids)  # sizes, overlap and every sha256
    # the whole carved validation set is excluded, not only the 100 parity frames
    assert not set(m.ids) & set(carve_validation(read_split("pranet-train", data_root), 0.1, 42)[1])
    assert m.data == make_manifest("pranet-train", data_root, n=300) | {"edgeseg_version": m.data["edgeseg_version"]}


def test_check_manifest_refusals(data_root, tmp_path):
    parity_ids, _ = resolve_parity_ids(None, data_root)
    base = make_manifest("pranet-train", data_root, n=16)

    def manifest(images, name):
        return read_manifest(write_manifest({**base, "images": images}, tmp_path / name))

    with pytest.raises(EdgesegError, match=f"lists 4 images, fewer than one batch \\({BATCH_SIZE}\\)"):
        check_manifest(manifest(base["images"][:4], "few.json"), data_root, parity_ids)
    sha = hashlib.sha256(image_path(data_root, parity_ids[3]).read_bytes()).hexdigest()
    leak = {"id": parity_ids[3], "sha256": sha}
    with pytest.raises(EdgesegError, match=f"overlaps the parity split \\(1 images, e.g. {parity_ids[3]}\\)"):
        check_manifest(manifest(base["images"] + [leak], "leak.json"), data_root, parity_ids)
    ghost = {"id": "kvasir-seg/no-such-frame", "sha256": "0" * 64}
    with pytest.raises(EdgesegError, match="no-such-frame.jpg .* does not exist"):
        check_manifest(manifest(base["images"] + [ghost], "ghost.json"), data_root, parity_ids)


def test_stale_sha256_names_the_file(data_root, tmp_path):
    # a writable copy of the manifest's images, one of which then changes
    m = make_manifest("pranet-train", data_root, n=8)
    root = tmp_path / "data"
    for e in m["images"]:
        dst = image_path(root, e["id"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path(data_root, e["id"]), dst)
    manifest = read_manifest(write_manifest(m, tmp_path / "m.json"))
    check_manifest(manifest, root, [])
    changed = image_path(root, m["images"][5]["id"])
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(EdgesegError, match=f"calibration image {changed} changed since .*m.json was made"):
        check_manifest(manifest, root, [])


def test_not_a_manifest(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgesegError, match="not valid JSON"):
        read_manifest(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "edgeseg-checkpoint"}')
    with pytest.raises(EdgesegError, match="not an edgeseg calibration manifest"):
        read_manifest(tmp_path / "other.json")
    with pytest.raises(EdgesegError, match="does not exist; make one with `edgeseg calib make`"):
        read_manifest(tmp_path / "missing.json")


def test_load_images_follows_the_contract(data_root, tmp_path):
    m = read_manifest(write_manifest(make_manifest("pranet-train", data_root, n=8), tmp_path / "m.json"))
    x = load_images(m, data_root, InputContract(size=64))
    assert x.shape == (8, 3, 64, 64) and x.dtype.name == "float32" and 0.0 <= x.min() and x.max() <= 1.0


def test_manifest_schema_is_checked_on_read(data_root, tmp_path):
    base = make_manifest("pranet-train", data_root, n=8)
    first = base["images"][0]
    cases = {"empty": [], "dup": base["images"] + [first], "escape": [{**first, "id": "kvasir-seg/../../../etc"}],
             "short-sha": [{**first, "sha256": "abc"}], "not-a-dict": ["kvasir-seg/x"]}
    for name, images in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**base, "images": images}))
        with pytest.raises(EdgesegError, match=f"{name}.json"):
            read_manifest(path)
    (tmp_path / "v.json").write_text(json.dumps({**base, "format_version": [1]}))
    with pytest.raises(EdgesegError, match="format_version"):
        read_manifest(tmp_path / "v.json")
