"""Offline logit distillation (--teacher-cache): the cached map follows the augmentation's geometry only, the
cache is keyed by teacher, size and frames and rebuilt when damaged, and a cached run trains like an online one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from _helpers import one_line_error

import edgeseg.train as train_mod
from edgeseg.checkpoint import load_model, make_checkpoint, read_checkpoint, save_atomic
from edgeseg.config import DistillConfig, build_config
from edgeseg.contract import InputContract
from edgeseg.data import Augment, SegDataset, load_decoded, read_split
from edgeseg.distill import Distiller
from edgeseg.distill.cache import cached_teacher_logits, compute_teacher_logits
from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256
from edgeseg.losses import SegLoss
from edgeseg.models import create_model

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teacher checkpoints with a 64x64 contract: the shipped UltraSeg-108K and a perturbed copy."""
    d = tmp_path_factory.mktemp("teachers")
    model, _, _ = load_model("ultraseg-108k-pranet")
    first = save_atomic(make_checkpoint(model, InputContract(size=SIZE)), d / "t1.pt")
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)
    return first, save_atomic(make_checkpoint(model, InputContract(size=SIZE)), d / "t2.pt")


@pytest.fixture(scope="module")
def decoded(data_root, tiny_split):
    ids = read_split(str(tiny_split), data_root)[:6]
    return load_decoded(data_root, ids, SIZE)


def _counting(model):
    """Wrap ``model.forward_all`` to count its calls in ``model.calls``."""
    real, model.calls = model.forward_all, 0

    def forward_all(x):
        model.calls += 1
        return real(x)

    model.forward_all = forward_all
    return model


def _build(teacher_ckpt, data_root, decoded, cache_dir, size=SIZE):
    teacher = _counting(load_model(teacher_ckpt)[0])
    logits = cached_teacher_logits(teacher, file_sha256(teacher_ckpt), data_root, decoded, InputContract(size=size),
                                   cache_dir)
    return logits, teacher.calls


def test_extra_map_follows_the_geometry_without_colour_jitter(decoded):
    aug, plain = Augment(seed=3), Augment(seed=3, brightness=0, contrast=0, saturation=0)
    for i, (img, mask, bnd) in enumerate(zip(decoded.images, decoded.masks, decoded.boundaries)):
        without = aug(img, mask, bnd, index=i)
        with_mask = aug(img, mask, bnd, index=i, extra=mask.astype(np.float32))
        assert len(without) == 3 and len(with_mask) == 4
        for a, b in zip(without, with_mask):  # the extra map draws nothing: image and labels are unchanged
            assert np.array_equal(a, b)
        warped = with_mask[3]
        assert warped.dtype == np.float32 and warped.shape == (SIZE, SIZE)
        assert ((warped > 0.5) == (with_mask[1] > 0)).mean() >= 0.99  # linear vs nearest at the edge only
        # A map equal to the red channel warps like the image without colour jitter, not like the jittered image.
        red = aug(img, mask, bnd, index=i, extra=img[..., 0].astype(np.float32))[3]
        assert np.abs(red - plain(img, mask, bnd, index=i)[0][..., 0]).max() <= 1.0
    assert np.abs(red - without[0][..., 0].astype(np.float32)).mean() > 2  # the jitter did change the image


def test_dataset_returns_teacher_logits_only_when_given(decoded):
    logits = np.random.default_rng(0).normal(size=(len(decoded), SIZE, SIZE)).astype(np.float16)
    contract = InputContract(size=SIZE)
    for augment in (None, Augment(seed=1)):
        plain, cached = SegDataset(decoded, contract, augment), SegDataset(decoded, contract, augment, logits)
        assert len(plain[0]) == 3 and len(cached[0]) == 4
        for a, b in zip(plain[2], cached[2]):
            assert np.array_equal(a, b)
        t = cached[2][3]
        assert t.shape == (1, SIZE, SIZE) and t.dtype == np.float32
        if augment is None:
            assert np.array_equal(t[0], logits[2].astype(np.float32))  # the cached map as is


def test_cache_hits_and_is_keyed_by_teacher_and_size(teachers, data_root, decoded, tmp_path):
    cache = tmp_path / "tc"
    first, calls = _build(teachers[0], data_root, decoded, cache)
    assert calls == 1 and first.shape == (len(decoded), SIZE, SIZE) and first.dtype == np.float16
    assert len(list(cache.glob("*.npz"))) == 1
    again, calls = _build(teachers[0], data_root, decoded, cache)
    assert calls == 0 and np.array_equal(first, again)  # served from the file: no teacher forward
    other, calls = _build(teachers[1], data_root, decoded, cache)
    assert calls == 1 and len(list(cache.glob("*.npz"))) == 2 and not np.array_equal(first, other)
    bigger = load_decoded(data_root, decoded.ids, 96)
    logits, calls = _build(teachers[0], data_root, bigger, cache, size=96)
    assert calls == 1 and logits.shape == (len(decoded), 96, 96) and len(list(cache.glob("*.npz"))) == 3


