"""Distillation: every loss term of every recipe has a finite, non-zero gradient w.r.t. the student on a real
batch; nothing of the distiller leaks into the student; contracts are checked; resume keeps stage and EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgeseg.train as train_mod
from edgeseg.checkpoint import load_model, make_checkpoint, read_checkpoint, save_atomic
from edgeseg.config import DistillConfig, build_config
from edgeseg.contract import InputContract
from edgeseg.data import load_decoded, read_split
from edgeseg.distill import RECIPES, Distiller
from edgeseg.distill.distiller import teacher_for_student
from edgeseg.errors import EdgesegError
from edgeseg.export import export
from edgeseg.losses import SegLoss
from edgeseg.models import count_params, create_model

SIZE = 128


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, authors_ckpt):
    """The authors' trained UltraSeg-130K as a confident teacher, saved with a 128x128 contract."""
    d = tmp_path_factory.mktemp("teacher")
    model, _, _ = load_model(authors_ckpt)
    return save_atomic(make_checkpoint(model, InputContract(size=SIZE)), d / "teacher128.pt")


@pytest.fixture(scope="module")
def batch(data_root):
    ids = read_split("pranet-test-kvasir", data_root)[:2]
    dec = load_decoded(data_root, ids, SIZE)
    x = torch.from_numpy(np.stack([InputContract(size=SIZE).normalise(i) for i in dec.images]))
    mask = torch.from_numpy(dec.masks[:, None].astype(np.float32))
    return x, mask, torch.from_numpy(dec.boundaries[:, None].astype(np.float32))


def _distiller(teacher_ckpt, recipe, student="microaunet", epochs=4):
    torch.manual_seed(0)
    model = create_model(student)
    teacher, _, _ = load_model(teacher_ckpt)
    return Distiller(model, teacher, SegLoss(model.region_weights, model.boundary_weights), recipe, SIZE, epochs,
                     stage1_epochs=2 if recipe == "microaunet-2stage" else None)


def _assert_every_term_has_gradient(d, batch):
    x, mask, bnd = batch
    s = d.student(x)
    with torch.no_grad():
        t = d.teacher.forward_all(x)
    terms = {"task": d.criterion(s, mask, bnd)["loss"], **d._terms(s, t)}
    params = [p for p in d.student.parameters() if p.requires_grad]
    for name, value in terms.items():
        assert torch.isfinite(value), (d.recipe, name, value)
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        assert torch.isfinite(flat).all(), (d.recipe, name)
        assert flat.abs().sum() > 0, f"{d.recipe}: term {name!r} has zero gradient w.r.t. the student"
    return terms


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "microaunet-2stage"])
def test_every_term_of_single_stage_recipes_has_gradient(teacher_ckpt, batch, recipe):
    d = _distiller(teacher_ckpt, recipe).train()
    d.set_epoch(0)
    _assert_every_term_has_gradient(d, batch)


def test_both_stages_of_microaunet_2stage_have_gradients(teacher_ckpt, batch):
    d = _distiller(teacher_ckpt, "microaunet-2stage").train()
    d.set_epoch(0.5)
    terms = _assert_every_term_has_gradient(d, batch)
    assert set(terms) == {"task", "mimic", "kl"} and d.weights()["kl"] == pytest.approx(0.5 * (1 - 2 ** -0.5), abs=1e-6)
    assert len(d.pairs) == 4  # microaunet t1..t4 meet UltraSeg's strides 2..16; t5 (stride 32) has no partner
    d.set_epoch(2.0)  # stage 2: EMA initialised from the student
    assert d.stage == 2 and d.ema is not None
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    d(*batch)["loss"].backward()
    opt.step()
    d.after_step()  # the EMA now lags the student, so the anchor term is live
    terms = _assert_every_term_has_gradient(d, batch)
    assert set(terms) == {"task", "contrast", "anchor"}
    assert d.eval_model() is d.ema


def test_teacher_is_frozen_and_never_in_the_student(teacher_ckpt):
    d = _distiller(teacher_ckpt, "microaunet-2stage")
    assert all(not p.requires_grad for p in d.teacher.parameters()) and not d.teacher.training
    assert not any(k.startswith("teacher") for k in d.state_dict())
    ids = {id(p) for p in d.parameters()}
    assert not ids & {id(p) for p in d.teacher.parameters()}


def test_size_mismatch_is_refused_with_both_values(teacher_ckpt, tiny_split, data_root, tmp_path):
    cfg = build_config("default", model="microaunet", train_split=str(tiny_split), val_fraction=0.25, epochs=1,
                       size=256, data_root=str(data_root), out=str(tmp_path / "r"),
                       distill=DistillConfig(teacher=str(teacher_ckpt), recipe="logit"))
    with pytest.raises(EdgesegError, match=r"expects 128x128 input but the student is trained at 256x256"):
        train_mod.run(cfg)


