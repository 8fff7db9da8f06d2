"""Guidance targets, written as the equations (all predictions are noise, epsilon).

ESD negative guidance (Gandikota et al. 2023), Bi-Erasing's negative branch when images are given:
    eps_neg_target = eps*(x_t, {}, I-) - eta- [eps*(x_t, c-, I-) - eps*(x_t, {}, I-)]
Bi-Erasing's positive branch (classifier-free guidance toward the safe alternative):
    eps_pos_target = eps*(x_t, {}, I+) + eta+ [eps*(x_t, c+, I+) - eps*(x_t, {}, I+)]
Joint loss (Bi-Erasing, Fig. "process"):
    L = lambda- ||eps_theta(x_t, c-, I-) - eps_neg_target||^2 + lambda+ ||eps_theta(x_t, c+, I+) - eps_pos_target||^2
"""

from __future__ import annotations

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
