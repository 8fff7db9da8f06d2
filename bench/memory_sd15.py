"""Memory of one erasure training step on a full-size (random) SD1.5 UNet at 64x64 images (8x8 latents).

    python bench/memory_sd15.py                                  # writes bench/results/memory_sd15.{json,md}
    python bench/memory_sd15.py --modes engine-auto --latent 32  # one more row, the others kept
    python bench/memory_sd15.py --family sdxl --modes engine-auto --latent 16   # SDXL: memory_sdxl.{json,md}

Two ways, each in its own process so peak RSS belongs to it alone:
  * engine:   one UNet (fp32, 859.5 M parameters) + rank-4 LoRA on attn2 + IP-Adapter K/V; the
              teacher is the same UNet with the LoRA off; EraseConfig() defaults: 6 teacher rows in
              one no-grad forward, 4 student rows with grad (negative, positive, target->safe,
              adversarial) and the first step's conditioning attack; Adam over the LoRA only;
  * engine-auto: the same with micro_batch auto (one UNet row per call on a UNet this size), the
              default since micro_batch exists; "engine" pins micro_batch 0 (all rows in one call);
  * released: the released code's way: a deep copy of the UNet as teacher, Adam over every UNet
              parameter, each call its own forward (bierasing.erase.released).
At 8x8 latents the weights and optimizer state dominate; at 512 px (64x64 latents) the activations of
the rows with gradients do, which ``EraseConfig.micro_batch`` (auto: one row per call on a UNet
this size) bounds. This row was measured before micro_batch existed: all 4 student rows in one call.
Text embeddings and image tokens are random [77 x 768] / [4 x 768] tensors: the text and image
encoders are the same in both and are not what differs. Weights are random (nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(mode: str, latent: int = 8, family: str = "sd15") -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from bierasing.adapter import install_decoupled_attention
    from bierasing.backbone import Backbone
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.erase.released import released_bi_erasing
    from bierasing.backbone import pack_pooled
    from bierasing.sdxl import SDXLBackbone
    from bierasing.standins import sdxl_unet_config

    torch.set_num_threads(2)
    torch.manual_seed(0)
    sdxl = family == "sdxl"
    # diffusers' defaults are SD1.x's UNet
    unet = UNet2DConditionModel(**sdxl_unet_config("full")) if sdxl else UNet2DConditionModel(cross_attention_dim=768)
    width = unet.config.cross_attention_dim
    install_decoupled_attention(unet)
    unet.eval().requires_grad_(False)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    text = {p: torch.randn(1, 77, width, generator=g) for p in ("", "nudity", "clothed")}
    if sdxl:  # the pooled embedding rides as a last token (bierasing.sdxl.pack_pooled)
        text = {p: pack_pooled(t, torch.randn(1, 1280, generator=g)) for p, t in text.items()}

    class RandomConditioned(Backbone):
        pooled_dim = 1280
        if sdxl:
            model_output = SDXLBackbone.model_output

        def __init__(self):
            self.unet, self.alphas_cumprod = unet, sched.alphas_cumprod.float()
            self.prediction_type, self.sample_shape = "epsilon", (4, latent, latent)

        def encode_text(self, prompts):
            return torch.cat([text[p] for p in prompts])

        def encode_images(self, images):
            return torch.randn(images.shape[0], 4, width, generator=torch.Generator().manual_seed(1))

        can_encode_images = False  # no VAE: the adversarial attack uses the x_t cache's samples

        def to_x(self, images):
            raise NotImplementedError

        def from_x(self, x0):
            raise NotImplementedError

    bb = RandomConditioned()
    imgs = torch.rand(2, 3, 8 * latent, 8 * latent, generator=g)
    concept = Concept("nudity", "clothed", imgs, imgs)
    params = sum(p.numel() for p in unet.parameters())
    base_rss, base_peak = current_rss_mb(), rss_mb()
    t0 = time.time()
    if mode in ("engine", "engine-auto"):
        cfg = EraseConfig(steps=1, batch_size=1, cache_size=1, xt_steps=2, seed=0,
                          micro_batch=0 if mode == "engine" else -1)
        res = Eraser(bb, [concept], cfg).run()
        trained = res.adapters.num_parameters()
        copies = 1
    else:
        out = released_bi_erasing(bb, concept, steps=1, lr=1e-5, ddim_steps=2)
        trained, copies = out["trained_parameters"], 2
    return {"family": family, "mode": mode, "unet_parameters": params, "unet_fp32_mb": round(params * 4 / 2**20, 1),
            "unet_copies": copies, "trained_parameters": trained, "resolution": 8 * latent, "latent": latent,
            "rss_after_load_mb": round(base_rss, 1), "peak_rss_mb": round(rss_mb(), 1),
            "peak_increase_over_loaded_model_mb": round(rss_mb() - max(base_rss, 0.0), 1),
            "step_seconds": round(time.time() - t0, 1), "peak_before_step_mb": round(base_peak, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--modes", default="engine,engine-auto,released")
    p.add_argument("--latent", type=int, default=8, help="latent side (8 = 64 px images, 64 = SD1.5's 512 px)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        mode, latent, family = args.single.split(":")
        print(json.dumps(one(mode, int(latent), family)))
        return 0
    from bierasing.io import atomic_write_text

    path = RESULTS / f"memory_{args.family}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--single", f"{mode}:{args.latent}:{args.family}"],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        key = lambda r: (r["mode"], r.get("latent", 8))  # noqa: E731
        rows = [r for r in rows if key(r) != key(row)] + [row]
        print(row, flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows, indent=2))
    name = {"sd15": "SD1.5", "sdxl": "SDXL"}[args.family]
    lines = [f"# One training step on a full-size random {name} UNet (CPU fp32, batch 1)", "",
             "Latent 8 = 64x64 images, 64 = SD1.5's 512 px, 128 = SDXL's 1024 px. engine: micro_batch 0 (every row of the step in one "
             "call; the only way before micro_batch existed); engine-auto: the default (one row per call here); "
             "released: two UNets, Adam over all UNet weights.", "",
             "| way | latent | UNet copies | trained params | RSS with model loaded (MB) | peak RSS (MB) | peak increase (MB) | step s |",
             "|---|---|---|---|---|---|---|---|"]
    for x in sorted(rows, key=lambda r: (r.get("latent", 8), r["mode"])):
        lines.append(f"| {x['mode']} | {x.get('latent', 8)} | {x['unet_copies']} | {x['trained_parameters']:,} | "
                     f"{x['rss_after_load_mb']} | {x['peak_rss_mb']} | {x['peak_increase_over_loaded_model_mb']} | "
                     f"{x['step_seconds']} |")
    rel = [r for r in rows if r["mode"] == "released"]
    if rel:
        r = max(rel, key=lambda r: r.get("latent", 8))
        lines += ["", f"UNet: {r['unet_parameters']:,} parameters = {r['unet_fp32_mb']} MB in fp32. Peak RSS over the "
                  f"released loop's at latent {r.get('latent', 8)} ({r['peak_rss_mb']} MB; a lower bound of its peak "
                  "at any larger latent, which only adds activations):"]
        lines += [f"- {x['mode']} at latent {x.get('latent', 8)}: {x['peak_rss_mb'] / r['peak_rss_mb']:.2f}"
                  for x in rows if x["mode"] != "released"]
    atomic_write_text(RESULTS / f"memory_{args.family}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
