"""Attack benchmark on ShapesWorld: do erased concepts come back under synonyms, paraphrases and a
soft-prompt (UnlearnDiffAtk-style) attack?

    python bench/attack_bench.py                          # every runs/bench_erasures/*.safetensors
    python bench/attack_bench.py --only circle__bi-erasing,circle__none --samples 8
    python bench/attack_bench.py --model shapesworld-flow   # runs/bench_erasures_erasure_flow -> attacks_flow.*

Inputs are the erasures bench/erasure_bench.py keeps in runs/bench_erasures/<target>__<run>.safetensors
(the `released` run saves none), plus the untouched model as reference row "none" for every target
seen.  Each row runs in its own process on a freshly loaded shipped model (a failure does not stop
the rest) and is appended to bench/results/attacks.json as soon as it finishes; a re-run skips
finished rows.  ASR = share of samples in which the detector sees the erased concept (lower is a
more robust erasure); see bierasing/attack.py for the three attacks.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_TARGETS = ("circle", "red", "white")
MODEL = "shapesworld"  # --model: the shipped world the erasures were made on


@functools.cache
def _erasure_bench():
    """bench/erasure_bench.py, whose rows, file names and erasure folders these attacks follow."""
    spec = importlib.util.spec_from_file_location("_erasure_bench", ROOT / "bench" / "erasure_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def suffix(model: str) -> str:
    """"" for the UNet world, "_flow" for shapesworld-flow: erasure_bench.py's file naming."""
    return _erasure_bench().world_stem(model).removeprefix("erasure")


def erasures_of(model: str) -> Path:
    """Where bench/erasure_bench.py keeps the model's erasures."""
    return _erasure_bench().erasures_folder(model)


def _method_order() -> list[str]:
    """Rows in erasure_bench.py's order (methods, then ablations)."""
    return ["none"] + list(_erasure_bench().RUNS)


def jobs(erasures: Path) -> list[dict]:
    """One job per erasure file and one "none" reference per target that has files."""
    out, targets = [], []
    for f in sorted(erasures.glob("*.safetensors")):
        target, sep, run = f.stem.partition("__")
        if not sep:
            continue
        out.append({"target": target, "method": run, "file": str(f)})
        if target not in targets:
            targets.append(target)
    refs = [{"target": t, "method": "none", "file": None} for t in (targets or DEFAULT_TARGETS)]
    return refs + out


def single(spec: dict) -> dict:
    """One row, in this process."""
    import torch

    torch.set_num_threads(spec.get("threads", 2))
    from bierasing.world.attack import attack_report
    from bierasing.world.models import ShapesWorldBackbone

    bb = ShapesWorldBackbone.load(spec.get("model", "shapesworld"))
    info = {}
    if spec["file"]:
        from bierasing.io import load_safetensors

        tensors, meta = load_safetensors(spec["file"])
        if meta.get("kind") == "unet_weights":  # the released algorithm: a fully trained UNet
            bb.unet.load_state_dict(tensors, strict=False)
            info = {"method": "released"}
        else:
            from bierasing.erase.export import load_erasure

            _, info = load_erasure(bb.unet, spec["file"])
    t0 = time.time()
    if spec.get("embedding_only"):
        from bierasing.world.attack import attack_success, embedding_attack

        a = embedding_attack(bb, spec["target"], steps=spec["embedding_steps"], seed=spec.get("seed", 0))
        return {"embedding_asr": round(attack_success(bb, spec["target"], a.cond(), spec["samples"], spec.get("seed", 0)), 4),
                "embedding_init_asr": round(attack_success(bb, spec["target"], a.base, spec["samples"], spec.get("seed", 0)), 4),
                "embedding_attack": a.info(), "embedding_seconds": round(time.time() - t0, 1)}
    rep = attack_report(bb, spec["target"], samples=spec["samples"], seed=spec.get("seed", 0),
                        soft_steps=spec["soft_steps"], embedding_steps=spec["embedding_steps"])
    return {"target": spec["target"], "method": spec["method"],
            "file": Path(spec["file"]).name if spec["file"] else None,
            "erasure_method": info.get("method"), **rep, "total_seconds": round(time.time() - t0, 1)}


