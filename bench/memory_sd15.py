"""Memory of one erasure training step on a full-size (random) SD1.5 UNet at 64x64.

    python bench/memory_sd15.py            # writes bench/results/memory_sd15.{json,md}

Two ways, each in its own process so peak RSS belongs to it alone:
  * engine:   one UNet (fp32, 859.5 M parameters) + rank-4 LoRA on attn2 + IP-Adapter K/V; the
              teacher is the same UNet with the LoRA off; EraseConfig() defaults: 6 teacher rows in
              one no-grad forward, 4 student rows with grad (negative, positive, target->safe,
              adversarial) and the first step's conditioning attack; Adam over the LoRA only;
  * released: the released code's way: a deep copy of the UNet as teacher, Adam over every UNet
              parameter, each call its own forward (bierasing.erase.released).
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


def one(mode: str) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from bierasing.adapter import install_decoupled_attention
    from bierasing.backbone import Backbone
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.erase.released import released_bi_erasing

    torch.set_num_threads(2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.x's UNet
    install_decoupled_attention(unet)
    unet.eval().requires_grad_(False)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    text = {p: torch.randn(1, 77, 768, generator=g) for p in ("", "nudity", "clothed")}

    class RandomConditioned(Backbone):
        def __init__(self):
            self.unet, self.alphas_cumprod = unet, sched.alphas_cumprod.float()
            self.prediction_type, self.sample_shape = "epsilon", (4, 8, 8)

        def encode_text(self, prompts):
            return torch.cat([text[p] for p in prompts])

        def encode_images(self, images):
            return torch.randn(images.shape[0], 4, 768, generator=torch.Generator().manual_seed(1))

        can_encode_images = False  # no VAE: the adversarial attack uses the x_t cache's samples

        def to_x(self, images):
            raise NotImplementedError

        def from_x(self, x0):
            raise NotImplementedError

    bb = RandomConditioned()
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    concept = Concept("nudity", "clothed", imgs, imgs)
    params = sum(p.numel() for p in unet.parameters())
    base_rss, base_peak = current_rss_mb(), rss_mb()
    t0 = time.time()
    if mode == "engine":
        cfg = EraseConfig(steps=1, batch_size=1, cache_size=1, xt_steps=2, seed=0)
        res = Eraser(bb, [concept], cfg).run()
        trained = res.adapters.num_parameters()
        copies = 1
    else:
        out = released_bi_erasing(bb, concept, steps=1, lr=1e-5, ddim_steps=2)
        trained, copies = out["trained_parameters"], 2
    return {"mode": mode, "unet_parameters": params, "unet_fp32_mb": round(params * 4 / 2**20, 1),
            "unet_copies": copies, "trained_parameters": trained, "resolution": 64,
            "rss_after_load_mb": round(base_rss, 1), "peak_rss_mb": round(rss_mb(), 1),
            "peak_increase_over_loaded_model_mb": round(rss_mb() - max(base_rss, 0.0), 1),
            "step_seconds": round(time.time() - t0, 1), "peak_before_step_mb": round(base_peak, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(one(args.single)))
        return 0
    from bierasing.io import atomic_write_text

    rows = []
    for mode in ("engine", "released"):
        out = subprocess.run([sys.executable, __file__, "--single", mode], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "memory_sd15.json", json.dumps(rows, indent=2))
    e, r = rows
    lines = ["# One training step on a full-size random SD1.5 UNet (64x64, CPU fp32)", "",
             "| way | UNet copies | trained params | RSS with model loaded (MB) | peak RSS (MB) | peak increase (MB) | step s |",
             "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['mode']} | {x['unet_copies']} | {x['trained_parameters']:,} | {x['rss_after_load_mb']} | "
                     f"{x['peak_rss_mb']} | {x['peak_increase_over_loaded_model_mb']} | {x['step_seconds']} |")
    lines += ["", f"UNet: {e['unet_parameters']:,} parameters = {e['unet_fp32_mb']} MB in fp32. "
              f"Peak RSS, engine / released: {e['peak_rss_mb'] / r['peak_rss_mb']:.2f}.", ""]
    atomic_write_text(RESULTS / "memory_sd15.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
