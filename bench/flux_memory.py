"""FLUX.1 training memory on paper, from one full-width block of each kind measured here.

    python bench/flux_memory.py            # writes bench/results/flux_memory.{json,md}

One diffusers ``FluxTransformerBlock`` (double-stream) and one ``FluxSingleTransformerBlock`` at
FLUX.1's width (3072, 24 heads x 128, MLP 12288), random bf16 weights on the CPU, with bierasing's
rank-4 LoRA (fp32) on the default trainable set's layers in that block. For each block and sequence
(512 px = 1024 image tokens, 1024 px = 4096; 256 T5 tokens, + 729 Redux tokens on an image row) it
measures, in one forward with gradients and its backward:

* the bytes autograd saves for the backward, weights excluded (``saved_tensors_hooks``, each storage
  once) - what a training row holds per block until its backward, on any device;
* parameters of the block and of its adapters; CPU seconds (informational: 2 cores, bf16).

The estimate then scales to FLUX.1's 19 + 38 blocks: weights (bf16, or fp8-stored as ComfyUI's
fp8 checkpoints are, 1 byte per weight, the adapters attached by hooks on top), the adapters with
their gradients and Adam state in fp32, and the activations of the one row with gradients the engine
runs per call on a model this size (``micro_batch`` auto: teacher rows run without gradients and hold
one block's transient at a time). Not measured here and stated as assumptions: the CUDA context and
allocator slack (1.5 GB); the text encoders are off the GPU during training (``FluxBackbone`` encodes
each prompt once, the encoders waiting on the CPU); the image branch and VAE stay on it in the
weights' dtype (SigLIP so400m 428 M + Redux 64.5 M + VAE 83.8 M parameters).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOUBLE, SINGLE = 19, 38  # FLUX.1 dev / schnell
FLUX_PARAMS = 11_901_408_320  # FLUX.1 transformer (docs/flux.md: counted from the BFL layout)
CUDA_OVERHEAD_GB = 1.5
RESIDENT_PARAMS = 428_000_000 + 64_500_000 + 83_800_000  # SigLIP so400m, Redux, VAE


def saved_bytes(fn, weights: nn.Module) -> tuple[int, object]:
    """Bytes of the tensors autograd saves while ``fn`` runs, each storage once, the storages of
    ``weights``' parameters excluded (a Linear saves its weight for the input's gradient)."""
    seen: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in weights.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(kind: str, image_tokens: int, text_tokens: int, rank: int) -> dict:
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from bierasing.erase.adapters import attach
    from bierasing.flux import TRAINABLE_RULES

    torch.manual_seed(0)
    holder = nn.Module()
    if kind == "double":
        holder.transformer_blocks = nn.ModuleList([FluxTransformerBlock(3072, 24, 128)])
        block = holder.transformer_blocks[0]
    else:
        holder.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(3072, 24, 128)])
        block = holder.single_transformer_blocks[0]
    holder.to(torch.bfloat16).requires_grad_(False)
    block_params = sum(p.numel() for p in holder.parameters())
    adapters = None
    if kind == "double":  # the default set ("attn2") has no layer in a single-stream block
        adapters = attach(holder, "attn2", rank, rules=TRAINABLE_RULES)
    ids = torch.zeros(text_tokens + image_tokens, 3)
    side = int(image_tokens ** 0.5)
    ids[text_tokens:, 1] = torch.arange(side).repeat_interleave(side).float()
    ids[text_tokens:, 2] = torch.arange(side).repeat(side).float()
    rotary = tuple(r.to(torch.bfloat16) for r in FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids))
    hidden = torch.randn(1, image_tokens, 3072, dtype=torch.bfloat16, requires_grad=True)
    context = torch.randn(1, text_tokens, 3072, dtype=torch.bfloat16, requires_grad=True)
    temb = torch.randn(1, 3072, dtype=torch.bfloat16)

    t0 = time.time()
    nbytes, out = saved_bytes(lambda: block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                            image_rotary_emb=rotary), holder)
    t1 = time.time()
    enc_out, img_out = out
    (enc_out.float().square().mean() + img_out.float().square().mean()).backward()
    t2 = time.time()
    trained = adapters.num_parameters() if adapters is not None else 0
    return {"block": kind, "image_tokens": image_tokens, "text_tokens": text_tokens,
            "block_params": block_params, "adapter_params": trained, "saved_mb": round(nbytes / 2**20, 1),
            "forward_s": round(t1 - t0, 2), "backward_s": round(t2 - t1, 2)}


def estimate(rows: list[dict], image_tokens: int, text_tokens: int) -> dict:
    by = {r["block"]: r for r in rows if r["image_tokens"] == image_tokens and r["text_tokens"] == text_tokens}
    act_gb = (DOUBLE * by["double"]["saved_mb"] + SINGLE * by["single"]["saved_mb"]) / 1024
    adapters = DOUBLE * by["double"]["adapter_params"]
    adapter_gb = adapters * 16 / 2**30  # fp32 weight + gradient + two Adam moments
    out = {"image_tokens": image_tokens, "text_tokens": text_tokens, "activations_gb": round(act_gb, 2),
           "adapter_params": adapters, "adapter_state_gb": round(adapter_gb, 3)}
    resident_gb = RESIDENT_PARAMS * 2 / 2**30  # bf16
    out["image_branch_and_vae_gb"] = round(resident_gb, 2)
    for name, bytes_per_weight in (("bf16", 2), ("fp8", 1)):
        weights = FLUX_PARAMS * bytes_per_weight / 2**30
        out[f"weights_{name}_gb"] = round(weights, 2)
        out[f"total_{name}_gb"] = round(weights + act_gb + adapter_gb + resident_gb + CUDA_OVERHEAD_GB, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(1024, 256), (1024, 256 + 729), (4096, 256)]
    rows = []
    for image_tokens, text_tokens in cases:
        for kind in ("double", "single"):
            rows.append(measure(kind, image_tokens, text_tokens, args.rank))
            print(json.dumps(rows[-1]), flush=True)
    estimates = [estimate(rows, i, t) for i, t in cases]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flux_memory.json").write_text(json.dumps({"rows": rows, "estimates": estimates,
                                                          "rank": args.rank}, indent=1) + "\n")
    lines = ["# FLUX.1 training memory from one measured block of each kind", "",
             "Measured on the CPU (bf16 weights, rank-4 fp32 LoRA on the default `attn2` set; autograd's saved "
             "tensors per block, weights excluded). bench/flux_memory.py has the method.", "",
             "| block | image tokens | text tokens | block params | adapter params | saved for backward (MB) "
             "| forward s | backward s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['image_tokens']} | {r['text_tokens']} | {r['block_params']:,} | "
              f"{r['adapter_params']:,} | {r['saved_mb']} | {r['forward_s']} | {r['backward_s']} |" for r in rows]
    lines += ["", f"## Scaled to FLUX.1 ({DOUBLE} double + {SINGLE} single blocks, {FLUX_PARAMS:,} parameters), "
              "one training row per call", "",
              f"CUDA context and allocator slack assumed {CUDA_OVERHEAD_GB} GB; the text encoders off the GPU "
              "during training (each prompt encoded once); SigLIP, Redux and the VAE on it in bf16.", "",
              "| image tokens | text tokens | activations GB | adapters + Adam GB | image branch + VAE GB "
              "| weights bf16 GB | total bf16 GB | weights fp8 GB | total fp8 GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {e['image_tokens']} | {e['text_tokens']} | {e['activations_gb']} | {e['adapter_state_gb']} | "
              f"{e['image_branch_and_vae_gb']} | {e['weights_bf16_gb']} | {e['total_bf16_gb']} | "
              f"{e['weights_fp8_gb']} | {e['total_fp8_gb']} |" for e in estimates]
    (RESULTS / "flux_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
