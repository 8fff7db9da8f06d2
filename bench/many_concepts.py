"""Many concepts in one model (ShapesWorld): one joint run, or one run per concept merged afterwards.

    python bench/many_concepts.py [--counts 1,3,5,8] [--samples 8]   # bench/results/many_concepts.{json,md}

Every erasure is ``bierasing erase``'s default (EraseConfig(), seed 0); concepts in a fixed, nested
order mixing objects, attributes and backgrounds, each with a safe alternative outside the erased set.
Approaches for k concepts:
  joint      one run over the k concepts, 200 steps per concept (what ``--concept a,b,c`` does with
             ``--steps 200k``)
  joint-warm the same run started from bi-instant's edit of the k concepts (``--warm-start``)
  sum        the k single-concept erasures stacked (``bierasing.erase.stack``: deltas added)
  merge-kv   the k single-concept erasures merged with their key/value edits fused
             (``bierasing.erase.merge.merge_kv``, MACE's closed-form fusion); the other layers summed
  merge-kv-mean, merge-kv-only   the same with the other layers (to_q, to_out) averaged, or left out
  instant    bi-instant over the k concepts at once (closed form, no training)
Scores: ACC_e of each erased concept on its target prompts, averaged; kept ACC_p on the prompts of
concepts no k erases (square/cross x yellow/purple on black); H of the two. Every item (a training,
a scoring) runs in its own process and is appended to the JSON as soon as it finishes; a re-run
skips finished items. Erasures are kept under runs/many_concepts/ (not committed).
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
RUNS = ROOT / "runs" / "many_concepts"
ORDER = ["circle", "red", "white", "star", "blue", "triangle", "green", "gray"]
SAFE = {"circle": "square", "red": "green", "white": "gray", "star": "square", "blue": "green",
        "triangle": "square", "green": "yellow", "gray": "black"}
KEEP = [("square", "yellow"), ("square", "purple"), ("cross", "yellow"), ("cross", "purple")]
APPROACHES = ("joint", "joint-warm", "sum", "merge-kv", "merge-kv-mean", "merge-kv-only", "instant")
MERGE_OTHERS = {"merge-kv": "sum", "merge-kv-mean": "mean", "merge-kv-only": "drop"}


def _specs(targets):
    from bierasing.erase.job import ConceptSpec

    return [ConceptSpec(t, SAFE[t]) for t in targets]


def train(name: str, targets: list[str], warm: bool = False) -> dict:
    """One default erasure job over ``targets`` (200 steps per concept; ``warm``: started from the
    instant edit) -> its file and seconds."""
    from bierasing.erase import EraseConfig
    from bierasing.erase.job import run_erase_job
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load()
    t0 = time.time()
    cfg = EraseConfig(steps=200 * len(targets), warm_start=warm)
    report = run_erase_job(bb, _specs(targets), cfg, RUNS / name, name=name, eval_samples=0, progress=False,
                           log=lambda m: None)
    return {"item": f"train:{name}", "targets": targets, "file": report["output"],
            "erase_seconds": report["erase_seconds"], "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": report["peak_rss_mb"]}


def _erasure(bb, approach: str, targets: list[str], done: dict):
    """(source for merge_erasure, seconds to build it from what is trained)."""
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.export import erasure_tensors
    from bierasing.erase.instant import instant_erasure
    from bierasing.erase.merge import merge_kv
    from bierasing.erase.stack import stack

    singles = [done[f"train:{t}"]["file"] for t in targets]
    t0 = time.time()
    if approach == "joint":
        src = done[f"train:joint{len(targets)}"]["file"] if len(targets) > 1 else singles[0]
    elif approach == "joint-warm":
        src = done[f"train:joint{len(targets)}-warm"]["file"]
    elif len(targets) == 1 and approach in ("sum", "merge-kv"):
        src = singles[0]
    elif approach == "sum":
        src = stack(singles)
    elif approach in MERGE_OTHERS:
        src = merge_kv(bb, singles, others=MERGE_OTHERS[approach])
    else:
        res = instant_erasure(bb, [Concept(bb.concept_text(t), bb.concept_text(SAFE[t])) for t in targets],
                              EraseConfig(method="bi-instant"))
        src = (erasure_tensors(res.adapters), res.info())
        res.adapters.remove(bb.unet)
    return src, time.time() - t0


def score(approach: str, targets: list[str], samples: int, done: dict) -> dict:
    from bierasing.erase.export import merge_erasure
    from bierasing.metrics import harmonic
    from bierasing.world import data
    from bierasing.world.evaluate import _correct, _detect, generate, measure_erasure
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load()
    build = 0.0
    if targets:
        src, build = _erasure(bb, approach, targets, done)
        merge_erasure(bb.unet, src)  # this process only
    acc_e = {t: round(measure_erasure(bb, t, samples, target_only=True)["acc_e"], 4) for t in (targets or ORDER)}
    prompts = [data.prompt(s, c, "black") for s, c in KEEP]
    dets = _detect(generate(bb, prompts, 2 * samples, seed=7))
    kept = [sum(_correct(d, data.Concepts(s, c, "black")) for d in row) / len(row) for (s, c), row in zip(KEEP, dets)]
    mean_e, acc_p = sum(acc_e.values()) / len(acc_e), sum(kept) / len(kept)
    trained = (sum(done[f"train:{t}"]["erase_seconds"] for t in targets) if approach in ("sum", *MERGE_OTHERS)
               else done[f"train:joint{len(targets)}-warm"]["erase_seconds"] if approach == "joint-warm"
               else done[f"train:joint{len(targets)}"]["erase_seconds"] if approach == "joint" and len(targets) > 1
               else done[f"train:{targets[0]}"]["erase_seconds"] if approach == "joint" and targets else 0.0)
    return {"item": f"score:{approach}:{len(targets)}", "approach": approach, "k": len(targets), "concepts": targets,
            "acc_e_per_concept": acc_e, "mean_acc_e": round(mean_e, 4), "acc_p_kept": round(acc_p, 4),
            "h": round(harmonic(mean_e, acc_p), 4), "train_seconds": round(trained, 1),
            "build_seconds": round(build, 2), "seconds": round(trained + build, 1),
            "kept_per_prompt": dict(zip(prompts, (round(v, 4) for v in kept))), "samples_per_prompt": samples}


def _items(counts: list[int], joint: list[int], warm: list[int]) -> list[tuple[str, list]]:
    top = max(counts)
    items = [("score", ["none", []])]
    items += [("train", [t, [t]]) for t in ORDER[:top]]
    items += [("train", [f"joint{k}", ORDER[:k]]) for k in joint if k > 1]
    items += [("train", [f"joint{k}-warm", ORDER[:k], True]) for k in warm]
    items += [("score", [a, ORDER[:k]]) for k in counts for a in APPROACHES
              if (a != "joint" or k in joint) and (a != "joint-warm" or k in warm)
              and not (k == 1 and a in ("sum", *MERGE_OTHERS))]
    return items


def _key(kind, args) -> str:
    return f"train:{args[0]}" if kind == "train" else f"score:{args[0]}:{len(args[1])}"


def _markdown(rows: list[dict], samples: int) -> str:
    lines = ["# Many concepts in one model (ShapesWorld, today's default)", "",
             f"ACC_e: each erased concept on its target prompts ({samples} samples per prompt), averaged; ACC_p: "
             f"the kept prompts {', '.join(f'{c} {s}' for s, c in KEEP)} on black ({2 * samples} samples each); "
             "H of the two. Seconds: training (joint: one run; sum and merge-kv: the k single runs) + building "
             "the erasure from it. `python bench/many_concepts.py`.", "",
             "| approach | k | mean ACC_e | kept ACC_p | H | seconds | ACC_e per concept |", "|---|---|---|---|---|---|---|"]
    scores = sorted((r for r in rows if r["item"].startswith("score:")), key=lambda r: (r["k"], r["approach"]))
    for r in scores:
        per = ", ".join(f"{t} {v:.2f}" for t, v in r["acc_e_per_concept"].items())
        lines.append(f"| {r['approach'] if r['k'] else 'untouched model'} | {r['k']} | {r['mean_acc_e']:.3f} | "
                     f"{r['acc_p_kept']:.3f} | {r['h']:.3f} | {r['seconds']} | {per} |")
    lines += ["", "| training | concepts | erase seconds | peak RSS MB |", "|---|---|---|---|"]
    for r in rows:
        if r["item"].startswith("train:"):
            lines.append(f"| {r['item'][6:]} | {', '.join(r['targets'])} | {r['erase_seconds']} | {r['peak_rss_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,3,5,8")
    p.add_argument("--joint-counts", default=None, help="the k of the joint runs (default: --counts)")
    p.add_argument("--warm-counts", default="", help="the k of the warm-started joint runs (default: none)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--item", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    path = RESULTS / "many_concepts.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {r["item"]: r for r in rows}
    if args.item:
        import torch

        torch.set_num_threads(2)
        kind, item_args = json.loads(args.item)
        out = train(*item_args) if kind == "train" else score(*item_args, args.samples, done)
        print(json.dumps(out))
        return 0
    from bierasing.io import atomic_write_text

    counts = [int(c) for c in args.counts.split(",")]
    joint = [int(c) for c in args.joint_counts.split(",")] if args.joint_counts else counts
    warm = [int(c) for c in args.warm_counts.split(",") if c]
    for kind, item_args in _items(counts, joint, warm):
        if _key(kind, item_args) in done:
            continue
        print(f"[many] {_key(kind, item_args)} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--item", json.dumps([kind, item_args]),
                              "--samples", str(args.samples)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        done[row["item"]] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows, indent=2))
        atomic_write_text(RESULTS / "many_concepts.md", _markdown(rows, args.samples))
        print(f"[many] {row['item']}: " + json.dumps({k: row.get(k) for k in ("h", "mean_acc_e", "acc_p_kept", "seconds")}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
