"""Is the conditioning-space attack an attack? A random-offset control for bench/attack_bench.py.

    python bench/attack_control.py --model shapesworld-flow --only circle__bi-default,circle__none

For each kept erasure (bench/erasure_bench.py's folder) and the untouched model ("none"), the
benchmark's conditioning attack (bierasing/cond_attack.py, 40 steps from the erasure prompt) is run
as attack_bench.py runs it, and then the same sampling is scored under ``--draws`` random offsets
that move every token by exactly as much as the attack moved it, in a random direction. When the
random offsets bring the concept back as often as the attack does, the attack's success measures
how far the erasure reaches around the prompt, not what optimisation found. The attack's loss
before and after (on one fixed batch) is reported too; it can stay flat where the attack succeeds
(the highest-t denoising loss hardly changes, its gradient still points somewhere useful).

Results: bench/results/attack_control[_flow].{json,md}; finished rows are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import attack_bench  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def random_like(delta, seed: int):
    """Offsets with ``delta``'s per-token norms in random directions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r = torch.randn(delta.shape, generator=g)
    return r * (delta.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def single(spec: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    from bierasing.world.attack import attack_success, embedding_attack
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load(spec["model"])
    if spec["file"]:
        from bierasing.erase.export import load_erasure

        load_erasure(bb.unet, spec["file"])
    t, n, seed = spec["target"], spec["samples"], spec["seed"]
    a = embedding_attack(bb, t, steps=spec["steps"], seed=seed)
    rand = [attack_success(bb, t, a.base + random_like(a.delta, 1000 + k), n, seed) for k in range(spec["draws"])]
    return {"target": t, "method": spec["method"], "init_asr": attack_success(bb, t, a.base, n, seed),
            "attack_asr": attack_success(bb, t, a.cond(), n, seed), "random_asr": rand,
            "random_asr_mean": round(sum(rand) / len(rand), 4), "attack": a.info()}


def write_reports(results: dict, name: str, flow: bool) -> None:
    from bierasing.io import atomic_write_text

    atomic_write_text(RESULTS / f"{name}.json", json.dumps(results, indent=2))
    lines = [f"# Conditioning attack against random offsets ({'ShapesWorld-Flow' if flow else 'ShapesWorld'})", "",
             f"{results['samples']} samples per prompt, {'Euler' if flow else 'DDIM'} 20 steps, CFG 1.5, "
             f"detector-scored (bench/attack_control.py). `attack` = the conditioning attack of "
             f"attacks{'_flow' if flow else ''}.md ({results['steps']} Adam steps, each token moved by at most "
             "0.5 of its norm); `random` = the mean over "
             f"{results['draws']} offsets that move each token as far as the attack did, in a random direction; "
             "`loss` = the attack's denoising loss on one fixed batch before -> after.", "",
             "| target | method | prompt ASR | attack ASR | random ASR (each draw) | largest token offset | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["target"], r["method"])):
        a = r["attack"]
        draws = " / ".join(f"{v:.3f}" for v in r["random_asr"])
        lines.append(f"| {r['target']} | {r['method']} | {r['init_asr']:.3f} | {r['attack_asr']:.3f} | "
                     f"{r['random_asr_mean']:.3f} ({draws}) | {a['relative_size']:.2f} | "
                     f"{a['initial_loss']:.6f} -> {a['final_loss']:.6f} |")
    methods = sorted({r["method"] for r in results["rows"]})
    lines += ["", "| method | attack ASR | random ASR | targets |", "|---|---|---|---|"]
    for m in methods:
        rr = [r for r in results["rows"] if r["method"] == m]
        lines.append(f"| {m} | {sum(r['attack_asr'] for r in rr) / len(rr):.3f} | "
                     f"{sum(r['random_asr_mean'] for r in rr) / len(rr):.3f} | {len(rr)} |")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapesworld", choices=("shapesworld", "shapesworld-flow"))
    p.add_argument("--only", default="", help="comma-separated rows target__method (method 'none' = untouched)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (attack_bench.py's default run: 8)")
    p.add_argument("--steps", type=int, default=40, help="Adam steps of the attack (attack_bench.py: 40)")
    p.add_argument("--draws", type=int, default=3, help="random offsets per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(single(json.loads(args.single))))
        return 0
    if not args.only:
        p.error("--only is required: the rows to check, e.g. circle__bi-default,circle__none")
    flow = args.model != "shapesworld"
    name = "attack_control" + ("_flow" if flow else "")
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for key, val in (("samples", args.samples), ("steps", args.steps), ("draws", args.draws), ("seed", args.seed)):
        if results.get(key, val) != val:
            raise SystemExit(f"{path} was made with {key} {results[key]}; use the same value or move the file away")
        results[key] = val
    erasures = attack_bench.erasures_of(args.model)
    done = {(r["target"], r["method"]) for r in results["rows"]}
    failed = 0
    for row in args.only.split(","):
        target, _, method = row.partition("__")
        if (target, method) in done:
            continue
        file = None if method == "none" else erasures / f"{row}.safetensors"
        if file is not None and not file.is_file():
            raise SystemExit(f"no erasure {file}: make it with bench/erasure_bench.py first")
        spec = {"target": target, "method": method, "file": str(file) if file else None, "model": args.model,
                "samples": args.samples, "steps": args.steps, "draws": args.draws, "seed": args.seed}
        print(f"[control] {method} on {target} ...", flush=True)
        out = attack_bench.run_single(spec, __file__)
        if out is None:
            failed += 1
            continue
        print(f"[control]   prompt {out['init_asr']}  attack {out['attack_asr']}  random {out['random_asr']}", flush=True)
        results["rows"].append(out)
        write_reports(results, name, flow)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
