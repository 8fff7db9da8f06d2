"""ShapesWorld's erasure scorer: the detector's ACC_e / ACC_p / H before and after, ACC_e under
synonym prompts, and a before/after grid with a red frame where the concept is still drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..erase.scoring import ErasureScorer
from . import data


class WorldScorer(ErasureScorer):
    can_attack = True

    def score(self, backbone, adapters, pairs, samples, out=None, seed=0, progress=False, before=True) -> dict:
        from ..grid import make_grid, save_png
        from .evaluate import measure_erasure

        rows, per_concept = [], []
        for target, safe in pairs:
            if not data.is_concept(target):
                continue
            base = None
            if before:
                with adapters.disabled():
                    base = measure_erasure(backbone, target, samples, seed=seed, progress=progress)
            after = measure_erasure(backbone, target, samples, seed=seed, progress=progress)
            syn = measure_erasure(backbone, target, samples, seed=seed, synonym=1, progress=progress)
            entry = {"target": target, "safe": safe,
                     "after": {k: round(after[k], 4) for k in ("acc_e", "acc_p", "h")},
                     "acc_e_synonyms": round(syn["acc_e"], 4)}
            if base is not None:
                entry["before"] = {k: round(base[k], 4) for k in ("acc_e", "acc_p", "h")}
            per_concept.append(entry)
            axis = data.axis_of(target)
            pick = [i for i, (_, kind, _) in enumerate(after["prompts"]) if kind == "target"][:3]
            pick += [i for i, (_, kind, _) in enumerate(after["prompts"]) if kind == "other"][:3]
            cols = min(6, samples)
            shown = [m for m in (base, after) if m is not None]
            for i in pick:
                cells = np.concatenate([m["images"][i, :cols] for m in shown])
                marks = [getattr(d, axis) == target for m in shown for d in m["detections"][i][:cols]]
                rows.append((after["prompts"][i][0], cells, marks))
        if not per_concept:  # no world concept among them: the generic pictures
            return super().score(backbone, adapters, pairs, samples, out, seed, progress, before)
        mean = lambda k: float(np.mean([c["after"][k] for c in per_concept]))  # noqa: E731
        report = {"acc_e": round(mean("acc_e"), 4), "acc_p": round(mean("acc_p"), 4), "h": round(mean("h"), 4),
                  "per_concept": per_concept, "eval_samples_per_prompt": samples}
        if out is not None:
            ncol = rows[0][1].shape[0] // (2 if before else 1)
            grid = make_grid(np.stack([r[1] for r in rows]), [r[0] for r in rows],
                             [f"{k} {j}" for k in (("before", "after") if before else ("after",)) for j in range(ncol)],
                             cell_px=72, label_px=230, marks=np.array([r[2] for r in rows]),
                             title=f"erase {', '.join(t for t, _ in pairs)} (red frame = concept detected)")
            save_png(Path(out) / "before_after.png", grid)
            report["grid"] = str(Path(out) / "before_after.png")
        return report

    def attack(self, backbone, target, samples, seed=0, steps=60) -> dict:
        from .attack import attack_report

        a = attack_report(backbone, target, samples=samples, seed=seed, soft_steps=steps, embedding_steps=steps)
        return {k: a[k] for k in ("synonym_asr", "paraphrase_asr", "soft_prompt_asr", "soft_prompt_init_asr",
                                  "embedding_asr", "embedding_init_asr", "synonym_asr_per_word", "soft_prompt",
                                  "embedding_attack", "seconds")}