def test_damaged_cache_is_rebuilt_with_a_warning(teachers, data_root, decoded, tmp_path, caplog):
    cache = tmp_path / "tc"
    first, _ = _build(teachers[0], data_root, decoded, cache)
    (path,) = cache.glob("*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="edgeseg"):
        rebuilt, calls = _build(teachers[0], data_root, decoded, cache)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert calls == 1 and len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert np.array_equal(first, rebuilt)
    np.savez(path, ids=np.array(decoded.ids), logits=first.astype(np.float32))  # readable, but the wrong dtype
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeseg"):
        again, calls = _build(teachers[0], data_root, decoded, cache)
    assert calls == 1 and "does not match" in caplog.text and np.array_equal(first, again)
    _, calls = _build(teachers[0], data_root, decoded, cache)
    assert calls == 0


def test_a_file_as_cache_folder_is_refused(teachers, data_root, decoded, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(EdgesegError, match="--teacher-cache .* is a file"):
        _build(teachers[0], data_root, decoded, tmp_path / "f")


@pytest.mark.parametrize("recipe, folder, needles", [
    ("feature", "tc", ("--teacher-cache", "logit, kdas", "'feature'")),
    ("logit", "file", ("--teacher-cache", "is a file")),
])
def test_cli_refuses_teacher_cache_in_one_line(cli, teachers, tiny_split, data_root, tmp_path, recipe, folder,
                                               needles):
    (tmp_path / "file").write_text("x")
    code, _, err = cli("distill", "--teacher", teachers[0], "--student", "ultraseg-108k", "--recipe", recipe,
                       "--teacher-cache", tmp_path / folder, "--train-split", tiny_split, "--data-root", data_root,
                       "--size", SIZE, "--epochs", 1, "--batch-size", 2, "--threads", 1, "--out", tmp_path / "r")
    one_line_error(code, err, *needles)
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.parametrize("recipe", ["logit", "kdas"])
def test_cached_and_online_give_the_same_loss(teachers, decoded, recipe):
    """With a geometric no-op augmentation the cached logits are the online teacher's to float16 precision, and
    the distillation loss is the same."""
    contract = InputContract(size=SIZE)
    teacher = load_model(teachers[0])[0]
    noop = Augment(hflip=0, vflip=0, rotate=0, scale=(1, 1), brightness=0, contrast=0, saturation=0)
    cached_logits = compute_teacher_logits(teacher, decoded.images, contract, np.float16)  # as the cache stores
    data = SegDataset(decoded, contract, noop, cached_logits)
    x, mask, bnd, cached = (torch.from_numpy(np.stack(t)) for t in zip(*(data[i] for i in range(4))))
    torch.manual_seed(0)
    student = create_model("ultraseg-108k")
    d = Distiller(student, teacher, SegLoss(student.region_weights, student.boundary_weights), recipe, SIZE, 1).train()
    with torch.no_grad():
        online = teacher.forward_all(x)["logits"]
    assert torch.allclose(cached, online, rtol=1e-3, atol=1e-3)
    loss_cached, loss_online = d(x, mask, bnd, cached)["loss"], d(x, mask, bnd)["loss"]
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=1e-4)


def test_distiller_refuses_cached_logits_for_a_feature_recipe(teachers):
    student = create_model("ultraseg-108k")
    d = Distiller(student, load_model(teachers[0])[0], SegLoss(), "feature", SIZE, 1)
    x = torch.zeros(2, 3, SIZE, SIZE)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    with pytest.raises(EdgesegError, match="'feature' needs the teacher's features.*logit and kdas"):
        d(x, mask, mask, mask)


def test_cached_logit_distillation_runs_end_to_end(teachers, tiny_split, data_root, tmp_path, monkeypatch):
    teachers_loaded = []

    def load_counting(path, *a, **kw):
        model, contract, ckpt = load_model(path, *a, **kw)
        teachers_loaded.append(_counting(model))
        return model, contract, ckpt

    monkeypatch.setattr(train_mod, "load_model", load_counting)

    def cfg(out):
        return build_config("default", model="ultraseg-108k", train_split=str(tiny_split), val_fraction=0.25, epochs=1,
                            batch_size=3, size=SIZE, data_root=str(data_root), out=str(tmp_path / out), threads=1,
                            distill=DistillConfig(teacher=str(teachers[0]), recipe="logit",
                                                  teacher_cache=str(tmp_path / "tc")))

    train_mod.run(cfg("first"))
    assert teachers_loaded[0].calls == 1  # 9 training frames in one batch for the cache, none during the steps
    ckpt = read_checkpoint(tmp_path / "first" / "last.pt")
    assert ckpt["distill"]["teacher_cache"] is True
    assert ckpt["config"]["distill"]["teacher_cache"] == str(tmp_path / "tc")
    assert len(list((tmp_path / "tc").glob("teacher-64-*.npz"))) == 1
    train_mod.run(cfg("second"))
    assert teachers_loaded[1].calls == 0  # the second run is served from the cache
    assert load_model(tmp_path / "second" / "best.pt")[0].model_name == "ultraseg-108k"
