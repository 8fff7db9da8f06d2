"""Conditioning-space attack: a bounded offset of a prompt's text conditioning under which a model
(erased or not) denoises images of the concept best.

UnlearnDiffAtk (Zhang et al. 2024) optimises a few *token embeddings* against the erased model's own
denoising loss; :func:`bierasing.world.attack.soft_prompt_attack` does that where the text encoder is
reachable.  This attack optimises the *output* of the text encoder instead: every token row except
BOS may move, each by at most ``budget`` times its own norm.  It is a stronger white-box attacker
(anything a token-level attack reaches through the text encoder lies in this space, up to the budget)
and needs nothing but :class:`~bierasing.backbone.Backbone`'s ``encode_text``, ``to_x``,
``add_noise`` and ``predict_noise`` - so it runs on ShapesWorld, diffusers SD1.5 and ComfyUI's MODEL
alike, and the erasure engine uses it for adversarial training (AdvUnlearn's idea, Zhang et al. 2024,
with the attack in this space).

All random draws come from the generator passed in (or one seeded by ``seed``); weights are frozen
for the attack's duration and their ``requires_grad`` flags restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

#: default share of the schedule the attack trains on: the highest 10% of timesteps, where layout,
#: shape and colour are decided (on ShapesWorld, lower t barely moves the loss; see attack.py)
HIGH_T_FRACTION = 0.1


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class AttackConfig:
    """Settings of :func:`attack_conditioning` (help text = the attack node's tooltips)."""

    steps: int = _f(40, "optimisation steps of the attack", min=1, max=1000)
    lr: float = _f(0.05, "Adam step, in units of the conditioning's per-coordinate RMS", min=1e-4, max=1.0)
    batch_size: int = _f(4, "noised concept images per step", min=1, max=64)
    budget: float = _f(0.5, "largest offset of each token, relative to that token's norm", min=0.0, max=10.0)
    t_fraction: float = _f(HIGH_T_FRACTION, "timesteps drawn from this highest share of the schedule "
                           "(where layout and content are decided)", min=0.01, max=1.0)
    seed: int = _f(0, "seed of the attack's images, noise and timesteps", min=0, max=2**31 - 1)

    def __post_init__(self):
        for f in fields(self):
            v, meta = getattr(self, f.name), f.metadata
            if not meta["min"] <= v <= meta["max"]:
                raise ValueError(f"{f.name} must be in [{meta['min']}, {meta['max']}]; got {v}")

    def to_kwargs(self) -> dict:
        d = asdict(self)
        d["batch"] = d.pop("batch_size")
        return d


@dataclass
class CondAttack:
    """The result: ``base + delta`` is the adversarial conditioning [1, L, D]."""

    base: torch.Tensor
    delta: torch.Tensor
    initial_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def cond(self) -> torch.Tensor:
        return self.base + self.delta

    def relative_size(self) -> float:
        """Largest per-token ||delta|| / ||base|| (at most the budget)."""
        rel = self.delta[0].norm(dim=-1) / self.base[0].norm(dim=-1).clamp_min(1e-12)
        return float(rel.max())

    def info(self) -> dict:
        return {"initial_loss": round(self.initial_loss, 6), "final_loss": round(self.final_loss, 6),
                "relative_size": round(self.relative_size(), 4), **self.config}


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """No gradients into any weight of ``modules`` (adapters included); flags restored afterwards."""
    # inference tensors (ComfyUI's loaded weights) never take gradients and may not be flagged
    params = [p for m in modules for p in m.parameters() if not p.is_inference()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _project(delta: torch.Tensor, base: torch.Tensor, budget: float) -> torch.Tensor:
    limit = budget * base.norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * (limit / norm).clamp(max=1.0)


def attack_conditioning(backbone, x0: torch.Tensor, base: torch.Tensor, *, steps: int = 40, lr: float = 0.05,
                        batch: int = 8, budget: float = 0.5, t_fraction: float = HIGH_T_FRACTION,
                        generator: torch.Generator | None = None, seed: int = 0,
                        init_delta: torch.Tensor | None = None, eval_batch: int = 16, micro_batch: int = 0,
                        should_stop: Callable[[], bool] | None = None,
                        callback: Callable[[int, int], None] | None = None) -> CondAttack:
    """Optimise ``delta`` so that ``predict_noise(x_t, t, base + delta)`` denoises ``x0`` best.

    ``x0``: clean diffusion variables of concept images [N, ...] (``backbone.to_x(images)``).
    ``base``: the starting conditioning [1, L, D] (e.g. the concept prompt, or a neutral one).
    ``lr``: Adam's step in units of the conditioning's per-coordinate RMS.  ``budget``: each token's
    offset is at most budget x that token's norm (projected after every step).  ``t_fraction``: t is
    drawn from the highest share of the schedule.  ``init_delta`` warm-starts (adversarial training
    keeps its attack between refreshes).  initial/final loss are on one fixed batch.  ``should_stop``
    is polled before every step (the result so far is returned); ``callback(step, steps)`` after it.
    ``micro_batch`` > 0 runs the batch in chunks of that many images (same gradient, less memory).
    """
    if steps < 0 or batch < 1 or budget < 0 or not 0 < t_fraction <= 1:
        raise ValueError("steps >= 0, batch >= 1, budget >= 0 and 0 < t_fraction <= 1 are required")
    if base.dim() != 3 or base.shape[0] != 1:
        raise ValueError(f"base conditioning must be [1, L, D], got {tuple(base.shape)}")
    if x0.shape[0] == 0:
        raise ValueError("the attack needs at least one image of the concept")
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    dev = backbone.device
    base = base.detach().to(dev).float()
    x0 = x0.detach().to(dev)
    movable = torch.ones(1, base.shape[1], 1, device=dev)
    movable[:, 0] = 0  # BOS: constant in CLIP, and the attention sink
    rms = base[:, 1:].pow(2).mean().sqrt().clamp_min(1e-8)
    u = torch.zeros_like(base) if init_delta is None else (init_delta.detach().to(dev).float() / rms)
    u.requires_grad_(True)
    T = backbone.num_train_timesteps
    t_lo = min(T - 1, int(round(T * (1 - t_fraction))))

    def delta() -> torch.Tensor:
        return _project(u * rms * movable, base, budget)

    def loss_on(idx, noise, t, d):
        x_t = backbone.add_noise(x0[idx], noise, t)
        cond = (base + d).to(x_t.dtype).expand(x_t.shape[0], -1, -1)
        return F.mse_loss(backbone.predict_noise(x_t, t, cond).float(), noise.float())

    def chunks(n: int) -> list[slice]:
        m = n if micro_batch <= 0 else micro_batch
        return [slice(i, min(n, i + m)) for i in range(0, n, m)]

    def mean_loss(idx, noise, t, d) -> float:  # no grad: the batch mean, chunk by chunk
        return sum(float(loss_on(idx[s], noise[s], t[s], d)) * (s.stop - s.start) for s in chunks(len(idx))) / len(idx)

    e_idx = torch.randint(0, x0.shape[0], (eval_batch,), generator=gen).to(dev)
    e_noise = torch.randn((eval_batch, *x0.shape[1:]), generator=gen).to(dev).to(x0.dtype)
    e_t = (t_lo + (torch.arange(eval_batch) + 0.5) * (T - t_lo) / eval_batch).long().clamp(max=T - 1).to(dev)
    opt = torch.optim.Adam([u], lr=lr)
    losses = []
    with frozen(backbone.unet):
        with torch.no_grad():
            initial = mean_loss(e_idx, e_noise, e_t, delta())
        for _ in range(steps):
            if should_stop is not None and should_stop():
                break
            idx = torch.randint(0, x0.shape[0], (batch,), generator=gen).to(dev)
            noise = torch.randn((batch, *x0.shape[1:]), generator=gen).to(dev).to(x0.dtype)
            t = torch.randint(t_lo, T, (batch,), generator=gen).to(dev)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in chunks(batch):  # each chunk's share of the batch mean; one chunk = one plain backward
                loss = loss_on(idx[s], noise[s], t[s], delta())
                share = (s.stop - s.start) / batch
                (loss if share == 1 else loss * share).backward()
                total += float(loss.detach()) * share
            opt.step()
            losses.append(total)
            if callback is not None:
                callback(len(losses), steps)
        with torch.no_grad():
            final_delta = delta().detach()
            final = mean_loss(e_idx, e_noise, e_t, final_delta)
    cfg = {"steps": steps, "steps_done": len(losses), "lr": lr, "batch": batch, "budget": budget, "t_fraction": t_fraction}
    return CondAttack(base.cpu(), final_delta.cpu(), initial, final, losses, cfg)
