"""Erasures one after another (ShapesWorld): does erasing B from a model that carries erasure A bring A back?

    python bench/sequential.py [--pairs circle:red,white:star,circle:triangle] [--samples 8]

A is the default erasure bench/erasure_bench.py keeps (runs/bench_erasures/<A>__bi-default.safetensors;
run that row first). B is erased with today's defaults on the model carrying A, exactly as
``bierasing erase --on <A file>`` does (bierasing.erase.job.run_erase_job), and the stacked file
(A and B in one LoRA) is scored: A's ACC_e, B's ACC_e, and ACC_p on prompts naming neither
(square/cross x yellow/purple on black, those without A or B). Results in bench/results/sequential.{json,md}.
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
KEEP = [("square", "yellow"), ("square", "purple"), ("cross", "yellow"), ("cross", "purple")]


def _kept_acc(bb, erased: set[str], samples: int) -> float:
    from bierasing.world import data
    from bierasing.world.evaluate import _correct, _detect, generate

    keep = [(s, c) for s, c in KEEP if not {s, c} & erased]
    prompts = [data.prompt(s, c, "black") for s, c in keep]
    dets = _detect(generate(bb, prompts, samples, seed=7))
    per = [sum(_correct(d, data.Concepts(s, c, "black")) for d in row) / len(row) for (s, c), row in zip(keep, dets)]
    return round(sum(per) / len(per), 4)


def one(a: str, b: str, samples: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from bierasing.erase import EraseConfig
    from bierasing.erase.export import load_erasure
    from bierasing.erase.job import ConceptSpec, run_erase_job
    from bierasing.world import data
    from bierasing.world.evaluate import measure_erasure
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load()
    a_file = ROOT / "runs" / "bench_erasures" / f"{a}__bi-default.safetensors"
    if not a_file.exists():
        raise SystemExit(f"{a_file} is missing: run bench/erasure_bench.py --runs bi-default --targets {a} first")
    acc_e = lambda t: round(measure_erasure(bb, t, samples, target_only=True)["acc_e"], 4)  # noqa: E731
    row = {"a": a, "b": b, "safe_b": data.DEFAULT_SAFE[b], "samples_per_prompt": samples}
    row["untouched"] = {"acc_e_a": acc_e(a), "acc_e_b": acc_e(b), "acc_p_kept": _kept_acc(bb, {a, b}, samples)}
    adapters, _ = load_erasure(bb.unet, a_file)
    row["a_alone"] = {"acc_e_a": acc_e(a), "acc_e_b": acc_e(b), "acc_p_kept": _kept_acc(bb, {a, b}, samples)}
    adapters.remove(bb.unet)
    t0 = time.time()
    out = ROOT / "runs" / "sequential" / f"{a}_then_{b}"
    report = run_erase_job(bb, [ConceptSpec(b, data.DEFAULT_SAFE[b])], EraseConfig(), out, eval_samples=0,
                           progress=False, log=lambda m: None, on=[a_file])
    row["seconds_b"] = round(time.time() - t0, 1)
    adapters, info = load_erasure(bb.unet, report["output"])
    row["a_then_b"] = {"acc_e_a": acc_e(a), "acc_e_b": acc_e(b), "acc_p_kept": _kept_acc(bb, {a, b}, samples)}
    adapters.remove(bb.unet)
    row["stack"] = [r.get("file") for r in info["stack"]]
    bench = json.loads((RESULTS / "erasure.json").read_text())["rows"]
    b_alone = next((r for r in bench if (r["target"], r["run"]) == (b, "bi-default")), None)
    row["b_alone_acc_e"] = b_alone["acc_e"] if b_alone else None  # same scorer and seeds, B erased alone
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# Erasures one after another (ShapesWorld)", "",
             "A: the default erasure of A alone; A then B: B erased with the defaults on the model carrying A "
             "(`bierasing erase --on A.safetensors`), scored with the one file that holds both. ACC_e lower is "
             "better; kept ACC_p: square / cross x yellow / purple on black, those naming neither A nor B.", "",
             "B alone: ACC_e of B's own default erasure in erasure.json (same scorer and seeds).", "",
             "| A | B | model | ACC_e A | ACC_e B | kept ACC_p | seconds (B) | samples |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, key in (("untouched", "untouched"), ("A alone", "a_alone"), ("A then B", "a_then_b")):
            m = r[key]
            lines.append(f"| {r['a']} | {r['b']} | {name} | {m['acc_e_a']:.3f} | {m['acc_e_b']:.3f} | "
                         f"{m['acc_p_kept']:.3f} | {r['seconds_b'] if key == 'a_then_b' else '-'} | "
                         f"{r['samples_per_prompt']} |")
        if r.get("b_alone_acc_e") is not None:
            lines.append(f"| {r['a']} | {r['b']} | B alone | - | {r['b_alone_acc_e']:.3f} | - | - | 8 |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="circle:red,white:star,circle:triangle", help="A:B pairs, comma-separated")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        a, b = args.single.split(":")
        print(json.dumps(one(a, b, args.samples)))
        return 0
    sys.path.insert(0, str(ROOT))
    from bierasing.io import atomic_write_text

    path = RESULTS / "sequential.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for pair in args.pairs.split(","):
        a, b = pair.split(":")
        if any((r["a"], r["b"], r["samples_per_prompt"]) == (a, b, args.samples) for r in rows):
            continue
        print(f"[sequential] {a} then {b} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--single", pair, "--samples", str(args.samples)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        atomic_write_text(path, json.dumps(rows, indent=2))
        atomic_write_text(RESULTS / "sequential.md", markdown(rows))
        print(markdown(rows).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
