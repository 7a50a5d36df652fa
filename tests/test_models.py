"""Model zoo: documented parameter/MAC counts, the forward contract, registry errors, state_dict round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from edgeseg.errors import EdgesegError
from edgeseg.models import create_model, list_models
from edgeseg.models.counting import count_macs, count_params, count_params_thop

# The 2-class UltraSeg head is the released one, so the seed papers' counts are for it.
BUILD_KW = {"ultraseg-108k": {"num_classes": 2}, "ultraseg-130k": {"num_classes": 2}}
MALUNET_FAMILY = ("malunet", "microaunet", "microaunet-84k")
# MicroAUNet's reflect-padded 7x7 bridge conv needs H/32 >= 4; everything else runs at 64 px.
SIDE = {"microaunet": 128, "microaunet-84k": 128}
DEFAULT_SIDE = 64
REL_TOL_MACS = 0.03
REL_TOL_UNET_PARAMS = 0.02


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(name: str, seed: int = 0, released: bool = False):
    torch.manual_seed(seed)
    return create_model(name, **(BUILD_KW.get(name, {}) if released else {}))


def _input(name: str, batch: int = 2) -> torch.Tensor:
    side = SIDE.get(name, DEFAULT_SIDE)
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


# The seed papers' counts: parameters() as the released code counts it, and thop 0.1.1.
EXACT_COUNTS = {
    #  name            parameters()  thop
    "microaunet":     (24_881,       23_687),
    "microaunet-84k": (84_281,       81_895),
    "malunet":        (177_943,      175_031),
    "ultraseg-108k":  (126_030,      108_071),
    "ultraseg-130k":  (147_683,      129_721),
}
MACS_AT_256 = {"microaunet": 0.020e9, "microaunet-84k": 0.049e9, "malunet": 0.083e9,
               "ultraseg-108k": 0.144e9, "ultraseg-130k": 0.149e9}
UNET_PARAMS = {"unet-tiny": 0.102e6, "unet-small": 0.389e6, "unet-light": 0.861e6, "unet-medium": 1.519e6,
               "unet-base": 31.0e6}


@pytest.mark.parametrize("name", EXACT_COUNTS)
def test_exact_param_counts(name):
    model = _build(name, released=True)
    params, thop = EXACT_COUNTS[name]
    assert count_params(model) == params
    # Which modules run does not depend on the input size, so the smallest valid probe will do.
    assert count_params_thop(model, input_size=128) == thop


@pytest.mark.parametrize("name", MACS_AT_256)
def test_macs_match_spec(name):
    assert count_macs(_build(name, released=True), input_size=256) == pytest.approx(MACS_AT_256[name], rel=REL_TOL_MACS)


@pytest.mark.parametrize("name", UNET_PARAMS)
def test_unet_param_counts(name):
    model = _build(name)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params(model) == pytest.approx(UNET_PARAMS[name], rel=REL_TOL_UNET_PARAMS)


def test_malunet_memory_units_stay_tied():
    model = _build("malunet")
    ea = model.encoders[3][0]
    assert ea.memory_value.weight is ea.memory_key.weight
    # parameters() sees each tied weight once; count_params counts both convs, as the released code did.
    assert sum(p.numel() for p in model.parameters()) == 146_711
    clone = copy.deepcopy(model)
    assert clone.encoders[3][0].memory_value.weight is clone.encoders[3][0].memory_key.weight
    assert clone.encoders[3][0].memory_key.weight is not ea.memory_key.weight
    # Both uses feed the one gradient.
    model.train()
    model(_input("malunet"))["logits"].sum().backward()
    assert ea.memory_key.weight.grad is not None and ea.memory_key.weight.grad.abs().sum() > 0


def test_counters_leave_model_unchanged():
    model = _build("microaunet")
    model.train()
    model.bridge.eval()  # a sub-module in its own mode must keep it
    count_params_thop(model, input_size=128)
    count_macs(model, input_size=128)
    assert model.training and not model.bridge.training and model.encoders[0].training
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", [n for n in list_models() if n != "unet-base"])
def test_forward_contract(name):
    model = _build(name)
    x = _input(name)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 1, *x.shape[-2:])
    assert torch.isfinite(logits).all()

    model.train()
    out = model(x)
    assert set(out) >= {"logits", "region", "boundary", "features", "embedding"}
    assert out["logits"].shape == (2, 1, *x.shape[-2:])
    for side in out["region"] + out["boundary"]:
        assert side.shape[:2] == (2, 1) and torch.isfinite(side).all()
    feats = out["features"]
    assert feats and all(f.dim() == 4 and f.shape[0] == 2 and torch.isfinite(f).all() for f in feats)
    assert [f.shape[-1] for f in feats] == sorted((f.shape[-1] for f in feats), reverse=True)  # finest first
    assert out["embedding"].dim() == 4 and torch.isfinite(out["embedding"]).all()
    if name in MALUNET_FAMILY:
        side = x.shape[-1]
        assert [tuple(f.shape[1:]) for f in feats] == [
            (c, side >> (i + 1), side >> (i + 1)) for i, c in enumerate(model.channels[:5])
        ]


def test_unknown_model_suggests_nearest():
    with pytest.raises(EdgesegError, match="Did you mean 'microaunet-84k'"):
        create_model("microaunet-84")


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip(name):
    source = _build(name, seed=0)
    state = source.state_dict()
    params = {k for k, _ in source.named_parameters(remove_duplicate=False)}
    with torch.no_grad():  # non-default saved buffers, so that BatchNorm statistics are part of the check
        for key, value in state.items():
            if key not in params and value.is_floating_point():
                value.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    target = _build(name, seed=1)
    target.load_state_dict(torch.load(buf, weights_only=True))
    # unet-base is only ever run at a toy size.
    x = _input(name, batch=1)[..., :32, :32] if name == "unet-base" else _input(name, batch=1)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_malunet_exports_to_onnx():
    pytest.importorskip("onnx")
    buf = io.BytesIO()
    torch.onnx.export(_build("malunet").eval(), (_input("malunet", batch=1),), buf, dynamo=False)
    assert buf.getbuffer().nbytes > 0
