"""Hand-computed checks of edgeseg.losses: soft Dice, BCE + Dice, deep supervision, SegLoss, bf16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgeseg.losses import (
    ULTRASEG_BOUNDARY_WEIGHTS,
    ULTRASEG_REGION_WEIGHTS,
    SegLoss,
    bce_dice_loss,
    deep_supervision_loss,
    soft_dice_loss,
)

LN2, LN3 = math.log(2), math.log(3)


def _logit(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64)).float()


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


# Sample 1: p = [.75, .25, .5, .5], g = [1, 0, 1, 0]: sum(pg) = .75 + .5 = 1.25, sum(p) = 2, sum(g) = 2.
# Sample 2: p = .5 everywhere, g = 0: sum(pg) = 0, sum(p) = 2, sum(g) = 0.
P1, G1 = [[[[0.75, 0.25], [0.5, 0.5]]]], [[[[1.0, 0.0], [1.0, 0.0]]]]
P2, G2 = [[[[0.5, 0.5], [0.5, 0.5]]]], [[[[0.0, 0.0], [0.0, 0.0]]]]

SOFT_DICE_CASES = [
    # smooth 1: 1 - (2*1.25 + 1) / (2 + 2 + 1) = 1 - 3.5/5 = 0.3
    (P1, G1, 1.0, 0.3),
    # smooth 0: 1 - 2.5/4 = 0.375
    (P1, G1, 0.0, 0.375),
    # batch of two, smooth 1: sample 2 gives (0 + 1)/(2 + 0 + 1) = 1/3 -> 1 - (0.7 + 1/3)/2
    (P1 + P2, G1 + G2, 1.0, 1 - (0.7 + 1 / 3) / 2),
]


@pytest.mark.parametrize("p, g, smooth, want", SOFT_DICE_CASES)
def test_soft_dice_table(p, g, smooth, want):
    assert soft_dice_loss(_logit(p), _t(g), smooth=smooth).item() == pytest.approx(want, rel=1e-6)


# BCE of sample 1: -ln .75 (p .75, g 1), -ln .75 (p .25, g 0), -ln .5 twice -> mean (ln(4/3) + ln 2)/2
BCE_1 = (math.log(4 / 3) + LN2) / 2  # 0.4904146


@pytest.mark.parametrize("wb, wd, want", [(1.0, 1.0, BCE_1 + 0.3), (2.0, 0.5, 2 * BCE_1 + 0.5 * 0.3), (0.0, 1.0, 0.3)])
def test_bce_dice_table(wb, wd, want):
    assert bce_dice_loss(_logit(P1), _t(G1), wb=wb, wd=wd).item() == pytest.approx(want, rel=1e-6)


def test_bce_dice_matches_manual_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 7, generator=gen) * 3
    target = (torch.rand(3, 1, 5, 7, generator=gen) > 0.6).float()
    p = 1 / (1 + torch.exp(-logits.double()))
    g = target.double()
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()
    dice = (2 * (p * g).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + g.sum((1, 2, 3)) + 1)
    want = 1.5 * bce + 0.7 * (1 - dice.mean())
    assert bce_dice_loss(logits, target, wb=1.5, wd=0.7).item() == pytest.approx(want.item(), rel=1e-5)


def test_one_sigmoid_only():
    # Confident correct logits must give ~0 loss. With a second sigmoid (the released UltraSeg bug) the
    # BCE would floor at -ln(sigmoid(1)) = 0.31 and the Dice probabilities would stay below 0.73.
    target = _t([[[[1.0, 0.0], [1.0, 0.0]]]])
    logits = (target * 2 - 1) * 30
    assert bce_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    out = {"logits": logits, "region": [logits], "boundary": []}
    assert deep_supervision_loss(out, target, None, (1.0,), ())["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        soft_dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError):
        bce_dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))


# Deep supervision on 4x4 maps with constant side logits, so bilinear upsampling changes nothing and every
# term is a closed form. Mask: top two rows (8 of 16 pixels). Boundary map: row 2 (4 of 16 pixels).
# R(p, t) = 0.5 * BCE + soft Dice (smooth 1), p = constant probability.
#   mask, p .5 : BCE ln2;                          Dice (2*4 + 1)/(8 + 8 + 1) = 9/17   -> R = ln2/2 + 8/17
#   mask, p .75: BCE (ln(4/3) + ln4)/2 (half each); Dice (2*6 + 1)/(12 + 8 + 1) = 13/21 -> R = BCE/2 + 8/21
#   mask, p .25: same BCE;                           Dice (2*2 + 1)/(4 + 8 + 1) = 5/13   -> R = BCE/2 + 8/13
#   edge, p .5 : BCE ln2;                          Dice (2*2 + 1)/(8 + 4 + 1) = 5/13   -> R = ln2/2 + 8/13
#   edge, p .25: BCE (4 ln4 + 12 ln(4/3))/16;       Dice (2*1 + 1)/(4 + 4 + 1) = 1/3    -> R = BCE/2 + 2/3
BCE_HALF = (math.log(4 / 3) + math.log(4)) / 2
R_M50, R_M75, R_M25 = LN2 / 2 + 8 / 17, BCE_HALF / 2 + 8 / 21, BCE_HALF / 2 + 8 / 13
R_E50, R_E25 = LN2 / 2 + 8 / 13, (4 * math.log(4) + 12 * math.log(4 / 3)) / 32 + 2 / 3
MAIN_75 = BCE_HALF + 8 / 21  # full-weight BCE + Dice of the main head at p .75


def _const(value, size, batch=2):
    return torch.full((batch, 1, size, size), float(value))


def _ds_example():
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    edge = torch.zeros(2, 1, 4, 4)
    edge[:, :, 2] = 1
    out = {
        "logits": _const(LN3, 4),  # sigmoid(ln 3) = .75
        "region": [_const(0, 1), _const(LN3, 2), _const(-LN3, 2), _const(0, 4)],  # p .5, .75, .25, .5
        "boundary": [_const(0, 1), _const(-LN3, 2), _const(0, 4)],  # p .5, .25, .5
        "features": [],  # other keys are ignored
    }
    return out, mask, edge


def test_deep_supervision_weighting():
    out, mask, edge = _ds_example()
    got = deep_supervision_loss(out, mask, edge, ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)
    want_region = 0.1 * R_M50 + 0.2 * R_M75 + 0.3 * R_M25 + 0.4 * R_M50
    want_edge = 0.1 * R_E50 + 0.2 * R_E25 + 0.3 * R_E50
    assert got["main"].item() == pytest.approx(MAIN_75, rel=1e-6)
    assert got["region"].item() == pytest.approx(want_region, rel=1e-6)
    assert got["boundary"].item() == pytest.approx(want_edge, rel=1e-6)
    assert got["loss"].item() == pytest.approx(MAIN_75 + want_region + want_edge, rel=1e-6)
    assert not got["main"].requires_grad


def test_side_outputs_upsampled_bilinear_as_logits():
    # A (2, 2) side map with columns [0, 4] becomes [0, 1, 3, 4] at 4 wide under bilinear,
    # align_corners=False (source x = (i + .5)/2 - .5 = -.25 -> clamp 0, .25, .75, 1.25 -> clamp 1).
    _, mask, _ = _ds_example()
    side = _t([[[[0.0, 4.0], [0.0, 4.0]]]]).expand(2, 1, 2, 2)
    up = _t([0.0, 1.0, 3.0, 4.0]).expand(2, 1, 4, 4)
    main = torch.zeros(2, 1, 4, 4)
    got = deep_supervision_loss({"logits": main, "region": [side]}, mask, None, (1.0,), ())
    want = 0.5 * F.binary_cross_entropy_with_logits(up, mask) + soft_dice_loss(up, mask)
    assert got["region"].item() == pytest.approx(want.item(), rel=1e-6)


def test_mismatched_weights_raise():
    out, mask, edge = _ds_example()
    with pytest.raises(ValueError):
        deep_supervision_loss(out, mask, edge, (0.1, 0.2, 0.3), ULTRASEG_BOUNDARY_WEIGHTS)
    with pytest.raises(ValueError):
        deep_supervision_loss(out, mask, edge, ULTRASEG_REGION_WEIGHTS, (0.1, 0.2))
    with pytest.raises(ValueError):  # boundary weights but no boundary map
        deep_supervision_loss(out, mask, None, ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)
    with pytest.raises(ValueError):  # side outputs present, module built without weights
        SegLoss()(out, mask, edge)


def test_segloss_main_only_and_with_side_outputs():
    out, mask, edge = _ds_example()
    plain = SegLoss()
    logits = out["logits"]
    for main_only in (logits, {"logits": logits}, {"logits": logits, "region": [], "boundary": []}):
        got = plain(main_only, mask)
        assert got["loss"].item() == pytest.approx(MAIN_75, rel=1e-6)
        assert got["region"].item() == 0.0 and got["boundary"].item() == 0.0
    full = SegLoss(ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)
    want = deep_supervision_loss(out, mask, edge, ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)
    assert full(out, mask, edge)["loss"].item() == pytest.approx(want["loss"].item())


def test_gradients_finite_and_nonzero():
    gen = torch.Generator().manual_seed(0)
    _, mask, edge = _ds_example()
    leaves = {
        "logits": torch.randn(2, 1, 4, 4, generator=gen, requires_grad=True),
        "region": [torch.randn(2, 1, s, s, generator=gen, requires_grad=True) for s in (1, 2, 2, 4)],
        "boundary": [torch.randn(2, 1, s, s, generator=gen, requires_grad=True) for s in (1, 2, 4)],
    }
    loss = SegLoss(ULTRASEG_REGION_WEIGHTS, ULTRASEG_BOUNDARY_WEIGHTS)(leaves, mask, edge)["loss"]
    loss.backward()
    for x in [leaves["logits"], *leaves["region"], *leaves["boundary"]]:
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_bf16_autocast_is_finite_fp32_and_close():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    mask = (torch.rand(2, 1, 16, 16, generator=gen) > 0.5).float()
    edge = (torch.rand(2, 1, 16, 16, generator=gen) > 0.8).float()
    head = torch.nn.Conv2d(3, 1, 3, padding=1)
    side = torch.nn.Conv2d(3, 1, 1)
    crit = SegLoss((0.5,), (0.5,))

    def run():
        out = {"logits": head(x), "region": [side(x[..., ::4, ::4])], "boundary": [side(x[..., ::2, ::2])]}
        return out, crit(out, mask, edge)

    _, ref = run()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out, got = run()
        assert out["logits"].dtype == torch.bfloat16  # the network really ran in bf16
        dice_bf16 = soft_dice_loss(out["logits"], mask)
    # the loss maths ran in fp32 on the bf16 logits: same as casting them up outside autocast
    assert dice_bf16.dtype == torch.float32
    assert dice_bf16.item() == pytest.approx(soft_dice_loss(out["logits"].float(), mask).item(), rel=1e-6)
    for key in ("loss", "main", "region", "boundary"):
        assert got[key].dtype == torch.float32 and torch.isfinite(got[key])
        assert got[key].item() == pytest.approx(ref[key].item(), rel=2e-2)
    got["loss"].backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
