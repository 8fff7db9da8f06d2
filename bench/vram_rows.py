"""Activation memory of one erasure training row on a full-size (random) SD1.5 or SDXL UNet, per dtype
and size: the numbers behind the VRAM tables in docs/memory.md.

    python bench/vram_rows.py                                   # SD1.5 -> bench/results/vram_sd15.{json,md}
    python bench/vram_rows.py --family sdxl --latents 32,64     # SDXL  -> bench/results/vram_sdxl.{json,md}

For each dtype (fp32, bf16) and latent side (64 = SD1.5's 512 px; SDXL's 1024 px is 128), in a fresh
process:
  * saved_mb: activation bytes autograd keeps for the backward of one student row (UNet with a
    rank-4 LoRA on every attn2 and the IP-Adapter image channel; counted once per storage by a
    saved-tensor hook, the model's own weights left out); on a GPU these stay resident from the
    row's forward to its backward;
  * peak_increase_mb: peak RSS of the row's forward + backward over the loaded model (CPU
    allocator, so an upper bound of what a GPU's caching allocator would add);
  * teacher_peak_increase_mb: the same for one no-grad teacher row.
micro_batch auto sends one row at a time through an SD-size UNet, so one row's activations is what
the default recipe adds to the weights. Weights are random (nothing downloaded).
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
sys.path.insert(0, str(ROOT / "bench"))

from memory_sd15 import current_rss_mb, rss_mb  # noqa: E402


def one(family: str, dtype_name: str, latent: int, grad: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from bierasing.adapter import install_decoupled_attention
    from bierasing.erase.adapters import attach
    from bierasing.sdxl import size_ids
    from bierasing.standins import sdxl_unet_config

    torch.set_num_threads(2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_unet_config("full")) if family == "sdxl" else \
        UNet2DConditionModel(cross_attention_dim=768)
    width = unet.config.cross_attention_dim
    install_decoupled_attention(unet)
    unet.to(dtype).eval().requires_grad_(False)
    adapters = attach(unet, "attn2", 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=g).to(dtype)
    text = torch.randn(1, 77, width, generator=g).to(dtype)
    tokens = torch.randn(1, 4, width, generator=g).to(dtype)
    t = torch.tensor([500])
    kw = {"encoder_hidden_states": text, "cross_attention_kwargs": {"ip_hidden_states": tokens}}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g).to(dtype),
                                   "time_ids": size_ids(8 * latent, 8 * latent)[None].to(dtype)}
    base = current_rss_mb()
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}  # resident anyway: not activations

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    t0 = time.time()
    if grad:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(x, t, **kw).sample
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None for p in adapters.parameters())
    else:
        with torch.no_grad():
            unet(x, t, **kw)
    return {"family": family, "dtype": dtype_name, "latent": latent, "resolution": 8 * latent,
            "row": "student" if grad else "teacher",
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "weights_mb": round(sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20, 1),
            "adapter_parameters": adapters.num_parameters(),
            "saved_mb": round(sum(storages.values()) / 2**20, 1) if grad else None,
            "peak_increase_mb": round(rss_mb() - base, 1), "seconds": round(time.time() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--latents", default="64", help="comma-separated latent sides")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        f, d, lat, grad = args.single.split(":")
        print(json.dumps(one(f, d, int(lat), grad == "1")))
        return 0
    from bierasing.io import atomic_write_text

    rows = []
    for lat in args.latents.split(","):
        for d in args.dtypes.split(","):
            for grad in ("1", "0"):
                out = subprocess.run([sys.executable, __file__, "--single", f"{args.family}:{d}:{lat}:{grad}"],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    name = {"sd15": "SD1.5", "sdxl": "SDXL"}[args.family]
    atomic_write_text(RESULTS / f"vram_{args.family}.json", json.dumps(rows, indent=2))
    lines = [f"# Activation memory of one training row, full-size random {name} UNet (CPU, batch 1)", "",
             "student = forward + backward with a rank-4 LoRA on attn2 and the image channel; teacher = one "
             "no-grad forward. saved = what autograd keeps for the backward; peak increase = peak RSS over the "
             "loaded model. How these become the VRAM table: docs/memory.md.", "",
             "| dtype | px | row | UNet weights (MB) | saved for backward (MB) | peak increase (MB) | s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['resolution']} | {r['row']} | {r['weights_mb']} | {r['saved_mb'] or '-'} | "
              f"{r['peak_increase_mb']} | {r['seconds']} |" for r in rows]
    atomic_write_text(RESULTS / f"vram_{args.family}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
