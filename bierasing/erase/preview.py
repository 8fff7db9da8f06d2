"""Pictures of an erasure in progress, for a UI: the loss curve so far and, every few steps, the concept
prompt drawn by the original and by the model being erased from one seed, side by side."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..grid import make_grid
from ..plot import loss_curve
from ..sampling import sample


def eta_text(step: int, total: int, seconds: float, loss: float | None) -> str:
    """'step 120/200 · loss 0.0123 · 1 min 20 s left' (no ETA before the first step is done)."""
    parts = [f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if step > 0 and step < total:
        left = seconds / step * (total - step)
        parts.append(f"{int(left // 60)} min {int(left % 60)} s left" if left >= 60 else f"{int(left)} s left")
    elif step >= total:
        parts.append(f"done in {seconds:.0f} s")
    return " · ".join(parts)


class LivePreview:
    """Renders the preview picture of an :class:`~bierasing.erase.engine.Eraser` run.

    ``sample_every`` steps (and at the last step) it samples ``prompt`` with the adapters on
    ("erased") beside a sample with them off ("original", drawn once); 0 shows the curve only, as
    does a backbone that cannot decode images. Sampling is cheap next to training: ``steps``
    denoising steps of one image at the backbone's own size.
    """

    #: CFG of the preview samples, or the backbone's own before/after CFG where that is lower (FLUX
    #: samples at 1: dev's embedded guidance does it; a second pass would double the cost)
    GUIDANCE = 5.0

    def __init__(self, prompt: str, sample_every: int = 50, steps: int = 12, guidance: float | None = None,
                 seed: int = 0, cell_px: int = 192):
        self.prompt, self.sample_every, self.steps = prompt, sample_every, steps
        self.guidance, self.seed, self.cell_px = guidance, seed, cell_px
        self.eraser = None
        self.original: np.ndarray | None = None
        self.latest: tuple[int, np.ndarray] | None = None
        self.started = time.monotonic()

    def attach(self, eraser) -> LivePreview:
        self.eraser = eraser
        if self.guidance is None:
            self.guidance = min(self.GUIDANCE, eraser.bb.erasure_scorer().guidance)
        self.started = time.monotonic()
        return self

    def text(self, step: int, total: int, record: dict | None) -> str:
        return eta_text(step, total, time.monotonic() - self.started, (record or {}).get("loss"))

    def sample_due(self, step: int, total: int) -> bool:
        return self.sample_every > 0 and self.eraser is not None and \
            self.eraser.bb.can_encode_images and (step % self.sample_every == 0 or step == total)

    @torch.no_grad()
    def _draw(self) -> np.ndarray:
        img = sample(self.eraser.bb, [self.prompt], [self.seed], steps=self.steps, guidance=self.guidance)
        return (img[0].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)

    def render(self, step: int, total: int) -> np.ndarray:
        """uint8 RGB picture: the loss curve, with the latest original | erased pair under it."""
        curve = loss_curve(self.eraser.history if self.eraser else [], f"erasing: {self.prompt}")
        if self.sample_due(step, total):
            if self.original is None:
                with self.eraser.adapters.disabled():
                    self.original = self._draw()
            self.latest = (step, self._draw())
        if self.latest is None:
            return curve
        at, erased = self.latest
        pair = make_grid(np.stack([self.original, erased])[None], [""], ["original", f"erased @ {at}"],
                         cell_px=self.cell_px, label_px=0)
        width = max(curve.shape[1], pair.shape[1])
        pad = lambda im: np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
        return np.concatenate([pad(curve), pad(pair)])
