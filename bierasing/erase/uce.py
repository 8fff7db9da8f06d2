"""UCE (Gandikota et al. 2024): closed-form edit of every attn2 to_k / to_v.

For each projection W (old weights W0), with erase embeddings c_e, their guide embeddings c*_e and
preserve embeddings c_p (token level: the subject token and every token after it, aligned):

    W = (sum_e W0 c*_e c_e^T + preserve_scale sum_p W0 c_p c_p^T + lam W0)
        (sum_e c_e c_e^T + preserve_scale sum_p c_p c_p^T + lam I)^-1

The result is stored as full weight deltas (W - W0) in the same adapter/LoRA-file machinery.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from .adapters import AdapterSet

#: ridge weight lam of the solve (UCE's default): how strongly W stays at W0 off the named tokens
RIDGE = 0.1


def subject_tokens(backbone, prompts: Sequence[str], batch: int = 64) -> list[torch.Tensor]:
    """Per prompt: embeddings [n, D] from the last content token to the end of the sequence."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i:i + batch])
        emb = backbone.cross_attention_tokens(backbone.encode_text(chunk))
        # index n = the last content token (position 0 is BOS)
        out += [e[backbone.content_token_count(p):] for p, e in zip(chunk, emb)]
    return out


def uce_edit(backbone, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str] = (),
             lam: float = 0.1, preserve_scale: float = 1.0, erase_scale: float = 1.0) -> tuple[AdapterSet, float]:
    """Edit attn2 to_k/to_v in closed form; returns the (delta) adapters and the seconds taken."""
    if len(erase) != len(guide):
        raise ValueError(f"UCE needs one guide concept per erased concept ({len(erase)} vs {len(guide)})")
    t0 = time.time()
    with torch.no_grad():
        ce = subject_tokens(backbone, erase)
        cg = subject_tokens(backbone, guide)
        cp = subject_tokens(backbone, preserve) if preserve else []
        pairs = []
        for e, g in zip(ce, cg):
            n = min(len(e), len(g))
            pairs.append((e[:n], g[:n]))
        adapters = solve_kv(backbone, pairs, cp, lam, preserve_scale, erase_scale)
    return adapters, time.time() - t0


@torch.no_grad()
def solve_kv(backbone, rows: Sequence[tuple[torch.Tensor, torch.Tensor]], preserve: Sequence[torch.Tensor],
             lam: float = 0.1, preserve_scale: float = 1.0, erase_scale: float = 1.0) -> AdapterSet:
    """Full-delta adapters on every attn2 to_k / to_v with W = argmin sum ||W e - W0 g||^2 over the
    (e, g) token rows + preserve_scale sum ||W p - W0 p||^2 + lam ||W - W0||^2 (fp64 solve)."""
    if backbone.trainable_rules() is not None:
        raise ValueError("closed-form edits (uce, bi-instant) solve for cross-attention keys and values that read "
                         "the text encoder's tokens directly, as SD1.x and SDXL UNets do; this model's attention "
                         "reads them after its own blocks: use bi-erasing")
    # every term is W0 times a text-space matrix: W = W0 A B^-1 with A = lam I + G^T E + s_p P^T P and
    # B = lam I + E^T E + s_p P^T P, the same for every layer (one solve, not one per layer)
    e = torch.cat([r[0] for r in rows]).double().cpu()
    g = torch.cat([r[1] for r in rows]).double().cpu()
    eye = torch.eye(e.shape[1], dtype=torch.float64)
    shared = lam * eye
    if preserve:
        p = torch.cat(list(preserve)).double().cpu()
        shared = shared + preserve_scale * p.T @ p
    a, b = shared + erase_scale * g.T @ e, shared + erase_scale * e.T @ e
    change = torch.linalg.solve(b, a.T).T - eye  # A B^-1 - I (B symmetric)
    adapters = backbone.attach_adapters("attn2_kv", rank=0)
    for layer in adapters.layers.values():
        w0 = backbone.frozen_weight(layer.base).double()
        layer.delta.copy_((w0 @ change.to(w0.device)).to(layer.delta.dtype))
    return adapters
