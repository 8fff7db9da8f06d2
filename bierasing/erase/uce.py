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

from .adapters import AdapterSet, attach


def _subject_tokens(backbone, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per prompt: embeddings [n, D] from the last content token to the end of the sequence."""
    emb = backbone.encode_text(list(prompts))
    out = []
    for p, e in zip(prompts, emb):
        n_content = _content_tokens(backbone, p)
        out.append(e[n_content:])  # index n_content = last content token (position 0 is BOS)
    return out


def _content_tokens(backbone, prompt: str) -> int:
    tok = backbone.tokenizer
    ids = tok(prompt, add_special_tokens=False).input_ids
    return len(ids)


def uce_edit(backbone, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str] = (),
             lam: float = 0.1, preserve_scale: float = 1.0, erase_scale: float = 1.0) -> tuple[AdapterSet, float]:
    """Edit attn2 to_k/to_v in closed form; returns the (delta) adapters and the seconds taken."""
    if len(erase) != len(guide):
        raise ValueError(f"UCE needs one guide concept per erased concept ({len(erase)} vs {len(guide)})")
    t0 = time.time()
    with torch.no_grad():
        ce = _subject_tokens(backbone, erase)
        cg = _subject_tokens(backbone, guide)
        cp = _subject_tokens(backbone, preserve) if preserve else []
        pairs = []
        for e, g in zip(ce, cg):
            n = min(len(e), len(g))
            pairs.append((e[:n], g[:n]))
        adapters = attach(backbone.unet, "attn2_kv", rank=0, names=backbone.module_name_map())
        for name, layer in adapters.layers.items():
            w0 = layer.base.weight.double()
            d = w0.shape[1]
            mat1 = lam * w0
            mat2 = lam * torch.eye(d, dtype=torch.float64, device=w0.device)
            for e, g in pairs:
                e, g = e.double(), g.double()
                mat1 = mat1 + erase_scale * (w0 @ g.T) @ e
                mat2 = mat2 + erase_scale * e.T @ e
            for p in cp:
                p = p.double()
                mat1 = mat1 + preserve_scale * (w0 @ p.T) @ p
                mat2 = mat2 + preserve_scale * p.T @ p
            w = mat1 @ torch.linalg.inv(mat2)
            layer.delta.copy_((w - w0).to(layer.delta.dtype))
    return adapters, time.time() - t0
