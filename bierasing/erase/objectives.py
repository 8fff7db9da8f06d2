"""Guidance targets, written as the equations (all predictions are noise, epsilon).

ESD negative guidance (Gandikota et al. 2023), Bi-Erasing's negative branch when images are given:
    eps_neg_target = eps*(x_t, {}, I-) - eta- [eps*(x_t, c-, I-) - eps*(x_t, {}, I-)]
Bi-Erasing's positive branch (classifier-free guidance toward the safe alternative):
    eps_pos_target = eps*(x_t, {}, I+) + eta+ [eps*(x_t, c+, I+) - eps*(x_t, {}, I+)]
Joint loss (Bi-Erasing, Fig. "process"):
    L = lambda- ||eps_theta(x_t, c-, I-) - eps_neg_target||^2 + lambda+ ||eps_theta(x_t, c+, I+) - eps_pos_target||^2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F


def negative_guidance_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Push away from the concept: eps_u - eta (eps_c - eps_u)."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def positive_guidance_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Pull toward the safe alternative: eps_u + eta (eps_c - eps_u)."""
    return eps_uncond + eta * (eps_cond - eps_uncond)


def mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; ``weight`` [B] scales each sample's error (rows are the batch's x_t in order)."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per * weight.to(per.device)).mean()


def timestep_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, grid: torch.Tensor, cap: float) -> torch.Tensor:
    """x0-weighting of an epsilon loss: min(1 / alpha_bar_t, cap), scaled to mean 1 over the t grid.

    An error e in epsilon is an error sqrt((1 - a) / a) e in the predicted image x0, so plain
    epsilon-MSE gives the noisy steps, where colour and layout are decided, little weight;
    1 / a = 1 + 1 / SNR is that factor (squared) plus one, capped so the noisiest steps do not dominate."""
    a = alphas_cumprod.float()
    w = (1.0 / a[t.cpu()]).clamp(max=cap)
    return w / (1.0 / a[grid.cpu()]).clamp(max=cap).mean()


