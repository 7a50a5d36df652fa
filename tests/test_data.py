"""Split protocols, checked IO, cache keying and augmentation on the real data."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from edgeseg.contract import InputContract
from edgeseg.data import Augment, SegDataset, carve_validation, load_decoded, read_split, resolve_data_root
from edgeseg.data.io import boundary_map, read_mask, read_pair, read_rgb
from edgeseg.data.splits import ENV_VAR
from edgeseg.errors import EdgesegError


def test_pranet_splits_are_disjoint_and_sized(data_root):
    train = read_split("pranet-train", data_root)
    kvasir = read_split("pranet-test-kvasir", data_root)
    cvc = read_split("pranet-test-cvc-clinicdb", data_root)
    assert (len(train), len(kvasir), len(cvc)) == (1450, 100, 62)
    assert not set(train) & (set(kvasir) | set(cvc))
    assert train == sorted(train)


def test_seeded_split_is_80_20_reproducible_and_disjoint(data_root):
    tr = read_split("seeded:cvc-clinicdb:4:42:train", data_root)
    te = read_split("seeded:cvc-clinicdb:4:42:test", data_root)
    assert len(tr) + len(te) == 612 and len(te) == round(612 / 5)
    assert not set(tr) & set(te)
    assert te == read_split("seeded:cvc-clinicdb:4:42:test", data_root)
    assert te != read_split("seeded:cvc-clinicdb:4:7:test", data_root)


def test_validation_is_carved_with_a_seed(data_root):
    ids = read_split("pranet-train", data_root)
    tr, va = carve_validation(ids, 0.1, seed=42)
    assert len(va) == 145 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
    assert carve_validation(list(reversed(ids)), 0.1, seed=42) == (tr, va)  # listing order is irrelevant
    assert carve_validation(ids, 0.1, seed=1)[1] != va


def test_data_root_resolution(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv(ENV_VAR, str(data_root))
    assert resolve_data_root(None) == data_root
    with pytest.raises(EdgesegError, match="not a directory"):
        resolve_data_root(tmp_path / "missing")


def test_boundary_map_is_a_thin_band_on_the_mask_edge(data_root):
    mask = read_mask(data_root / "cvc-clinicdb" / "masks" / "1.png")
    b = boundary_map(mask)
    assert set(np.unique(b)) == {0, 1}
    assert 0 < b.mean() < 0.1
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    assert b[edge].mean() > 0.95  # every edge pixel is covered by the dilated Canny band


def test_cache_hits_and_never_serves_stale_data(data_root, tmp_path, tiny_split):
    root = tmp_path / "data"
    shutil.copytree(data_root / "cvc-clinicdb", root / "cvc-clinicdb")
    ids = [i for i in read_split(str(tiny_split), data_root) if i.startswith("cvc")]
    cache = tmp_path / "cache"
    first = load_decoded(root, ids, 64, cache)
    assert len(list(cache.glob("*.npz"))) == 1
    again = load_decoded(root, ids, 64, cache)
    assert np.array_equal(first.images, again.images)
    # Edit one image: the key changes, a second cache file appears, and the new pixels are served.
    img = cv2.imread(str(root / "cvc-clinicdb" / "images" / "1.jpg"))
    cv2.imwrite(str(root / "cvc-clinicdb" / "images" / "1.jpg"), 255 - img)
    edited = load_decoded(root, ids, 64, cache)
    assert len(list(cache.glob("*.npz"))) == 2
    assert not np.array_equal(edited.images[ids.index("cvc-clinicdb/1")], first.images[ids.index("cvc-clinicdb/1")])


def test_augmentation_keeps_image_and_labels_aligned(data_root, tiny_split):
    ids = read_split(str(tiny_split), data_root)
    dec = load_decoded(data_root, ids, 128)
    ds = SegDataset(dec, InputContract(size=128), Augment(seed=3, brightness=0, contrast=0, saturation=0))
    for i in range(len(ds)):
        x, mask, bnd = ds[i]
        assert x.shape == (3, 128, 128) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert set(np.unique(mask)) <= {0.0, 1.0}
        # Replaying the same draw on an image that *is* the mask must give the transformed mask exactly.
        m = dec.masks[i]
        as_img = np.repeat(m[..., None] * 255, 3, axis=2).astype(np.uint8)
        img_t, mask_t, _ = ds.augment(as_img, m, dec.boundaries[i], index=i)
        assert np.array_equal(mask_t, mask[0].astype(np.uint8))
        assert ((img_t[..., 0] > 127) == (mask_t > 0)).mean() > 0.98  # bilinear vs nearest at the edge
    a, b = ds[0][0], ds[0][0]
    assert np.array_equal(a, b)  # deterministic per (seed, epoch, index)
    ds.augment.epoch = 1
    assert not np.array_equal(a, ds[0][0])  # a fresh draw each epoch


def test_read_pair_checks(tmp_path, data_root):
    img = data_root / "cvc-clinicdb" / "images" / "1.jpg"
    mask = data_root / "cvc-clinicdb" / "masks" / "1.png"
    rgb, m = read_pair(img, mask)
    assert rgb.shape[:2] == m.shape and m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(img.read_bytes()[:-200])
    with pytest.raises(EdgesegError, match="truncated"):
        read_pair(truncated, mask)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(mask), 0), (100, 80), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(EdgesegError, match="same size"):
        read_pair(img, small)


@pytest.mark.parametrize("sid", ["ds/../../x", "ds//abs/path", "../ds/x", "ds/./x", "ds/a\\b", "ds/", "/ds/x",
                                 "nodataset", "ds/x\0y"])
def test_ids_that_would_leave_the_data_root_are_refused(sid, tmp_path):
    from edgeseg.data.splits import check_id, image_path, mask_path

    for fn in (image_path, mask_path):
        with pytest.raises(EdgesegError, match="<dataset>/<id>"):
            fn(tmp_path, sid)
    with pytest.raises(EdgesegError, match="where:1"):
        check_id(sid, "where:1")
    assert image_path(tmp_path, "ds/sub/x") == tmp_path / "ds" / "images" / "sub" / "x.jpg"  # nested names stay in


@pytest.mark.parametrize("spec", ["seeded:cvc-clinicdb:0:42:train", "seeded:cvc-clinicdb:²:42:train",
                                  "seeded:..:4:42:train", "seeded:cvc-clinicdb:4:-1:train"])
def test_bad_seeded_specs_are_refused(spec, data_root):
    with pytest.raises(EdgesegError, match="bad split spec"):
        read_split(spec, data_root)


def test_carving_never_leaves_an_empty_part():
    with pytest.raises(EdgesegError, match="leaves none to train on"):
        carve_validation(["a/1"], 0.1, 42)
    with pytest.raises(EdgesegError, match="leaves none to train on"):
        carve_validation(["a/1", "a/2", "a/3", "a/4"], 0.9, 42)
    assert carve_validation(["a/1", "a/2"], 0.5, 42)[0]


def _jpeg(img, **params) -> bytes:
    flags = {"sampling": cv2.IMWRITE_JPEG_SAMPLING_FACTOR, "restart": cv2.IMWRITE_JPEG_RST_INTERVAL,
             "progressive": cv2.IMWRITE_JPEG_PROGRESSIVE, "optimize": cv2.IMWRITE_JPEG_OPTIMIZE}
    ok, buf = cv2.imencode(".jpg", img, [v for k, x in params.items() for v in (flags[k], x)])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("params", [{}, {"sampling": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444},
                                    {"sampling": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422}, {"restart": 1},
                                    {"restart": 5, "optimize": 1}])
@pytest.mark.parametrize("shape", [(37, 53, 3), (64, 64, 3), (29, 41)])
def test_jpeg_scan_walk_tells_complete_from_cut_short(params, shape):
    from edgeseg.data.io import jpeg_scans_complete

    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = _jpeg(img, **params)
    assert jpeg_scans_complete(data) is True
    assert jpeg_scans_complete(_jpeg(np.full(shape, 128, np.uint8), **params)) is True
    assert jpeg_scans_complete(data[: len(data) * 2 // 3] + b"\xff\xd9") is False
    assert jpeg_scans_complete(_jpeg(img, progressive=1)) is None  # not walked


def test_every_real_frame_is_a_complete_jpeg(data_root):
    from edgeseg.data.io import jpeg_scans_complete

    frames = sorted((data_root / "cvc-clinicdb" / "images").glob("*.jpg"))[:20]
    assert all(jpeg_scans_complete(p.read_bytes()) is True for p in frames)


def test_masks_of_other_depths_and_layouts(tmp_path, data_root):
    ref = read_mask(data_root / "cvc-clinicdb" / "masks" / "1.png")
    colour = np.repeat(ref[..., None] * 255, 3, axis=2)
    cv2.imwrite(str(tmp_path / "rgb.png"), colour)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([colour, np.full(ref.shape, 255, np.uint8)]))
    for name in ("rgb.png", "rgba.png"):
        assert np.array_equal(read_mask(tmp_path / name, strict=True), ref)
    grey16 = ref.astype(np.uint16) * 40000  # 16-bit, not 0/65535: thresholded at half range or refused
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    with pytest.raises(EdgesegError, match="not binary .*0/65535"):
        read_mask(tmp_path / "g16.png", strict=True)
    assert np.array_equal(read_mask(tmp_path / "g16.png"), ref)


def test_empty_and_non_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(EdgesegError, match="empty"):
        read_rgb(tmp_path / "empty.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(EdgesegError, match="not a readable image"):
        read_rgb(tmp_path / "text.png")
