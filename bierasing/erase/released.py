"""A faithful re-run of the released Bi-Erasing training loop (chenahong/Bi-Erasing), for comparison.

What it keeps from the released code (digest, section 2.9), on purpose:
  * two UNets: a deep copy as the frozen teacher and the trained one (two copies in memory);
  * Adam over every UNet parameter ("full"), batch 1, one negative and one positive image per step;
  * x_t from the *trainable* UNet, empty prompt, DDPM steps over ascending timesteps (Quirk 1),
    then t_ddpm drawn in [ratio*t, ratio*(t+1));
  * 4 teacher calls and 2 student calls per step, each its own forward.
Only randomness is made reproducible (one seeded generator).  Use it to measure what our engine
saves; it is not the recommended way to erase.
"""

from __future__ import annotations

import copy
import time

import torch

from .engine import Concept, peak_rss_mb
from .objectives import mse, negative_guidance_target, positive_guidance_target
from .xt import released_code_xt


def released_bi_erasing(backbone, concept: Concept, steps: int = 1000, lr: float = 1e-5,
                        neg_weight: float = 0.6, pos_weight: float = 0.4, neg_guidance: float = 1.0,
                        pos_guidance: float = 1.0, ddim_steps: int = 50, seed: int = 0,
                        callback=None) -> dict:
    """Train ``backbone.unet`` in place; returns timing, memory and the frozen copy's parameter count."""
    if concept.negative_images is None or concept.positive_images is None:
        raise ValueError("the released algorithm needs negative and positive exemplar images")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    teacher = copy.deepcopy(backbone.unet).eval().requires_grad_(False)
    student = backbone.unet
    student.requires_grad_(True)
    for n, p in student.named_parameters():
        if "processor." in n:  # IP-Adapter layers are not in the optimizer (they are attached later)
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        c_neg, c_pos, c_null = backbone.encode_text([concept.target, concept.safe, ""]).chunk(3)
        tok_neg = backbone.encode_images(concept.negative_images)
        tok_pos = backbone.encode_images(concept.positive_images)

    def eps(unet, x, t, c, tok):
        out = unet(x, t, encoder_hidden_states=c, cross_attention_kwargs={"ip_hidden_states": tok}).sample
        return backbone.output_to_eps(out, x, t)

    history = []
    for step in range(steps):
        i_neg = tok_neg[torch.randint(0, tok_neg.shape[0], (1,), generator=gen)]
        i_pos = tok_pos[torch.randint(0, tok_pos.shape[0], (1,), generator=gen)]
        x, t, _ = released_code_xt(backbone, c_null, 1, ddim_steps, gen)  # student = backbone.unet
        t = t.to(x.device)
        with torch.no_grad():
            e_null_neg = eps(teacher, x, t, c_null, i_neg)
            e_neg = eps(teacher, x, t, c_neg, i_neg)
            e_null_pos = eps(teacher, x, t, c_null, i_pos)
            e_pos = eps(teacher, x, t, c_pos, i_pos)
        loss = (neg_weight * mse(eps(student, x, t, c_neg, i_neg),
                                 negative_guidance_target(e_null_neg, e_neg, neg_guidance))
                + pos_weight * mse(eps(student, x, t, c_pos, i_pos),
                                   positive_guidance_target(e_null_pos, e_pos, pos_guidance)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(round(loss.item(), 6))
        if callback is not None:
            callback(step + 1, steps, {"loss": history[-1]})
    student.requires_grad_(False)
    del teacher, opt
    return {"seconds": time.time() - t0, "peak_rss_mb": peak_rss_mb(), "history": history,
            "trained_parameters": sum(p.numel() for p in params)}
