"""The live preview of a running erasure: loss curve, original | erased samples, step/loss/ETA text."""

import numpy as np
import torch

from bierasing.erase import Concept, EraseConfig
from bierasing.erase.engine import Eraser
from bierasing.erase.preview import LivePreview, eta_text
from bierasing.sampling import sample


def _images(seed, n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_eta_text():
    assert eta_text(0, 200, 0.0, None) == "step 0/200"
    assert eta_text(50, 200, 40.0, 0.012345) == "step 50/200 · loss 0.01235 · 2 min 0 s left"
    assert eta_text(190, 200, 95.0, 0.5) == "step 190/200 · loss 0.5 · 5 s left"
    assert eta_text(200, 200, 100.4, 0.5) == "step 200/200 · loss 0.5 · done in 100 s"


def test_preview_during_a_run_shows_the_curve_then_original_and_erased(tiny_world):
    seen = []
    preview = LivePreview("a circle", sample_every=3, steps=4, seed=7, cell_px=64)

    def callback(step, total, record):
        seen.append((step, preview.text(step, total, record), preview.sample_due(step, total),
                     preview.render(step, total)))

    cfg = EraseConfig(steps=5, batch_size=2, cache_size=4, xt_steps=5, preserve="", contexts=0, adversarial=0.0,
                      lr=1e-2)
    eraser = Eraser(tiny_world, [Concept("a circle", "a square", _images(1), _images(2))], cfg, callback=callback)
    preview.attach(eraser)
    result = eraser.run()
    try:
        assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
        assert [s[2] for s in seen] == [False, False, True, False, True]  # every 3 steps and the last
        assert seen[0][1].startswith("step 1/5 · loss ") and "left" in seen[0][1]
        assert seen[-1][1].startswith("step 5/5 · loss ") and "done in" in seen[-1][1]
        curve_only, with_samples = seen[0][3], seen[2][3]
        assert curve_only.dtype == np.uint8 and curve_only.shape[2] == 3
        assert with_samples.shape[0] > curve_only.shape[0]  # the original | erased row under the curve
        assert seen[3][3].shape == with_samples.shape  # the latest pair stays until the next sample
        # the "original" cell is the model without the adapters; "erased" changes as training goes on
        with torch.no_grad(), result.adapters.disabled():
            original = sample(tiny_world, ["a circle"], [7], steps=4, guidance=5.0)
        expected = (original[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(preview.original, expected)
        assert preview.latest[0] == 5 and not np.array_equal(preview.latest[1], preview.original)
    finally:
        result.adapters.remove(tiny_world.unet)


def test_preview_without_samples_is_the_curve(tiny_world):
    preview = LivePreview("a circle", sample_every=0)
    assert not preview.sample_due(10, 10)
    assert preview.render(0, 10).shape == (360, 640, 3)
