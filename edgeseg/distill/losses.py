"""Distillation losses that actually transfer (the released code's do not; each function says why).

All take logits or features straight from the networks; every term has a gradient w.r.t. the student
(``tests/test_distill.py`` checks each one on a real batch).

Shapes: logits (B, 1, H, W); features (B, C, h, w); masks (B, 1, H, W) in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _match(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-pixel KL(teacher || student) between Bernoulli distributions sigmoid(z / tau), mean over pixels,
    scaled by tau^2 (Hinton) so the gradient size does not depend on the temperature.

    The released code took a softmax over a single channel, which is identically 1 (KL == 0).
    """
    s = _match(student_logits.float(), teacher_logits.shape[-2:]) / tau
    t = teacher_logits.float() / tau
    p_t = torch.sigmoid(t)
    # KL = p_t (log p_t - log p_s) + (1 - p_t) (log(1 - p_t) - log(1 - p_s)); logsigmoid keeps it stable.
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * tau * tau


def feature_mimic(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """FitNets-style L2: mean over levels of the per-element squared error, the (already adapted) student
    feature bilinearly resized to the teacher's grid."""
    terms = [F.mse_loss(_match(s.float(), t.shape[-2:]), t.float()) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(terms).mean()


def spatial_attention_kl(student_map: torch.Tensor, teacher_map: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KDAS-style attention supervision that has a gradient: KL between the *spatial* distributions
    softmax(energy / tau) over the H*W positions, where energy is the channel mean of the squared map (for a
    1-channel logit map, the logit itself is used). Scaled by tau^2, batch mean.

    The released KDAS term took a softmax over a singleton channel (constant 1: no gradient, and NaN).
    """
    def energy(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.flatten(1) if x.shape[1] == 1 else x.pow(2).mean(1).flatten(1)

    s = energy(_match(student_map, teacher_map.shape[-2:]))
    t = energy(teacher_map)
    log_p_s = F.log_softmax(s / tau, dim=1)
    log_p_t = F.log_softmax(t / tau, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau * tau


def symmetric_guiding(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KDAS's Symmetrical Guiding Module term: MSE between the symmetrised maps X + X^T of student and teacher
    logits (square maps; the student map is resized to the teacher's)."""
    s = _match(student_logits.float(), teacher_logits.shape[-2:])[:, 0]
    t = teacher_logits.float()[:, 0]
    return F.mse_loss(s + s.transpose(1, 2), t + t.transpose(1, 2))


def pixel_contrastive(embedding: torch.Tensor, teacher_logits: torch.Tensor, hi: float = 0.8, lo: float = 0.2,
                      n_per_class: int = 256, temperature: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Supervised pixel contrastive loss on the student's embedding, classes from the teacher's confidence:
    positives p_t > hi, negatives p_t < lo (the paper's preference stage; the released code used GT labels
    and a constant softmax, giving zero gradient).

    Per image, up to ``n_per_class`` pixels of each class are sampled; every sampled pixel is an anchor whose
    positives are the other sampled pixels of its class (SupCon). Images without both classes are skipped.

    Args:
        embedding: (B, C, h, w) student features (e.g. the decoder's last map through a projection head).
        teacher_logits: (B, 1, H, W) frozen teacher logits, resized to (h, w).
    """
    conf = torch.sigmoid(_match(teacher_logits.float(), embedding.shape[-2:]))[:, 0].flatten(1)  # (B, h*w)
    emb = F.normalize(embedding.float().flatten(2), dim=1)  # (B, C, h*w), unit vectors per pixel
    losses = []
    for b in range(emb.shape[0]):
        pos = torch.nonzero(conf[b] > hi).flatten()
        neg = torch.nonzero(conf[b] < lo).flatten()
        if len(pos) < 2 or len(neg) < 2:
            continue
        pos = pos[torch.randperm(len(pos), generator=generator, device=pos.device)[:n_per_class]]
        neg = neg[torch.randperm(len(neg), generator=generator, device=neg.device)[:n_per_class]]
        idx = torch.cat([pos, neg])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(emb.device)
        z = emb[b][:, idx].t()  # (n, C)
        sim = z @ z.t() / temperature
        self_mask = torch.eye(len(idx), dtype=torch.bool, device=emb.device)
        sim = sim.masked_fill(self_mask, -math.inf)
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
        same = (labels[:, None] == labels[None, :]) & ~self_mask
        losses.append(-(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1)).mean())
    if not losses:
        return embedding.sum() * 0.0  # keeps the graph; no confident pixels of both kinds in this batch
    return torch.stack(losses).mean()


def ema_anchor(params: list[torch.Tensor], ema_params: list[torch.Tensor]) -> torch.Tensor:
    """rho-regulariser of the preference stage: squared L2 distance of the student's weights to their EMA
    (a proximal pull towards the slow average; the released code used sum ||theta||_2 instead)."""
    return sum((p.float() - e.float()).pow(2).sum() for p, e in zip(params, ema_params))


def kl_weight(epoch: float, stage1_epochs: int) -> float:
    """MicroAUNet's w_KL(t) = (1 + cos(pi (T - t) / T)) / 2: 0 at the start of stage 1, 1 at its end."""
    t = min(max(epoch, 0.0), stage1_epochs)
    return 0.5 * (1 + math.cos(math.pi * (stage1_epochs - t) / stage1_epochs))
