"""Erasures trained one concept at a time, merged into one with their key/value edits fused.

Summing the erasures' deltas (:func:`bierasing.erase.stack.stack`) lets each one's edit of a
cross-attention key or value act on every other concept's words too. Fusing them instead (MACE's
closed-form fusion, Lu et al. 2024) solves, per attn2 ``to_k``/``to_v``, for the one weight that gives
each erasure's concept tokens E_i what that erasure alone gives them and leaves the preserved words
where the model had them:

    W = argmin sum_i ||W E_i - W_i E_i||^2 + s_p ||W P - W0 P||^2 + lam ||W - W0||^2,  W_i = W0 + dW_i

E_i are the subject tokens of erasure i's concepts and contexts (from its metadata), P the preserved
prompts of all of them. Layers that do not read the text (``to_q``, ``to_out``) keep the sum.
"""

from __future__ import annotations

import os
import time

import torch

from .. import __version__
from .export import SAVE_DTYPES, kohya_name, read_erasure
from .stack import DIFF, _delta, _layers, stack
from .uce import RIDGE, subject_tokens

#: what happens to the layers that are not cross-attention keys or values
OTHERS = ("sum", "mean", "drop")


def _concept_texts(info: dict) -> list[str]:
    records = info.get("stack", [info])
    return [c["target"] for r in records for c in r.get("concepts", [])]


def _preserved(info: dict) -> list[str]:
    records = info.get("stack", [info])
    return [p.strip() for r in records for p in r.get("config", {}).get("preserve", "").split(",") if p.strip()]


@torch.no_grad()
def merge_kv(backbone, sources: list[str | os.PathLike | tuple[dict, dict]], lam: float = RIDGE,
             preserve_scale: float = 1.0, precision: str = "fp32", others: str = "sum"
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """One erasure from per-concept ``sources`` (files or (tensors, info)): the keys and values fused
    as above; every other layer summed (``others`` "sum"), averaged ("mean") or left out ("drop").
    Returns (tensors in ``precision``, metadata)."""
    if len(sources) < 2:
        raise ValueError("merging needs at least two erasures")
    if others not in OTHERS:
        raise ValueError(f"others must be one of {', '.join(OTHERS)}, got {others!r}")
    t0 = time.time()
    loaded = [s if isinstance(s, tuple) else read_erasure(s) for s in sources]
    texts = [_concept_texts(info) for _, info in loaded]
    if not all(texts):
        raise ValueError("every erasure to merge must name its concepts in its metadata (files written by "
                         "bierasing do); stack erasures without it instead")
    erased = {t.lower() for ts in texts for t in ts}
    keep = sorted({p for _, info in loaded for p in _preserved(info) if p.lower() not in erased})
    scale = 1.0 / len(sources) if others == "mean" else 1.0
    # the sum (or mean); its k/v layers are replaced below
    tensors, info = stack(list(sources), scales=[scale] * len(sources), precision="fp32")
    rows = [torch.cat(subject_tokens(backbone, ts)).double() for ts in texts]
    held = torch.cat(subject_tokens(backbone, keep)).double() if keep else None
    per_erasure = [_layers(t) for t, _ in loaded]
    names = backbone.module_name_map() or {}
    adapters = backbone.attach_adapters("attn2_kv", rank=0)
    fused: set[str] = set()
    try:
        for own, layer in adapters.layers.items():
            key = kohya_name(names.get(own, own))
            parts = [p[key] for p in per_erasure if key in p]
            if not parts:
                continue
            w0 = backbone.frozen_weight(layer.base).double()
            dev = w0.device
            mat1 = lam * w0
            mat2 = lam * torch.eye(w0.shape[1], dtype=torch.float64, device=dev)
            for e, layer_parts in zip(rows, per_erasure):
                e = e.to(dev)
                wi = w0 + _delta(layer_parts[key]).double().to(dev) if key in layer_parts else w0
                mat1 = mat1 + (wi @ e.T) @ e
                mat2 = mat2 + e.T @ e
            if held is not None:
                p = held.to(dev)
                mat1 = mat1 + preserve_scale * (w0 @ p.T) @ p
                mat2 = mat2 + preserve_scale * p.T @ p
            w = torch.linalg.solve(mat2, mat1.T).T
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                tensors.pop(key + suffix, None)
            tensors[key + DIFF] = (w - w0).float().cpu()
            fused.add(key)
    finally:
        adapters.remove(backbone.unet)
    if others == "drop":
        tensors = {k: v for k, v in tensors.items() if k.endswith(DIFF) and k[:-len(DIFF)] in fused}
    dt = SAVE_DTYPES[precision]
    info = {**info, "library": f"bierasing {__version__}", "method": "merge-kv", "preserve": keep,
            "ridge": lam, "other_layers": others, "merge_seconds": round(time.time() - t0, 2)}
    return {k: v if k.endswith(".alpha") else v.to(dt) for k, v in tensors.items()}, info
