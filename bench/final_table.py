"""The defaults' final table: every target, both erasure seeds, at 16 samples per prompt.

    python bench/final_table.py        # reads erasure_s16.json + attacks.json, writes defaults_final.{json,md}

Inputs come from the other benches (nothing is trained or sampled here):
    python bench/erasure_bench.py --samples 16 --from-kept --runs <RUNS> --targets <TARGETS>
    python bench/attack_bench.py --samples 8 --only <target>__<run>,...
Per target and seed: ACC_e, ACC_p, H, synonym ACC_e (16 samples), soft-prompt ASR (8 samples, 60
steps), training seconds and UNet forward-equivalents per x_t sample (from the 8-sample row whose
erasure this is). The bar (issue "one default for every concept"): mean H over the eleven targets
>= 0.90 on both seeds, every target >= 0.80, above every baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ELEVEN = ("circle", "star", "triangle", "cross", "red", "blue", "yellow", "green", "white", "black", "gray")
NEW = ("square", "purple")  # never a target before 2026-12-06: nothing was chosen on them
#: method -> its runs by seed (uce is closed-form: one run, no seed)
METHODS = {"bi-default": ("bi-default", "bi-default-seed1"), "esd-x": ("esd-x", "esd-x-seed1"),
           "co-erasing": ("co-erasing", "co-erasing-seed1"), "uce": ("uce",)}
BAR_MEAN, BAR_MIN = 0.90, 0.80


def collect(erasure: dict, attacks: dict) -> list[dict]:
    rows = {(r["target"], r["run"]): r for r in erasure["rows"]}
    soft = {(r["target"], r["method"]): r.get("soft_prompt_asr") for r in attacks["rows"]}
    out = []
    for method, runs in METHODS.items():
        for seed, run in enumerate(runs):
            for t in ELEVEN + NEW:
                r = rows.get((t, run))
                if r is None:
                    continue
                out.append({"method": method, "seed": seed, "target": t, "held_out": t in NEW,
                            **{k: r[k] for k in ("acc_e", "acc_p", "h", "acc_e_synonyms", "seconds")},
                            "fe_per_sample": r["unet_forward_equivalents_per_sample"],
                            "soft_prompt_asr": soft.get((t, run))})
    return out


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for method in METHODS:
        for seed in (0, 1):
            mine = {r["target"]: r for r in rows if r["method"] == method and r["seed"] == seed}
            eleven = [mine[t]["h"] for t in ELEVEN if t in mine]
            every = [mine[t]["h"] for t in ELEVEN + NEW if t in mine]
            if not eleven:
                continue
            out.append({"method": method, "seed": seed, "targets_11": len(eleven),
                        "mean_h_11": round(sum(eleven) / len(eleven), 4), "min_h_11": min(eleven),
                        "below_bar": [t for t in ELEVEN if t in mine and mine[t]["h"] < BAR_MIN],
                        "mean_h_all": round(sum(every) / len(every), 4), "targets_all": len(every)})
    return out


def markdown(rows: list[dict], means: list[dict], samples: int) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# The defaults' final table (ShapesWorld UNet world)", "",
             f"{samples} samples per prompt for ACC_e, ACC_p, H and synonym ACC_e; soft-prompt ASR at 8 samples "
             "(60 Adam steps, bench/attack_bench.py); seconds and FE/sample are the training run's (2 cores). "
             f"The bar: mean H over the eleven targets >= {BAR_MEAN} on both seeds, every target >= {BAR_MIN}. "
             f"{', '.join(NEW)} were never a target before 2026-12-06 (nothing was chosen on them).", "",
             "## Means", "", "Where a method has fewer targets (the kept erasures the 16-sample run rescored), "
             "the count is in brackets.", "",
             "| method | seed | mean H (11) | min H (11) | below 0.80 | mean H (13) | bar met |",
             "|---|---|---|---|---|---|---|"]
    for m in means:
        met = m["targets_11"] == len(ELEVEN) and m["mean_h_11"] >= BAR_MEAN and not m["below_bar"]
        n11 = "" if m["targets_11"] == len(ELEVEN) else f" ({m['targets_11']})"
        lines.append(f"| {m['method']} | {m['seed']} | **{m['mean_h_11']:.3f}**{n11} | {m['min_h_11']:.3f} | "
                     f"{', '.join(m['below_bar']) or '-'} | {m['mean_h_all']:.3f} ({m['targets_all']}) | "
                     f"{'yes' if met else 'no'} |")
    lines += ["", "## Against the best baseline, per target", "",
              "Bi-Erasing: the mean of its two seeds; baseline: the best single row of any baseline on that target.", "",
              "| target | bi-default | best baseline | margin |", "|---|---|---|---|"]
    for t in ELEVEN + NEW:
        ours = [r["h"] for r in rows if r["method"] == "bi-default" and r["target"] == t]
        theirs = [r for r in rows if r["method"] != "bi-default" and r["target"] == t]
        if not ours or not theirs:
            continue
        best = max(theirs, key=lambda r: r["h"])
        mean = sum(ours) / len(ours)
        lines.append(f"| {t} | {mean:.3f} | {best['method']} seed {best['seed']}: {best['h']:.3f} | "
                     f"{mean - best['h']:+.3f} |")
    lines += ["", "## Per target and seed", "",
              "| method | target | seed | ACC_e | ACC_p | H | syn ACC_e | soft-prompt ASR | seconds | FE/sample |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target']}{' (new)' if r['held_out'] else ''} | {r['seed']} | "
                     f"{f(r['acc_e'])} | {f(r['acc_p'])} | {f(r['h'])} | {f(r['acc_e_synonyms'])} | "
                     f"{f(r['soft_prompt_asr'])} | {r['seconds']} | {r['fe_per_sample']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from bierasing.io import atomic_write_text

    erasure = json.loads((RESULTS / "erasure_s16.json").read_text())
    attacks = json.loads((RESULTS / "attacks.json").read_text())
    rows = collect(erasure, attacks)
    means = summary(rows)
    payload = {"samples_per_prompt": erasure["samples_per_prompt"], "attack_samples": attacks["samples"],
               "bar": {"mean_h_11": BAR_MEAN, "min_h": BAR_MIN}, "means": means, "rows": rows}
    atomic_write_text(RESULTS / "defaults_final.json", json.dumps(payload, indent=2))
    atomic_write_text(RESULTS / "defaults_final.md", markdown(rows, means, erasure["samples_per_prompt"]))
    for m in means:
        print(f"{m['method']:11s} seed {m['seed']}: mean H (11) {m['mean_h_11']:.3f}, min {m['min_h_11']:.3f}, "
              f"below 0.80: {', '.join(m['below_bar']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
