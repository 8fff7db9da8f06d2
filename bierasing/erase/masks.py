"""Mask filtering of exemplar images (opencv), as the released code does before image encoding.

    soft = filter_mask(raw)               # threshold -> drop specks -> close/open -> feather
    filled = fill_background(image, soft) # M * I + (1 - M) * mean(I)

Morphology radius and feathering are given for 512 px images (the paper's values, radius 3 and
sigma 2) and scaled to the actual image size, so a 32 px ShapesWorld exemplar is cleaned the same
way relative to its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MaskFilter:
    threshold: float = field(default=0.4, metadata={"help": "binarise the raw mask at this value (paper: 0.4)", "min": 0.0, "max": 1.0})
    min_component: float = field(default=0.001, metadata={"help": "drop connected parts smaller than this share of the image", "min": 0.0, "max": 0.5})
    morph_radius_512: float = field(default=3.0, metadata={"help": "closing/opening disk radius at 512 px (scaled to the image)", "min": 0.0, "max": 64.0})
    feather_sigma_512: float = field(default=2.0, metadata={"help": "Gaussian feathering sigma at 512 px (scaled to the image)", "min": 0.0, "max": 64.0})
    min_coverage: float = field(default=0.05, metadata={"help": "below this coverage use the relaxed path (half the speck size, no morphology)", "min": 0.0, "max": 1.0})

    def __post_init__(self):
        for name, f in self.__dataclass_fields__.items():
            v = getattr(self, name)
            if not f.metadata["min"] <= v <= f.metadata["max"]:
                raise ValueError(f"mask filter {name} must be in [{f.metadata['min']}, {f.metadata['max']}], got {v}")


def filter_mask(mask: np.ndarray, cfg: MaskFilter | None = None) -> np.ndarray:
    """Raw mask [H, W] (any range, e.g. probabilities) -> soft mask [H, W] float32 in [0, 1]."""
    import cv2

    cfg = cfg or MaskFilter()
    m = np.asarray(mask, np.float32)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {m.shape}")
    h, w = m.shape
    scale = max(h, w) / 512
    binary = (m > cfg.threshold).astype(np.uint8)
    coverage = binary.mean()
    relaxed = coverage < cfg.min_coverage
    min_px = cfg.min_component * (0.5 if relaxed else 1.0) * h * w
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(1.0, min_px)
    binary = keep[labels].astype(np.uint8)
    r = int(round(cfg.morph_radius_512 * scale))
    if not relaxed and r >= 1:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, disk)
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, disk)
    soft = binary.astype(np.float32)
    sigma = cfg.feather_sigma_512 * scale
    if sigma > 0.05:
        soft = cv2.GaussianBlur(soft, (0, 0), sigmaX=sigma)
    return np.clip(soft, 0.0, 1.0)


def fill_background(image: np.ndarray, soft_mask: np.ndarray) -> np.ndarray:
    """I~ = M * I + (1 - M) * mean(I): the background becomes the image's mean colour.

    image: float [H, W, 3] in [0, 1]; soft_mask: [H, W] in [0, 1].
    """
    img = np.asarray(image, np.float32)
    m = np.asarray(soft_mask, np.float32)
    if img.shape[:2] != m.shape:
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[0]} but the image is {img.shape[1]}x{img.shape[0]}; "
                         "give masks of the same size as their images")
    mean = img.reshape(-1, 3).mean(0)
    return m[..., None] * img + (1 - m[..., None]) * mean


def check_finite(masks) -> None:
    """Refuse masks holding NaN or infinity (a broken upstream node), which would filter as garbage."""
    import torch

    bad = int((~torch.isfinite(masks)).sum())
    if bad:
        raise ValueError(f"the masks hold {bad} NaN or infinite values (of {masks.numel()}); the node that made "
                         "them is broken or divided by zero. Fix or replace it, or clamp the mask to 0..1")


def apply_masks(images, masks, cfg: MaskFilter | None = None, return_masks: bool = False):
    """Tensor images [N, 3, H, W] and raw masks [N, H, W] -> filtered images (torch, same layout),
    and the cleaned soft masks [N, H, W] with ``return_masks``."""
    import torch

    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for {images.shape[0]} images; give one mask per image")
    check_finite(masks)
    out, softs = [], []
    for img, m in zip(images, masks):
        if tuple(m.shape) != tuple(img.shape[1:]):
            raise ValueError(f"mask is {m.shape[-1]}x{m.shape[-2]} but its image is {img.shape[-1]}x{img.shape[-2]}; "
                             "give masks of the same size as their images")
        soft = filter_mask(m.cpu().numpy(), cfg)
        if soft.max() == 0:
            raise ValueError("a mask is empty after filtering (nothing above the threshold); lower the "
                             "threshold or check the mask")
        filled = fill_background(img.permute(1, 2, 0).cpu().numpy(), soft)
        out.append(torch.from_numpy(filled).permute(2, 0, 1))
        softs.append(torch.from_numpy(soft))
    filtered = torch.stack(out).to(images)
    return (filtered, torch.stack(softs)) if return_masks else filtered
