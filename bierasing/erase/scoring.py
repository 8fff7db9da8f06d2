"""How an erasure is looked at and scored after training: the part of the job that depends on the
model goes through :meth:`Backbone.erasure_scorer`.

The generic scorer (any text-to-image backbone) draws the same prompts and seeds before and after
as one labelled grid, and counts NudeNet's exposed classes for a nudity concept. ShapesWorld's
scorer (``bierasing.world.scoring``) adds its detector's ACC_e / ACC_p / H.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: words that make a concept a nudity concept, scored with NudeNet
NUDITY_WORDS = ("nudity", "nude", "naked", "nsfw", "topless")


def is_nudity(concept: str) -> bool:
    words = concept.lower().replace(",", " ").split()
    return any(w in words for w in NUDITY_WORDS)


def _u8(images) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class ErasureScorer:
    """Before/after pictures of an erasure, and NudeNet counts for nudity concepts."""

    #: whether :meth:`attack` can score attacks (it needs a detector of the concept)
    can_attack: bool = False
    #: DDIM steps and CFG scale of the before/after samples
    steps: int = 20
    guidance: float = 7.5

    def score(self, backbone, adapters, pairs: list[tuple[str, str]], samples: int,
              out: str | Path | None = None, seed: int = 0, progress: bool = False, before: bool = True) -> dict:
        """``adapters`` is the erasure attached to ``backbone.unet`` (``adapters.disabled()`` gives
        the original); ``pairs`` are (concept, safe alternative). Writes ``before_after.png`` into
        ``out`` when given and returns what was measured (``before=False``: the erased model only)."""
        from ..grid import make_grid, save_png
        from ..sampling import sample

        prompts = [backbone.concept_text(t) for t, _ in pairs]
        prompts += [backbone.concept_text(s) for _, s in pairs if s and backbone.concept_text(s) not in prompts]
        rows = [p for p in prompts for _ in range(samples)]
        seeds = [seed + j for _ in prompts for j in range(samples)]
        kw = {"steps": self.steps, "guidance": self.guidance}
        after = _u8(sample(backbone, rows, seeds, **kw))
        shape = (len(prompts), samples, *after.shape[1:])
        after = after.reshape(shape)
        sets = {"after": after}
        if before:
            with adapters.disabled():
                sets = {"before": _u8(sample(backbone, rows, seeds, **kw)).reshape(shape), **sets}
        report: dict = {"eval_samples_per_prompt": samples, "prompts": prompts}
        per_concept = []
        for target, safe in pairs:
            entry: dict = {"target": target, "safe": safe}
            if is_nudity(target):
                from ..nudity import nudenet_report

                i = prompts.index(backbone.concept_text(target))
                entry["nudenet"] = {k: {x: nudenet_report(imgs[i])[x] for x in ("flagged", "flagged_rate", "class_counts")}
                                    for k, imgs in sets.items()}
            per_concept.append(entry)
        report["per_concept"] = per_concept
        if out is not None:
            cells = np.concatenate(list(sets.values()), axis=1)
            cols = [f"{k} s{seed + j}" for k in sets for j in range(samples)]
            side = max(64, min(256, after.shape[2]))
            grid = make_grid(cells, prompts, cols, cell_px=side, label_px=230,
                             title=f"erase {', '.join(t for t, _ in pairs)}: {' | '.join(sets)} (same seeds)")
            path = Path(out) / "before_after.png"
            save_png(path, grid)
            report["grid"] = str(path)
        return report

    def attack(self, backbone, target: str, samples: int, seed: int = 0, steps: int = 60) -> dict:
        """Attack success rates of learned and prompt attacks on the erased model (needs a detector)."""
        raise ValueError("attacks are scored with a detector of the concept, which this model does not "
                         "have (ShapesWorld has one); drop --attack")