def velocity_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity weighting of an epsilon loss: 1 / (1 - s)^2, s the noise level of the rectified flow
    with the same alpha_bar (docs/flow.md): epsilon MSE times this is the flow-matching velocity
    MSE (EraseAnything's loss on FLUX). Neither capped nor rescaled: it is the velocity error itself."""
    a = alphas_cumprod.float()[t.cpu()]
    one_minus_s = a.sqrt() / (a.sqrt() + (1 - a).sqrt())  # sqrt(a) = (1 - s) / c, sqrt(1 - a) = s / c
    return 1.0 / one_minus_s ** 2


def branch_weights(schedule: str, progress: float, neg_weight: float, pos_weight: float,
                   stage_threshold: float) -> tuple[float, float]:
    """(lambda-, lambda+) at ``progress`` in [0, 1) of the run.

    guide-then-erase mirrors the released ``--dynamic_weights``: positive only up to the threshold,
    negative only after it.
    """
    if schedule == "joint":
        return neg_weight, pos_weight
    if schedule == "guide-then-erase":  # a branch switched off in the config stays off
        guide = progress <= stage_threshold
        return (0.0, 1.0 if pos_weight > 0 else 0.0) if guide else (1.0 if neg_weight > 0 else 0.0, 0.0)
    raise ValueError(f"unknown schedule {schedule!r}")


# ---- the step's loss, by name ------------------------------------------------------------------
#: teacher predictions (frozen model) a step can use, by name: what each one conditions on
TEACHER_ROWS = {
    "uncond-": "eps*(x_t, {}, I-): empty prompt + concept images",
    "concept": "eps*(x_t, c-, I-): concept prompt + concept images",
    "uncond+": "eps*(x_t, {}, I+): empty prompt + safe images",
    "safe": "eps*(x_t, c+, I+): safe prompt + safe images",
    "adv_uncond": "eps*(x_t, {}): empty prompt, no image",
    "adv_concept": "eps*(x_t, c-): concept prompt, no image",
    "keep": "eps*(x_t', c_keep): a preserved prompt, no image",
}
#: student rows (model being erased) by kind, each with the target it is trained toward
STUDENT_ROWS = {
    "neg": "eps(x_t, c-, I-) -> negative guidance away from the concept, around the anchor",
    "pos": "eps(x_t, c+, I+) -> positive guidance toward the safe alternative",
    "map": "eps(x_t, c-[, I+]) -> the positive target (the concept prompt mapped to the safe one)",
    "adv": "eps(x_t, c- + delta) -> negative guidance under the adversarial conditioning",
    "keep": "eps(x_t', c_keep) -> the frozen model's own prediction",
}


@dataclass(frozen=True)
class LossWeights:
    """The weights and strengths of one step's loss (a branch with weight 0 has no rows)."""

    neg: float = 0.0  # lambda-
    pos: float = 0.0  # lambda+
    map: float = 0.0  # target -> safe pull
    adv: float = 0.0  # adversarial rows
    keep: float = 0.0  # preservation rows
    neg_guidance: float = 1.0  # eta-
    pos_guidance: float = 1.0  # eta+
    neg_anchor: float = 0.0  # share a of eps*(x_t, c+, I+) in the negative anchor

    def teacher_rows(self) -> list[str]:
        """The teacher predictions these weights need, in the order the engine batches them."""
        rows = []
        if self.neg > 0:
            rows += ["uncond-", "concept"]
        if self.pos > 0 or self.map > 0:
            rows += ["uncond+", "safe"] if self.pos_guidance != 1 else ["safe"]  # eta+ = 1: the target is eps*(c+, I+)
        elif self.neg > 0 and self.neg_anchor > 0:
            rows += ["safe"]
        if self.adv > 0:
            rows += ["adv_uncond", "adv_concept"]
        if self.keep > 0:
            rows += ["keep"]
        return rows

    def student_rows(self) -> list[str]:
        return [k for k in STUDENT_ROWS if getattr(self, k) > 0]


def loss_targets(teacher: Mapping[str, torch.Tensor], w: LossWeights) -> dict[str, tuple[float, torch.Tensor]]:
    """Per student row kind: (its weight in the loss, the target it is trained toward).

    neg:  A - eta- (eps*(c-, I-) - A),  A = (1 - a) eps*({}, I-) + a eps*(c+, I+)   (a = 0: ESD)
    pos, map:  eps*({}, I+) + eta+ (eps*(c+, I+) - eps*({}, I+))   (eta+ = 1: eps*(c+, I+), one row fewer)
    adv:  eps*({}) - eta- (eps*(c-) - eps*({}))                                     (no images)
    keep: eps*(x_t', c_keep)
    """
    out: dict[str, tuple[float, torch.Tensor]] = {}
    if w.neg > 0:
        a = w.neg_anchor
        anchor = (1 - a) * teacher["uncond-"] + a * teacher["safe"] if a > 0 else teacher["uncond-"]
        out["neg"] = (w.neg, negative_guidance_target(anchor, teacher["concept"], w.neg_guidance))
    if w.pos > 0 or w.map > 0:
        target = (teacher["safe"] if w.pos_guidance == 1
                  else positive_guidance_target(teacher["uncond+"], teacher["safe"], w.pos_guidance))
        if w.pos > 0:
            out["pos"] = (w.pos, target)
        if w.map > 0:
            out["map"] = (w.map, target)
    if w.adv > 0:
        out["adv"] = (w.adv, negative_guidance_target(teacher["adv_uncond"], teacher["adv_concept"],
                                                      w.neg_guidance))
    if w.keep > 0:
        out["keep"] = (w.keep, teacher["keep"])
    return out


def erasure_loss(student: Mapping[str, torch.Tensor], targets: Mapping[str, tuple[float, torch.Tensor]],
                 sample_weights: Mapping[str, torch.Tensor | None] | None = None,
                 shares: Mapping[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_k lambda_k * mse(student[k], target_k), over the row kinds in ``student`` (in its order).

    ``sample_weights[k]`` [B] weights each x_t's error (x0 weighting); ``shares[k]`` scales a term
    whose rows are only part of the step's batch (micro-batches), so the parts add up to the step's
    loss. Returns the loss and each kind's unweighted part."""
    loss, parts = 0.0, {}
    for k, pred in student.items():
        lam, target = targets[k]
        part = mse(pred, target, None if sample_weights is None else sample_weights.get(k))
        share = 1.0 if shares is None else shares.get(k, 1.0)
        if share != 1.0:
            part = part * share
        loss = loss + lam * part
        parts[k] = part
    return loss, parts
