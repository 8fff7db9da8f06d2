"""Automatic exemplar masks from the model's own cross-attention to the concept word (no extra weights).

The exemplar is noised to a mid timestep, the UNet is run once with a prompt that contains the
concept word, and the text-attention maps of every attn2 layer for the word's tokens are resized
to the image and averaged; the min-max-normalised map is then cleaned by :func:`filter_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def attention_masks(backbone, images: torch.Tensor, prompt: str, word: str, t: int = 300,
                    seed: int = 0) -> torch.Tensor:
    """Raw masks [N, H, W] in [0, 1] for images [N, 3, H, W]: where the model attends to ``word``."""
    positions = backbone.word_positions(prompt, word)
    procs = backbone.attention_recorders()
    if not procs:
        raise ValueError("automatic masks need the decoupled attention processors (load the image branch)")
    x0 = backbone.to_x(images.to(backbone.device))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    text = backbone.encode_text([prompt]).expand(x0.shape[0], -1, -1)
    for p in procs:
        p.attention_store = []
    try:
        backbone.predict_noise(backbone.add_noise(x0, noise, tt), tt, text)
        maps = [m for p in procs for m in p.attention_store]
    finally:
        for p in procs:
            p.attention_store = None
    h, w = images.shape[-2:]
    acc = torch.zeros(images.shape[0], 1, h, w, device=x0.device)
    for m in maps:  # [N, HW, tokens]
        side = int(round(m.shape[1] ** 0.5))
        word_map = m[:, :, positions].sum(-1).reshape(-1, 1, side, side)
        acc += F.interpolate(word_map, size=(h, w), mode="bilinear", align_corners=False)
    acc = acc[:, 0]
    lo = acc.flatten(1).min(1).values.view(-1, 1, 1)
    hi = acc.flatten(1).max(1).values.view(-1, 1, 1)
    return ((acc - lo) / (hi - lo).clamp_min(1e-8)).cpu()
