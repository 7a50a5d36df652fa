"""Inference forms: every registered model, fused (edgeseg.models.fuse), computes what it computes eagerly,
with no BatchNorm, GSB gate computation or other fusable block left; and the one export preparation that
every backend uses (edgeseg.export.prepare.prepare) wraps, checks and reports it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeseg.export.prepare import LogitsOnly, prepare
from edgeseg.models import create_model, fuse_model, list_models
from edgeseg.models.fuse import fold_bn_into_following_conv, fold_bn_into_preceding_conv
from edgeseg.tolerances import FLOAT32_RTOL, FLOAT64_RTOL

# MicroAUNet's reflect-padded 7x7 bridge conv needs H/32 >= 4; everything else runs at 64 px.
SIDE = {"microaunet": 128, "microaunet-84k": 128}
CASES = [(name, {}) for name in list_models()] + [
    ("ultraseg-108k", {"num_classes": 2}), ("ultraseg-130k", {"num_classes": 2})]  # the authors' 2-logit head


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def _trained_like(name: str, **kw) -> nn.Module:
    """Random weights, and no parameter or statistic left at its constant init (BN running statistics, norm
    affines, biases, learned scales, GSB maps), so that every fold really has something to fold."""
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    for n, p in model.named_parameters():
        if p.dim() <= 1:
            p.add_(0.2 * torch.randn_like(p))
        elif "share_space" in n:
            p.uniform_(0.5, 1.5)
    return model


def _id(case) -> str:
    name, kw = case
    return name + "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_model_is_the_eager_model(case):
    name, kw = case
    size = SIDE.get(name, 64)
    model = _trained_like(name, **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    # float64: the same maths to rounding. float32: rounding of the folded weights through the whole net,
    # relative to the largest logit (random weights give logits in the hundreds); largest seen 1.4e-5
    # (ultraseg-108k-bn, 14 folded BatchNorms with random statistics)
    for dtype, rtol in ((torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_RTOL)):
        eager = copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            ref = eager(x.to(dtype))
            fused = fuse_model(copy.deepcopy(eager), size)
            got = LogitsOnly(fused)(x.to(dtype))
        assert got.shape == ref.shape == (1, 1, size, size)
        scale = max(1.0, float(ref.abs().max()))
        assert float((got - ref).abs().max()) <= rtol * scale, (dtype, float((got - ref).abs().max()), scale)
    assert not [type(m).__name__ for m in fused.modules() if hasattr(m, "fuse")]
    # no BN left right after a conv (a BN after an add or a block stays: the runtimes fold such a scale-shift)
    seqs = [list(m) for m in fused.modules() if isinstance(m, nn.Sequential)]
    assert not [b for seq in seqs for a, b in zip(seq, seq[1:]) if isinstance(a, nn.Conv2d) and
                isinstance(b, nn.BatchNorm2d)]
    if not name.endswith("-bn"):  # the seed models have no BN that is not next to a conv
        assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not [n for n, _ in fused.named_parameters() if "share_space" in n]  # no GSB gate computed per call
    if kw.get("num_classes") == 2:
        assert isinstance(fused.final, nn.Conv2d) and fused.final.out_channels == 1
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # fused a copy only


def test_bn_folds_are_exact():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6).eval().double()
    bn.running_mean.uniform_(-2, 2), bn.running_var.uniform_(0.2, 3)
    nn.init.uniform_(bn.weight, -1, 1), nn.init.uniform_(bn.bias, -1, 1)
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    before = nn.Conv2d(6, 5, 2, stride=2).double()
    after = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False).double()
    with torch.no_grad():
        torch.testing.assert_close(fold_bn_into_following_conv(bn, before)(x), before(bn(x)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fold_bn_into_preceding_conv(after, bn)(x), bn(after(x)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="padded or grouped"):
        fold_bn_into_following_conv(bn, after)


def test_prepare_reports_and_refuses_a_different_function():
    model = _trained_like("ultraseg-130k", num_classes=2)
    prepared, report = prepare(model, 64)
    assert isinstance(prepared, LogitsOnly) and not prepared.training
    assert not any(p.requires_grad for p in prepared.parameters())
    assert report["bn_folded"] == 4  # 3 Down + the spatial attention's BN
    assert report["blocks_fused"]["GSB"] == 4 and report["blocks_fused"]["TwoLogitHead"] == 1
    assert report["max_abs_diff_fp64"] < 1e-10 and report["max_abs_diff"] < 1e-3
    assert any(p.requires_grad for p in model.parameters())  # the model itself is untouched

    def off_by_a_bit(m):
        m.final.bias.data += 1e-6
        return m

    with pytest.raises(RuntimeError, match="not equivalent"):
        prepare(model, 64, rewrite=off_by_a_bit)
