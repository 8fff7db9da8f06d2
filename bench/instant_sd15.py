"""bi-instant and merge_kv at SD1.5 size on the CPU: seconds and memory for 1 and 100 concepts.

    python bench/instant_sd15.py     # bench/results/instant_sd15.{json,md}

A full-size SD1.5 UNet and CLIP ViT-L text encoder with random weights (the real shapes, built from
the configs the package ships, CLIP's real tokenizer) as ``SD15Backbone``. Timings do not depend on the
weights' values: the edit is a few encoder passes and one 768x768 solve per attn2 key/value.
  instant-1     bi-instant, one concept, the default settings (preserve auto: the concept's neighbours
                among 350 shipped phrases, read by the text encoder; 4 contexts)
  instant-100   bi-instant, 100 concepts at once (objects, animals, artists, styles of the shipped
                vocabulary, each with its own safe alternative and the same defaults)
  merge-100     merge_kv of 100 per-concept erasures (rank-4 attn2 LoRAs of a trained one's shape)
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _backbone():
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bierasing.sd15 import SD15Backbone
    from bierasing.single_file import CONFIGS, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "sd15" / "unet")).eval()
    text = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "sd15" / "text_encoder" / "config.json")).eval()
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(CONFIGS / "sd15" / "scheduler"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "sd15" / "vae"))  # not used by the edit
    bb = SD15Backbone(clip_tokenizer(), text, unet, vae, sched)
    unet.requires_grad_(False)
    text.requires_grad_(False)
    return bb


def _pairs(n: int) -> list[tuple[str, str]]:
    vocab = json.loads((ROOT / "bierasing" / "vocabulary" / "general.json").read_text())
    safe = {"objects": "an object", "animals": "an animal", "artists": "a painting", "styles": "a picture"}
    pairs = [(p, safe[k]) for k in ("objects", "animals", "artists", "styles") for p in vocab[k]]
    return pairs[:n]


def main() -> int:
    import torch

    torch.set_num_threads(2)
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.export import erasure_tensors
    from bierasing.erase.instant import instant_erasure
    from bierasing.erase.merge import merge_kv

    t0 = time.time()
    bb = _backbone()
    rows = [{"item": "build stand-in", "seconds": round(time.time() - t0, 1)}]
    rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # noqa: E731
    for n in (1, 100):
        pairs = _pairs(n)
        t0 = time.time()
        with torch.no_grad():
            res = instant_erasure(bb, [Concept(t, s) for t, s in pairs], EraseConfig(method="bi-instant"))
        rows.append({"item": f"instant-{n}", "concepts": n, "rows": len(res.concepts),
                     "preserved": len(res.config.preserved()), "seconds": round(time.time() - t0, 1),
                     "layers": len(res.adapters.layers), "peak_rss_mb": rss()})
        res.adapters.remove(bb.unet)
        print(rows[-1], flush=True)
    g = torch.Generator().manual_seed(0)
    sources = []
    for t, _ in _pairs(100):
        adapters = bb.attach_adapters("attn2", 4, g)
        with torch.no_grad():
            for layer in adapters.layers.values():
                layer.up.normal_(0, 0.01, generator=g)
        info = {"method": "bi-erasing", "concepts": [{"target": t, "safe": ""}], "config": {"preserve": ""}}
        sources.append((erasure_tensors(adapters, precision="fp16"), info))
        adapters.remove(bb.unet)
    t0 = time.time()
    tensors, _ = merge_kv(bb, sources, precision="fp16")
    rows.append({"item": "merge-100", "concepts": 100, "seconds": round(time.time() - t0, 1),
                 "file_mb": round(sum(v.numel() * v.element_size() for v in tensors.values()) / 2**20, 1),
                 "peak_rss_mb": rss()})
    print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instant_sd15.json").write_text(json.dumps(rows, indent=2))
    lines = ["# bi-instant and merge_kv at SD1.5 size (CPU, 2 threads, random weights)", "",
             "`python bench/instant_sd15.py`. Seconds include resolving `preserve`/`contexts` auto "
             "(the text encoder reads the 350 shipped phrases) and the fp64 solves.", "",
             "| item | concepts | rows (with contexts) | preserved prompts | seconds | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| {r['item']} | {r['concepts']} | {r.get('rows', '-')} | {r.get('preserved', '-')} | "
                     f"{r['seconds']} | {r['peak_rss_mb']} |")
    lines += ["", f"The merged file of 100 erasures holds {rows[-1]['file_mb']} MB (fp16 key/value deltas "
              "and the summed LoRAs of the other layers)."]
    (RESULTS / "instant_sd15.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
