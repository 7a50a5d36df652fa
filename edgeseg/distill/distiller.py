"""The Distiller: a frozen teacher, a student, and the recipe that ties them.

Recipes:
  ``logit``              task + alpha * Bernoulli KL on temperature-scaled logits
  ``feature``            task + alpha * FitNets MSE on the encoder features (1x1 adapters where channels differ)
  ``kdas``               (1 - a) * task + a * (spatial attention KL + symmetric guiding), a = 0.3 as in KDAS
  ``microaunet-2stage``  stage 1: task + (1 - w_KL(t)) * feature mimic + w_KL(t) * KL;
                         stage 2: task + contrast_weight * pixel contrastive (teacher-confident pixels)
                                  + rho * ||theta - theta_EMA||^2, the EMA student used for validation and export

The teacher is frozen (eval mode, no grad, not a registered submodule, so it is never in the optimiser or in a
checkpoint). Adapters, the contrastive projection head and the EMA live here, not in the student, so the
exported student has exactly the plain student's parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgeseg.contract import InputContract
from edgeseg.distill.losses import (bernoulli_kl, ema_anchor, feature_mimic, kl_weight, pixel_contrastive,
                                    spatial_attention_kl, symmetric_guiding)
from edgeseg.errors import EdgesegError

RECIPES = ("microaunet-2stage", "kdas", "feature", "logit")
LOGIT_RECIPES = ("logit", "kdas")  # need only the teacher's logits, so they can be precomputed (--teacher-cache)
_NEEDS_FEATURES = set(RECIPES) - set(LOGIT_RECIPES)


class RenormalisedTeacher(nn.Module):
    """A teacher trained with another normalisation, fed the student's input: the per-channel affine map
    x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, exact up to float rounding (no mean/std = 0/1)."""

    def __init__(self, teacher: nn.Module, student: InputContract, contract: InputContract):
        super().__init__()
        self.teacher, self.model_name = teacher, teacher.model_name

        def mean_std(c: InputContract) -> tuple[torch.Tensor, torch.Tensor]:
            mean, std = (c.mean, c.std) if c.mean is not None else ((0.0,) * 3, (1.0,) * 3)
            return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

        (m_s, s_s), (m_t, s_t) = mean_std(student), mean_std(contract)
        self.register_buffer("scale", s_s / s_t, persistent=False)
        self.register_buffer("shift", (m_s - m_t) / s_t, persistent=False)

    def forward_all(self, x: torch.Tensor) -> dict:  # all a teacher is asked for
        return self.teacher.forward_all(x * self.scale + self.shift)


def teacher_for_student(teacher: nn.Module, contract: InputContract, student: InputContract,
                        name: str = "the teacher") -> nn.Module:
    """The teacher, fed the student's input: its own normalisation is restored by :class:`RenormalisedTeacher`
    when the two differ; a different network size is refused with both values (distillation is per pixel)."""
    if contract.size != student.size:
        raise EdgesegError(f"teacher {name} expects {contract.size}x{contract.size} input but the student is "
                           f"trained at {student.size}x{student.size}; pass --size {contract.size} or train the "
                           f"teacher at {student.size}")
    if (contract.mean, contract.std) == (student.mean, student.std):
        return teacher
    return RenormalisedTeacher(teacher, student, contract).eval()


class Distiller(nn.Module):
    """Trainable side: ``student`` (+ ``adapters``, ``projection``); the EMA and the teacher ride along.

    Call ``forward(x, mask, boundary[, teacher_logits])`` for the loss dict; ``set_epoch(e)`` before each epoch;
    ``after_step()`` after each optimiser step; ``eval_model()`` for validation/checkpointing.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, criterion: nn.Module, recipe: str, size: int,
                 epochs: int, stage1_epochs: int | None = None, tau: float = 2.0, alpha: float | None = None,
                 rho: float = 0.3, contrast_weight: float = 0.1, ema_decay: float = 0.995):
        super().__init__()
        if recipe not in RECIPES:
            raise EdgesegError(f"unknown distillation recipe {recipe!r}; known: {', '.join(RECIPES)}")
        self.student, self.criterion, self.recipe = student, criterion, recipe
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # deliberately not a submodule
        if alpha is None:
            alpha = 0.3 if recipe == "kdas" else 1.0  # KDAS mixes 0.7 task + 0.3 distillation
        self.tau, self.alpha, self.rho, self.contrast_weight, self.ema_decay = tau, alpha, rho, contrast_weight, ema_decay
        self.stage1_epochs = stage1_epochs if stage1_epochs is not None else max(1, round(0.6 * epochs))
        if recipe == "microaunet-2stage" and not 0 < self.stage1_epochs < epochs:
            raise EdgesegError(f"--stage1-epochs must be between 1 and {epochs - 1} (stage 2 needs epochs), "
                               f"got {self.stage1_epochs}")
        self.epoch = 0.0
        self._gen = torch.Generator()  # pixel sampling, re-seeded per step so a resumed run draws the same
        self.pairs, self.adapters = self._pair_features(size) if recipe in _NEEDS_FEATURES else ([], nn.ModuleList())
        self.projection = None
        self.__dict__["ema"] = None
        if recipe == "microaunet-2stage":
            c = self._probe(student, size)["embedding"].shape[1]
            self.projection = nn.Sequential(nn.Conv2d(c, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1))

    @staticmethod
    @torch.no_grad()
    def _probe(model: nn.Module, size: int) -> dict:
        was = model.training
        out = model.eval().forward_all(torch.zeros(1, 3, size, size))
        model.train(was)
        return out

    def _pair_features(self, size: int) -> tuple[list[tuple[int, int]], nn.ModuleList]:
        """Pair student and teacher encoder features of the same stride; 1x1 adapters where channels differ."""
        s_feats = self._probe(self.student, size).get("features") or []
        t_feats = self._probe(self.teacher, size).get("features") or []
        t_by_size = {tuple(f.shape[-2:]): j for j, f in enumerate(t_feats)}
        pairs = [(i, t_by_size[tuple(f.shape[-2:])]) for i, f in enumerate(s_feats) if tuple(f.shape[-2:]) in t_by_size]
        if not pairs:
            strides = lambda fs: sorted(size // f.shape[-1] for f in fs)  # noqa: E731
            raise EdgesegError(f"recipe {self.recipe!r} needs encoder features at a common stride, but the teacher "
                               f"{self.teacher.model_name!r} exposes strides {strides(t_feats) or 'none'} and the "
                               f"student {self.student.model_name!r} {strides(s_feats)}")
        adapters = nn.ModuleList(
            nn.Conv2d(s_feats[i].shape[1], t_feats[j].shape[1], 1) if s_feats[i].shape[1] != t_feats[j].shape[1]
            else nn.Identity() for i, j in pairs)
        return pairs, adapters

    @property
    def stage(self) -> int:
        return 2 if self.recipe == "microaunet-2stage" and self.epoch >= self.stage1_epochs else 1

    def set_epoch(self, epoch: float) -> None:
        entering_stage2 = self.recipe == "microaunet-2stage" and epoch >= self.stage1_epochs and self.ema is None
        self.epoch = epoch
        self._gen.manual_seed(round(epoch * 1_000_000))
        if entering_stage2:
            self.__dict__["ema"] = copy.deepcopy(self.student).eval().requires_grad_(False)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.ema is None or self.stage != 2:
            return
        for e, p in zip(self.ema.parameters(), self.student.parameters()):
            e.lerp_(p.detach(), 1 - self.ema_decay)
        for e, b in zip(self.ema.buffers(), self.student.buffers()):
            e.copy_(b)

    def eval_model(self) -> nn.Module:
        return self.ema if self.stage == 2 and self.ema is not None else self.student

    def forward(self, x: torch.Tensor, mask: torch.Tensor, boundary: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> dict:
        """x (B, 3, S, S), mask and boundary (B, 1, S, S) -> the loss dict. ``teacher_logits`` (B, 1, S, S), the
        cached teacher logits of the same (augmented) samples, replace the teacher forward (LOGIT_RECIPES only)."""
        s = self.student(x)
        if teacher_logits is None:
            with torch.no_grad():
                t = self.teacher.forward_all(x)
        elif self.recipe in LOGIT_RECIPES:
            t = {"logits": teacher_logits}
        else:
            raise EdgesegError(f"recipe {self.recipe!r} needs the teacher's features, not only cached logits; "
                               f"cached teacher logits serve {' and '.join(LOGIT_RECIPES)}")
        task = self.criterion(s, mask, boundary)["loss"]
        terms = self._terms(s, t)
        weights = self.weights()
        if self.recipe == "kdas":
            loss = (1 - self.alpha) * task + self.alpha * sum(terms.values())
        else:
            loss = task + sum(weights[k] * v for k, v in terms.items())
        return {"loss": loss, "task_loss": task.detach(), **{k: v.detach() for k, v in terms.items()}}

    def weights(self) -> dict[str, float]:
        if self.recipe == "microaunet-2stage":
            if self.stage == 1:
                w = kl_weight(self.epoch, self.stage1_epochs)
                return {"mimic": 1 - w, "kl": w}
            return {"contrast": self.contrast_weight, "anchor": self.rho}
        return {"kl": self.alpha, "mimic": self.alpha, "attention": 1.0, "guiding": 1.0}

    def _terms(self, s: dict, t: dict) -> dict[str, torch.Tensor]:
        if self.recipe == "logit":
            return {"kl": bernoulli_kl(s["logits"], t["logits"], self.tau)}
        if self.recipe == "kdas":
            return {"attention": spatial_attention_kl(s["logits"], t["logits"], self.tau),
                    # on probabilities: the symmetrised logit maps reach hundreds and would swamp the task loss
                    "guiding": symmetric_guiding(torch.sigmoid(s["logits"]), torch.sigmoid(t["logits"]))}
        mimic = feature_mimic([a(s["features"][i]) for a, (i, _) in zip(self.adapters, self.pairs)],
                              [t["features"][j] for _, j in self.pairs])
        if self.recipe == "feature":
            return {"mimic": mimic}
        if self.stage == 1:
            return {"mimic": mimic, "kl": bernoulli_kl(s["logits"], t["logits"], self.tau)}
        return {"contrast": pixel_contrastive(self.projection(s["embedding"]), t["logits"], generator=self._gen),
                "anchor": ema_anchor(list(self.student.parameters()), list(self.ema.parameters()))}

    def extra_state(self) -> dict:
        """What --resume needs beyond the student: adapters, projection head, EMA, stage position."""
        return {"distiller": {k: v for k, v in self.state_dict().items() if not k.startswith("student.")},
                "ema": self.ema.state_dict() if self.ema is not None else None, "epoch": self.epoch}

    def load_extra_state(self, state: dict) -> None:
        own = {k: v for k, v in self.state_dict().items() if k.startswith("student.")}
        self.load_state_dict({**own, **state["distiller"]}, strict=True)
        self.set_epoch(state["epoch"])
        if state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
