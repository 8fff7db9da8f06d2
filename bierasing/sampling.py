"""DDIM sampling with classifier-free guidance over any :class:`~bierasing.backbone.Backbone`.

Each sample's starting noise comes from its own seed, so sample i looks the same whatever batch it
is drawn in - the property before/after grids and per-prompt evaluation seeds rely on.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .backbone import Backbone


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """Descending DDIM timesteps with diffusers' "leading" spacing (steps_offset 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    return (torch.arange(steps) * ratio).flip(0)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """One N(0, I) sample per seed, stacked: [len(seeds), *shape]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


def guided_eps(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor, guidance: float,
               image_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u); the image tokens (if any) go to the conditional branch only."""
    if guidance == 1.0:
        return backbone.predict_noise(x, t, cond, image_tokens)
    if image_tokens is None:  # one batched forward for both branches
        eps = backbone.predict_noise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
        eps_u, eps_c = eps.chunk(2)
    else:
        eps_u = backbone.predict_noise(x, t, uncond)
        eps_c = backbone.predict_noise(x, t, cond, image_tokens)
    return eps_u + guidance * (eps_c - eps_u)


def ddim_step(backbone: Backbone, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    """Deterministic DDIM update x_t -> x_{t_prev} (t_prev < 0 means the clean sample)."""
    ac = backbone.alphas_cumprod
    a_t = ac[t].to(x)
    a_prev = ac[t_prev].to(x) if t_prev >= 0 else torch.ones((), dtype=x.dtype)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if backbone.clip_sample:
        x0 = x0.clamp(-1, 1)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@torch.no_grad()
def denoise(backbone: Backbone, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *,
            steps: int = 20, guidance: float = 1.5, image_tokens: torch.Tensor | None = None,
            stop_after: int | None = None,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run DDIM from pure noise ``x``; ``stop_after=k`` returns x after k of the ``steps`` updates."""
    ts = backbone.sampling_timesteps(steps).tolist()
    n = len(ts) if stop_after is None else stop_after
    for i in range(n):
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = guided_eps(backbone, x, tt, cond, uncond, guidance, image_tokens)
        x = ddim_step(backbone, x, eps, t, t_prev)
        if callback is not None:
            callback(i + 1, n)
    return x


@torch.no_grad()
def sample(backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20,
           guidance: float = 1.5, negative_prompt: str = "",
           image_tokens: torch.Tensor | None = None, batch_size: int = 256,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair: images [B, 3, H, W] in [0, 1]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    out = []
    done, total = 0, len(prompts)
    unique = sorted(set(prompts) | {negative_prompt})
    table = dict(zip(unique, backbone.encode_text(unique)))
    for start in range(0, total, batch_size):
        sl = slice(start, start + batch_size)
        cond = torch.stack([table[p] for p in prompts[sl]])
        uncond = table[negative_prompt].expand_as(cond)
        x = seeded_noise(seeds[sl], backbone.sample_shape, backbone.device)
        tokens = image_tokens[sl] if image_tokens is not None else None
        x = denoise(backbone, x, cond, uncond, steps=steps, guidance=guidance, image_tokens=tokens)
        out.append(backbone.from_x(x))
        done += x.shape[0]
        if callback is not None:
            callback(done, total)
    return torch.cat(out)
