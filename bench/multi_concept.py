"""Several concepts erased into one LoRA: how preservation holds as the number grows (ShapesWorld).

    python bench/multi_concept.py [--counts 1,3,5] [--samples 4]   # bench/results/multi_concept.{json,md}

k = 0 is the untouched model (its ACC_e on the first five concepts, and its ACC_p).
For k concepts (a fixed, nested order mixing objects, attributes and style), one Bi-Erasing run
with every concept's own safe alternative; steps grow with k (``--steps-per-concept``, at least 200).
Erasure: ACC_e of each erased concept on its target prompts (canonical words), averaged. Preservation:
ACC_p on a fixed prompt set of concepts that no k erases (square/cross x yellow/purple on black),
and H of the two averages. Each k runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ORDER = ["circle", "red", "white", "star", "blue", "triangle", "green", "gray"]
# safe alternatives outside the erased set (a safe concept that is also erased would fight it)
SAFE = {"circle": "square", "red": "green", "white": "gray", "star": "square", "blue": "green",
        "triangle": "square", "green": "yellow", "gray": "black"}
# preservation prompts: concepts that are nobody's safe alternative; a prompt with an erased concept
# is left out (k = 8 erases triangle, so its ACC_p rests on the two cross prompts)
KEEP = [("cross", "yellow"), ("cross", "purple"), ("triangle", "yellow"), ("triangle", "purple")]


def one(k: int, samples: int, steps_per_concept: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.erase.job import ExemplarSpec, load_exemplars
    from bierasing.metrics import harmonic
    from bierasing.world import data
    from bierasing.world.evaluate import _correct, _detect, generate, measure_erasure
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load()
    quiet = lambda m: None  # noqa: E731
    targets = ORDER[:k]
    concepts = []
    for i, t in enumerate(targets):
        safe = SAFE[t]
        neg = load_exemplars(bb, ExemplarSpec("generate", 8, auto_mask="attention"), t, 10 * i, None, quiet)
        pos = load_exemplars(bb, ExemplarSpec("generate", 8, auto_mask="attention"), safe, 500 + 10 * i, None, quiet)
        concepts.append(Concept(data.concept_prompt(t), data.concept_prompt(safe), neg, pos))
    cfg = EraseConfig(steps=max(200, steps_per_concept * k), adversarial=0.0)  # results measured without adversarial rows
    t0 = time.time()
    res = Eraser(bb, concepts, cfg).run() if k else None
    seconds = time.time() - t0
    # k = 0: the untouched model, scored on the k=5 concepts (what every erasure starts from)
    acc_e = {t: round(measure_erasure(bb, t, samples, target_only=True)["acc_e"], 4) for t in (targets or ORDER[:5])}
    if res is not None:  # kept so the erasure can be re-scored later (not committed)
        res.save(ROOT / "runs" / "multi_concept" / f"k{k}.safetensors")
    keep = [(s, c) for s, c in KEEP if s not in targets and c not in targets]  # never score an erased concept
    prompts = [data.prompt(s, c, "black") for s, c in keep]
    dets = _detect(generate(bb, prompts, 2 * samples, seed=7))
    kept = [sum(_correct(d, data.Concepts(s, c, "black")) for d in row) / len(row) for (s, c), row in zip(keep, dets)]
    mean_e, acc_p = sum(acc_e.values()) / len(acc_e), sum(kept) / len(kept)
    return {"k": k, "concepts": targets, "safe": [SAFE[t] for t in targets], "steps": cfg.steps if k else 0,
            "acc_e_per_concept": acc_e, "mean_acc_e": round(mean_e, 4), "acc_p_kept": round(acc_p, 4),
            "h": round(harmonic(mean_e, acc_p), 4), "seconds": round(seconds, 1),
            "kept_per_prompt": {p: round(v, 4) for p, v in zip(prompts, kept)},
            "samples_per_prompt": samples, "final_loss": res.history[-1]["loss"] if res else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,3,5")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps-per-concept", type=int, default=100)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(one(int(args.single), args.samples, args.steps_per_concept)))
        return 0
    from bierasing.io import atomic_write_text

    path = RESULTS / "multi_concept.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for k in (int(c) for c in args.counts.split(",")):
        if any(r["k"] == k for r in rows):
            continue
        print(f"[multi] k={k} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--single", str(k), "--samples", str(args.samples),
                              "--steps-per-concept", str(args.steps_per_concept)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.sort(key=lambda r: r["k"])
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows, indent=2))
        lines = ["# Multi-concept erasure (ShapesWorld, Bi-Erasing, one LoRA)", "",
                 f"ACC_e: erased concepts on their target prompts ({args.samples} samples/prompt); ACC_p: "
                 f"the prompts of {KEEP} on black that contain no erased concept ({2 * args.samples} samples each); "
                 "H of the two. Steps: max(200, 100 k), concepts drawn at random per step.", "",
                 "| k | concepts | steps | mean ACC_e | ACC_p (kept) | H | seconds | ACC_e per concept |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            per = ", ".join(f"{t} {v:.2f}" for t, v in r["acc_e_per_concept"].items())
            lines.append(f"| {r['k']} | {', '.join(r['concepts']) or 'none (untouched model)'} | {r['steps']} | {r['mean_acc_e']:.3f} | "
                         f"{r['acc_p_kept']:.3f} | {r['h']:.3f} | {r['seconds']} | {per} |")
        atomic_write_text(RESULTS / "multi_concept.md", "\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