def _canonical_acc_e() -> dict[tuple[str, str], float]:
    """ACC_e under canonical prompts from bench/results/erasure.json (if present)."""
    path = ROOT / "bench" / "results" / f"erasure{suffix(MODEL)}.json"
    if not path.exists():
        return {}
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    out = {(r["target"], r["run"]): r["acc_e"] for r in res.get("rows", []) if "acc_e" in r}
    for t, b in (res.get("baseline") or {}).items():
        out[(t, "none")] = b.get("acc_e")
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_reports(results: dict) -> None:
    from bierasing.io import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"attacks{suffix(MODEL)}"
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(results, indent=2))
    acc = _canonical_acc_e()
    order = _method_order()
    rank = lambda m: order.index(m) if m in order else len(order)  # noqa: E731
    rows = sorted(results["rows"], key=lambda r: (r["target"], rank(r["method"]), r["method"]))
    flow = MODEL != "shapesworld"
    lines = [f"# Attack benchmark ({'ShapesWorld-Flow' if flow else 'ShapesWorld'})", "",
             f"Machine: 2 CPU cores, torch threads 2. {results['samples']} samples per prompt (soft prompt: "
             f"{results['samples']} samples), {'Euler' if flow else 'DDIM'} 20 steps, CFG 1.5, detector-scored. ASR = share of samples "
             "showing the erased concept: lower is a more robust erasure. `ACC_e` = canonical prompts "
             f"(bench/results/erasure{suffix(MODEL)}.json); `synonym` = the erasure prompts with the target's synonyms "
             "(never used in training; synonyms containing the canonical word are left out); `paraphrase` = "
             "synonyms in caption templates used neither in world training nor in erasure; `soft prompt` = "
             f"UnlearnDiffAtk-style, 2 learned token embeddings, {results['soft_steps']} Adam steps on the erased "
             "model's own denoising loss (`init` = the same sampling before optimisation); `embedding` = "
             f"the conditioning-space attack (bierasing/cond_attack.py), {results.get('embedding_steps', 40)} Adam "
             "steps from the erasure prompt's conditioning, each token moved by at most 0.5 of its norm "
             "(`emb init` = the erasure prompt itself). `none` = the untouched model; `released` = the "
             "faithful re-run of the released algorithm (full UNet).", "",
             "| target | method | ACC_e canonical | synonym ASR | paraphrase ASR | soft-prompt ASR | soft init ASR "
             "| embedding ASR | emb init ASR | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['method']} | {_fmt(acc.get((r['target'], r['method'])))} | "
                     f"{_fmt(r['synonym_asr'])} | {_fmt(r['paraphrase_asr'])} | {_fmt(r['soft_prompt_asr'])} | "
                     f"{_fmt(r.get('soft_prompt_init_asr'))} | {_fmt(r.get('embedding_asr'))} | "
                     f"{_fmt(r.get('embedding_init_asr'))} | {r.get('total_seconds', '-')} |")
    methods = sorted({r["method"] for r in rows}, key=lambda m: (rank(m), m))
    lines += ["", "Mean over targets:", "",
              "| method | synonym ASR | paraphrase ASR | soft-prompt ASR | embedding ASR | targets |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        rr = [r for r in rows if r["method"] == m]

        def mean(k):
            vals = [r[k] for r in rr if r.get(k) is not None]
            return sum(vals) / len(vals) if vals else None

        lines.append(f"| {m} | {_fmt(mean('synonym_asr'))} | {_fmt(mean('paraphrase_asr'))} | "
                     f"{_fmt(mean('soft_prompt_asr'))} | {_fmt(mean('embedding_asr'))} | {len(rr)} |")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")


def run_single(spec: dict, script: str = __file__) -> dict | None:
    """One row in its own process running ``script --single`` (a crash or OOM there does not stop the rest)."""
    proc = subprocess.run([sys.executable, script, "--single", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    global RESULTS, MODEL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (and for each soft-prompt ASR)")
    p.add_argument("--soft-steps", type=int, default=60, help="Adam steps of the soft-prompt attack")
    p.add_argument("--embedding-steps", type=int, default=40, help="Adam steps of the conditioning-space attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated rows target__method (method 'none' = untouched model)")
    p.add_argument("--model", default="shapesworld", choices=("shapesworld", "shapesworld-flow"),
                   help="the shipped world the erasures were made on (results: attacks.* or attacks_flow.*)")
    p.add_argument("--erasures", default=None, help="folder of <target>__<run>.safetensors "
                   "(default: where bench/erasure_bench.py keeps the model's erasures)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (attacks[_flow].json and .md)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(single(json.loads(args.single))))
        return 0
    RESULTS, MODEL = Path(args.out), args.model
    erasures = Path(args.erasures) if args.erasures else erasures_of(MODEL)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"attacks{suffix(MODEL)}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for key, val in (("samples", args.samples), ("soft_steps", args.soft_steps), ("seed", args.seed),
                     ("embedding_steps", args.embedding_steps)):
        if results.get(key, val) != val:
            raise SystemExit(f"{path} was made with {key} {results[key]}; use the same value or move the file away")
        results[key] = val
    todo = jobs(erasures)
    if args.only:
        want = set(args.only.split(","))
        known = {f"{j['target']}__{j['method']}" for j in todo}
        for w in want - known:  # a "none" row for a target without files is still allowed
            target, _, method = w.partition("__")
            if method != "none":
                raise SystemExit(f"no erasure {w}.safetensors in {erasures}")
            todo.append({"target": target, "method": "none", "file": None})
        todo = [j for j in todo if f"{j['target']}__{j['method']}" in want]
    by_key = {(r["target"], r["method"]): r for r in results["rows"]}
    failed = 0
    for j in todo:
        old = by_key.get((j["target"], j["method"]))
        if old is not None and old.get("embedding_asr") is not None:
            continue
        spec = {**j, "model": MODEL, "samples": args.samples, "soft_steps": args.soft_steps, "seed": args.seed,
                "embedding_steps": args.embedding_steps, "embedding_only": old is not None}
        # a row from before the embedding attack existed gets that column only
        print(f"[attack] {'embedding attack on ' if old else ''}{j['method']} on {j['target']} ...", flush=True)
        out = run_single(spec)
        if out is None:
            failed += 1
            continue
        if old is not None:
            old.update(out)
            print(f"[attack]   embedding {out['embedding_asr']} (init {out['embedding_init_asr']})", flush=True)
        else:
            results["rows"].append(out)
            print(f"[attack]   synonym {out['synonym_asr']}  paraphrase {out['paraphrase_asr']}  "
                  f"soft prompt {out['soft_prompt_asr']} (init {out['soft_prompt_init_asr']})  "
                  f"embedding {out['embedding_asr']}  {out['total_seconds']} s", flush=True)
        write_reports(results)
    if results["rows"]:
        write_reports(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
