"""bi-instant: Bi-Erasing's two branches as one closed-form edit of the cross-attention keys and values.

Every Bi-Erasing target is a linear combination of teacher predictions; at an attn2 key or value
projection W0 the same combination of the conditioning tokens gives a target for the concept's
tokens. For the concept's subject tokens c- (UCE's: the last word and every token after it), the
safe alternative's c+, the empty prompt's tokens c0 at the same positions and the negative anchor
c_a = (1 - a) c0 + a c+:

    negative branch   W0 c_a - eta (W0 c- - W0 c_a)       ESD's negative guidance, in K/V space
    positive branch   W0 c+                             the safe alternative's keys and values
    together          W0 g,  g = (lam- ((1 + eta) c_a - eta c-) + lam+ c+) / (lam- + lam+)

and UCE's solve maps c- to W0 g while holding the preserve set's tokens where they were:

    W = argmin sum ||W c- - W0 g||^2 + s_p sum ||W c_p - W0 c_p||^2 + lam ||W - W0||^2

Measured on ShapesWorld (circle, red, white; docs/method.md): pushing past the anchor breaks what
should be kept (mean H 0.921 at eta 0, 0.877 at eta 0.5; circle 0.523 at eta 1), so the instant edit's
eta is 0: the negative branch targets its anchor. ``neg_guidance`` is the trained loop's alone.
The concept in the model's suggested contexts adds rows; the suggested neighbours are the
preserve set (the trained default's ``preserve``/``contexts`` auto values). Image tokens pass
through the image branch's own projections (``to_k_ip``/``to_v_ip``), not these, so the edit is
text-side only; a trained run warm-started from it (``warm_start``) adds the image-guided branches.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .. import methods as registry
from .config import AUTO, EraseConfig
from .engine import Concept, ErasureResult, _resolve, check_text_fits, peak_rss_mb
from .uce import RIDGE, solve_kv, subject_tokens

#: the instant edit's negative guidance (see above)
ETA = 0.0
#: s_p = PRESERVE_SCALE x ``preserve_weight``: the preserve set's weight in the solve
PRESERVE_SCALE = 10.0


def guide_tokens(c_neg: torch.Tensor, c_pos: torch.Tensor | None, c_empty: torch.Tensor, cfg: EraseConfig,
                 anchor: float, eta: float = ETA) -> torch.Tensor:
    """g above for aligned token rows [n, D] (no safe alternative: the negative branch alone)."""
    c_a = c_empty if c_pos is None else (1 - anchor) * c_empty + anchor * c_pos
    neg = (1 + eta) * c_a - eta * c_neg
    if c_pos is None or cfg.pos_weight == 0:
        return neg
    return (cfg.neg_weight * neg + cfg.pos_weight * c_pos) / (cfg.neg_weight + cfg.pos_weight)


def _rows(backbone, concepts: list[Concept], cfg: EraseConfig, anchor: float
          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(c-, g) per concept, cut to the tokens both prompts have; every prompt encoded once."""
    targets = subject_tokens(backbone, [c.target for c in concepts])
    safe_texts = sorted({c.safe for c in concepts if c.safe.strip()})
    safes = dict(zip(safe_texts, subject_tokens(backbone, safe_texts))) if safe_texts else {}
    empty = backbone.cross_attention_tokens(backbone.encode_text([""]))[0]
    rows = []
    for c, e in zip(concepts, targets):
        c0 = empty[backbone.content_token_count(c.target):]  # c-'s positions in the empty prompt
        pos = safes.get(c.safe)
        n = min(len(e), len(c0), len(pos) if pos is not None else len(e))
        a = anchor if pos is not None else 0.0
        rows.append((e[:n], guide_tokens(e[:n], None if pos is None else pos[:n], c0[:n], cfg, a)))
    return rows


def instant_config(cfg: EraseConfig | None = None) -> EraseConfig:
    """``cfg``'s shared settings (preserve, contexts, branch weights, anchor) as a bi-instant run."""
    if cfg is None:
        return EraseConfig(method="bi-instant")
    keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EraseConfig)
            if f.name in ("preserve", "preserve_weight", "contexts", "neg_weight", "pos_weight", "save_precision",
                          "seed")}
    if cfg.method != "bi-instant" and cfg.neg_anchor >= 0:  # a trained run's explicit anchor carries over
        keep["neg_anchor"] = cfg.neg_anchor
    return EraseConfig(method="bi-instant", **keep)


def instant_erasure(backbone, concepts: list[Concept], cfg: EraseConfig | None = None,
                    lam: float = RIDGE) -> ErasureResult:
    """The closed-form edit for ``concepts`` (text only; exemplar images are ignored). Its
    full-delta adapters stay attached to ``backbone.unet``, as a trained run's do."""
    cfg = cfg or EraseConfig(method="bi-instant")
    if registry.get(cfg.method).trained:
        raise ValueError(f"instant_erasure runs the closed-form method bi-instant, not {cfg.method!r}; "
                         "use instant_config(cfg) for a trained run's settings")
    if not concepts:
        raise ValueError("give at least one concept to erase")
    t0 = time.time()
    cfg, concepts, _ = _resolve(backbone, cfg, concepts)
    anchor = 0.0 if cfg.neg_anchor == AUTO else cfg.neg_anchor
    for c in concepts:
        check_text_fits(backbone, c.target, "concept to erase")
        check_text_fits(backbone, c.safe, "safe alternative")
    preserve = cfg.preserved()
    targets = {c.target.strip().lower() for c in concepts}
    clash = [p for p in preserve if p.lower() in targets]
    if clash:
        raise ValueError(f"{clash[0]!r} is both erased and preserved; remove it from preserve")
    with torch.no_grad():
        rows = _rows(backbone, concepts, cfg, anchor)
        held = subject_tokens(backbone, preserve) if preserve else []
        adapters = solve_kv(backbone, rows, held, lam=lam, preserve_scale=PRESERVE_SCALE * cfg.preserve_weight)
    anchors = [anchor if c.safe.strip() else 0.0 for c in concepts]
    return ErasureResult(adapters, cfg, [(c.target, c.safe) for c in concepts], seconds=time.time() - t0,
                         peak_rss_mb=peak_rss_mb(), neg_anchors=anchors)


def instant_tensors(backbone, concepts: list[Concept], cfg: EraseConfig,
                    rename: dict[str, str] | None = None) -> tuple[dict, dict]:
    """The bi-instant edit with ``cfg``'s shared settings (:func:`instant_config`), as the (tensors,
    info) of an erasure file; nothing stays attached (a warm start merges it first)."""
    from .export import erasure_tensors

    res = instant_erasure(backbone, [Concept(c.target, c.safe) for c in concepts], instant_config(cfg))
    try:
        return erasure_tensors(res.adapters, rename), res.info()
    finally:
        res.adapters.remove(backbone.unet)
