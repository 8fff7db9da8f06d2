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


def subject_tokens(backbone, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per prompt: embeddings [n, D] from the last content token to the end of the sequence."""
    emb = backbone.cross_attention_tokens(backbone.encode_text(list(prompts)))
    # index n = the last content token (position 0 is BOS)
    return [e[backbone.content_token_count(p):] for p, e in zip(prompts, emb)]


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
    adapters = backbone.attach_adapters("attn2_kv", rank=0)
    for layer in adapters.layers.values():
        w0 = backbone.frozen_weight(layer.base).double()
        mat1 = lam * w0
        mat2 = lam * torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device)
        for e, g in rows:
            e, g = e.double().to(w0.device), g.double().to(w0.device)
            mat1 = mat1 + erase_scale * (w0 @ g.T) @ e
            mat2 = mat2 + erase_scale * e.T @ e
        for p in preserve:
            p = p.double().to(w0.device)
            mat1 = mat1 + preserve_scale * (w0 @ p.T) @ p
            mat2 = mat2 + preserve_scale * p.T @ p
        w = torch.linalg.solve(mat2, mat1.T).T  # mat1 mat2^-1, mat2 symmetric
        layer.delta.copy_((w - w0).to(layer.delta.dtype))
    return adapters
