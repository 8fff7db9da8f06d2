"""Collect world-training runs into bench/results/world_seeds.{json,md}: one row per run folder
(seed, recipe, probes, stage times, the 16-sample evaluation against the world bar).

    python bench/world_seeds.py runs/s0_edge3 runs/s1_edge3 runs/s2_edge3 bierasing/world/weights_flow

Reads the ``world.json`` that ``bierasing world train`` writes (in a run folder's ``model/``, or in
a model folder itself); rows are keyed by run name, so re-running with more folders adds to the table.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bierasing.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BAR = {"shape_acc": 0.90, "color_acc": 0.90, "axis3_acc": 0.85, "image_steer_acc": 0.80}
RECIPE = ("arch", "unet_edge_weight", "flow_pooled_dropout", "unet_steps", "ip_steps", "lr", "ip_lr")


def row(folder: Path) -> dict:
    meta_path = folder / "world.json" if (folder / "world.json").is_file() else folder / "model" / "world.json"
    meta = json.loads(meta_path.read_text())
    q, tr = meta["quality"], meta["train"]
    recipe = {**{k: tr.get(k) for k in RECIPE}, "arch": meta.get("arch", "unet")}
    cfg = meta.get("config", {})
    if recipe["arch"] == "flow":
        recipe["blocks"] = f"{cfg.get('double_blocks')}+{cfg.get('single_blocks')}"
        recipe["redux_tokens"] = cfg.get("redux_tokens", 0)
    shipped = {"weights": "shipped shapesworld", "weights_flow": "shipped shapesworld-flow"}
    return {"run": shipped.get(folder.name, folder.name), "seed": tr["seed"], "recipe": recipe,
            "init_from": meta.get("init_from"), "probes": meta.get("probes", {}),
            "stopped_at": meta.get("stopped_at", {}),
            "minutes": {k: round(v / 60, 1) for k, v in meta["seconds"].items()},
            "total_minutes": round(sum(meta["seconds"].values()) / 60, 1),
            "quality": {k: q[k] for k in (*BAR, "text_image_shape_acc", "none_rate")},
            "meets_bar": all(q[k] >= v for k, v in BAR.items())}


HEADER = ("| run | seed | arch | edge weight | shape | colour | background | steering | text + image | "
          "'none' | minutes | bar |", "|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(rows: list[dict], notes: list[str], defaults: dict | None = None) -> str:
    lines = ["# World training from several seeds", "",
             "Each row is one `bierasing world train` run on a 2-core CPU (torch threads 2), evaluated with "
             "16 samples per prompt. Bar: shape >= 0.90, colour >= 0.90, background >= 0.85, image "
             "steering >= 0.80. Minutes: the training stages, without the final evaluation (about 1 min "
             "more on the flow world, 3-4 on the UNet world).", "",
             "Flow rows: transformer blocks double+single, Redux tokens (0 = one per image-encoder hidden state, "
             "n = the class state n times).", ""]
    by_run = {r["run"]: r for r in rows}
    for arch, spec in (defaults or {}).items():
        lines += [f"## Today's default, {arch} world", "", spec["recipe"], "", *HEADER,
                  *table_rows(by_run[name] for name in spec["runs"]), ""]
    lines += ["## Every run", "", *HEADER, *table_rows(rows)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def table_rows(rows) -> list[str]:
    lines = []
    for r in rows:
        q, rc = r["quality"], r["recipe"]
        arch = rc["arch"] if "blocks" not in rc else f"flow {rc['blocks']}, Redux {rc['redux_tokens']}"
        lines.append(f"| {r['run']} | {r['seed']} | {arch} | {rc['unet_edge_weight'] or 0} | {q['shape_acc']:.3f} | "
                     f"{q['color_acc']:.3f} | {q['axis3_acc']:.3f} | {q['image_steer_acc']:.3f} | "
                     f"{q['text_image_shape_acc']:.3f} | {q['none_rate']:.3f} | {r['total_minutes']} | "
                     f"{'met' if r['meets_bar'] else 'missed'} |")
    return lines


def main(folders: list[str]) -> None:
    path = RESULTS / "world_seeds.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": [], "notes": []}
    by_run = {r["run"]: r for r in results["rows"]}
    for f in folders:
        r = row(Path(f))
        by_run[r["run"]] = r
    results["rows"] = sorted(by_run.values(), key=lambda r: (r["recipe"]["arch"], r["run"]))
    atomic_write_text(path, json.dumps(results, indent=2))
    atomic_write_text(RESULTS / "world_seeds.md",
                      markdown(results["rows"], results["notes"], results.get("defaults")))


if __name__ == "__main__":
    main(sys.argv[1:])
