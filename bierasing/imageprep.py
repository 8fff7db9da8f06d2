"""Pixels for a vision encoder, as ComfyUI's ``clip_preprocess`` makes them: the short side resized
to the encoder's size (bilinear, antialiased), a centre crop, then mean/std normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vision_pixels(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> normalised [B, 3, size, size] (float32)."""
    x = images.float()
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
