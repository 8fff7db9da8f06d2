"""Where x_t comes from: the sources compared in the benchmark (see ``XT_SOURCES``).

Every source returns ``(x_t, t, forwards)``: a batch of diffusion states, their DDPM timesteps and
the number of UNet forward rows it cost (for the forward-equivalents figure).
"""

from __future__ import annotations

import torch

from ..backbone import Backbone
from ..sampling import ddim_step, guided_eps


class TrajectoryCache:
    """DDIM trajectories of the frozen model for each concept prompt, sampled once.

    Draw (trajectory m, step k) and x_t is exactly ESD's partially denoised latent at t = ts[k],
    at no sampling cost per training step.
    """

    def __init__(self, backbone: Backbone, conds: list[torch.Tensor], uncond: torch.Tensor, size: int,
                 steps: int, guidance: float, generator: torch.Generator, chunk: int = 64):
        self.ts = backbone.sampling_timesteps(steps)
        self.states = []  # per concept: [size, steps, *sample_shape]
        self.forwards = 0
        for cond in conds:
            per = []
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                x = torch.randn((n, *backbone.sample_shape), generator=generator).to(backbone.device)
                c, u = cond.expand(n, -1, -1), uncond.expand(n, -1, -1)
                xs = []
                with torch.no_grad():
                    for i, t in enumerate(self.ts.tolist()):
                        xs.append(x)
                        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
                        eps = guided_eps(backbone, x, tt, c, u, guidance)
                        t_prev = self.ts[i + 1].item() if i + 1 < len(self.ts) else -1
                        x = ddim_step(backbone, x, eps, t, t_prev)
                        self.forwards += n * (1 if guidance == 1.0 else 2)
                per.append(torch.stack(xs, 1))
            self.states.append(torch.cat(per))

    def draw(self, concept: int, batch: int, generator: torch.Generator):
        states = self.states[concept]
        m = torch.randint(0, states.shape[0], (batch,), generator=generator)
        k = torch.randint(0, states.shape[1], (batch,), generator=generator)
        return states[m, k], self.ts[k], 0


def partial_ddim(backbone: Backbone, cond: torch.Tensor, uncond: torch.Tensor, batch: int, steps: int,
                 guidance: float, generator: torch.Generator):
    """ESD's x_t: DDIM from fresh noise down to a random step k of ``steps``, frozen model."""
    ts = backbone.sampling_timesteps(steps)
    k = int(torch.randint(0, steps, (1,), generator=generator))
    x = torch.randn((batch, *backbone.sample_shape), generator=generator).to(backbone.device)
    c, u = cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)
    with torch.no_grad():
        for i in range(k):
            tt = torch.full((batch,), int(ts[i]), dtype=torch.long, device=x.device)
            x = ddim_step(backbone, x, guided_eps(backbone, x, tt, c, u, guidance), int(ts[i]), int(ts[i + 1]))
    fw = batch * k * (1 if guidance == 1.0 else 2)
    return x, torch.full((batch,), int(ts[k]), dtype=torch.long), fw


def noised_exemplars(backbone: Backbone, x0_all: torch.Tensor, batch: int, generator: torch.Generator):
    """q(x_t | x_0) of the exemplars' clean x0 (``backbone.to_x`` once, up front): no sampling;
    t uniform over the training schedule."""
    idx = torch.randint(0, x0_all.shape[0], (batch,), generator=generator)
    x0 = x0_all[idx.to(x0_all.device)]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, backbone.num_train_timesteps, (batch,), generator=generator)
    return backbone.add_noise(x0, noise, t.to(x0.device)), t, 0


def released_code_xt(backbone: Backbone, uncond: torch.Tensor, batch: int, steps: int,
                     generator: torch.Generator):
    """The released Bi-Erasing/Co-Erasing behaviour, kept to reproduce it (digest, Quirk 1).

    DDPM steps over *ascending* timesteps (reversed(scheduler.timesteps)) from pure noise, t+1 of
    them, with the model being trained and the empty prompt; then t_ddpm is drawn in
    [t*ratio, (t+1)*ratio).  The caller runs this with the adapters switched on.  Not reproduced:
    Quirk 2 (the released code pushed the last 4 empty-prompt tokens through the image path here).
    """
    from diffusers import DDPMScheduler

    if getattr(backbone, "scheduler", None) is not None:  # the model's own config (SD1.5: steps_offset 1)
        sched = DDPMScheduler.from_config(backbone.scheduler.config, prediction_type="epsilon")
    else:
        ac = backbone.alphas_cumprod.double()
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        sched = DDPMScheduler(num_train_timesteps=backbone.num_train_timesteps, trained_betas=betas.numpy(),
                              prediction_type="epsilon", clip_sample=backbone.clip_sample)
    sched.set_timesteps(steps)
    ratio = backbone.num_train_timesteps // steps
    k = int(torch.randint(0, steps, (1,), generator=generator))
    x = torch.randn((batch, *backbone.sample_shape), generator=generator).to(backbone.device)
    u = uncond.expand(batch, -1, -1)
    with torch.no_grad():
        for t in list(reversed(sched.timesteps))[: k + 1]:
            tt = torch.full((batch,), int(t), dtype=torch.long, device=x.device)
            eps = backbone.predict_noise(x, tt, u)
            x = sched.step(eps, t, x, generator=generator).prev_sample
    t_ddpm = torch.randint(k * ratio, (k + 1) * ratio, (batch,), generator=generator)
    return x, t_ddpm, batch * (k + 1)