def test_teacher_with_its_own_normalisation_sees_its_own_input(teacher_ckpt, batch):
    """A teacher trained with ImageNet mean/std teaching a student without normalisation gets, through the
    per-channel conversion, exactly the input it was trained on."""
    teacher, _, _ = load_model(teacher_ckpt)
    student = InputContract(size=SIZE)
    imagenet = InputContract(size=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert teacher_for_student(teacher, student, student) is teacher
    wrapped = teacher_for_student(teacher, imagenet, student)
    x_student = batch[0]
    x_own = (x_student - torch.tensor(imagenet.mean).view(1, 3, 1, 1)) / torch.tensor(imagenet.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.forward_all(x_student)["logits"], teacher.forward_all(x_own)["logits"],
                                   rtol=1e-4, atol=1e-4)
    assert wrapped.model_name == teacher.model_name
    d = Distiller(create_model("microaunet"), wrapped, SegLoss(), "feature", SIZE, 4)
    assert d.pairs and not any(k.startswith("teacher") for k in d.state_dict())


def test_recipe_needing_features_the_teacher_lacks_names_it(teacher_ckpt, monkeypatch):
    teacher, _, _ = load_model(teacher_ckpt)
    real = teacher.forward_all
    monkeypatch.setattr(teacher, "forward_all", lambda x: {**real(x), "features": []})
    student = create_model("microaunet")
    with pytest.raises(EdgesegError, match="feature.*'ultraseg-130k' exposes strides none"):
        Distiller(student, teacher, SegLoss(), "feature", SIZE, 4)


def _distill_cfg(teacher_ckpt, tiny_split, data_root, out, **kw):
    return build_config("default", model="microaunet", train_split=str(tiny_split), val_fraction=0.25, epochs=3,
                        batch_size=3, size=SIZE, data_root=str(data_root), out=str(out), threads=1,
                        distill=DistillConfig(teacher=str(teacher_ckpt), recipe="microaunet-2stage", stage1_epochs=1),
                        **kw)


def test_distilled_checkpoint_is_a_plain_student_and_resume_keeps_stage_and_ema(
        teacher_ckpt, tiny_split, data_root, tmp_path, monkeypatch):
    train_mod.run(_distill_cfg(teacher_ckpt, tiny_split, data_root, tmp_path / "straight"))
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    assert straight["distill"]["recipe"] == "microaunet-2stage" and straight["distill"]["teacher"] == "ultraseg-130k"
    assert len(straight["distill"]["teacher_sha256"]) == 64
    model, _, _ = load_model(tmp_path / "straight" / "best.pt")
    plain = create_model("microaunet")
    assert count_params(model) == count_params(plain) == 24_881
    assert set(model.state_dict()) == set(plain.state_dict())
    assert straight["train_state"]["objective"]["ema"] is not None
    onnx = pytest.importorskip("onnx")
    # the deployed artefact too: the distilled student's ONNX holds exactly the plain student's weights
    with torch.no_grad():  # an untrained init's ones and zeros could be simplified away; trained weights are not
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    plain_ckpt = save_atomic(make_checkpoint(plain, InputContract(size=SIZE)), tmp_path / "plain.pt")
    onnx_params = {}
    for name, ckpt in (("distilled", tmp_path / "straight" / "best.pt"), ("plain", plain_ckpt)):
        # a 3-epoch student's logits sit near 0, so its fp32 parity may flip a few pixels: weights are what count here
        folder = export(ckpt, "onnx", tmp_path / f"art-{name}", parity_split=str(tiny_split), data_root=data_root,
                        max_delta=0.999).path
        graph = onnx.load(str(folder / "model.onnx")).graph
        sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
        # counted per use: the simplifier merges initializers whose values happen to be equal
        onnx_params[name] = sum(sizes.get(i, 0) for node in graph.node for i in node.input)
    assert onnx_params["distilled"] == onnx_params["plain"] > 0

    real_epoch = train_mod._train_epoch

    def dies_in_epoch_3(cfg, net, objective, opt, loader, epoch, rank):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(cfg, net, objective, opt, loader, epoch, rank)

    monkeypatch.setattr(train_mod, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(_distill_cfg(teacher_ckpt, tiny_split, data_root, tmp_path / "resumed"))
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    train_mod.run(_distill_cfg(teacher_ckpt, tiny_split, data_root, tmp_path / "resumed"), resume=True)
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in ("state_dict",):
        for k, v in straight[key].items():
            assert torch.equal(v, resumed[key][k]), k  # the EMA weights: stage and EMA survived the restart
    for k, v in straight["train_state"]["student"].items():
        assert torch.equal(v, resumed["train_state"]["student"][k]), k
