"""Does the model draw a concept unprompted? A measurement for choosing the negative anchor.

Negative guidance pushes the concept's prediction away from eps(c) - eps(anchor). Around the empty
prompt (ESD's anchor) that difference is what naming the concept adds; for a concept the model
draws anyway (ShapesWorld's gray, the data's mean colour) it is close to nothing, and the push has
nowhere to go. This measures it where a sample's layout and colour are decided, at the top of the
noise schedule on pure noise:

    q = E|eps(x_T, c) - eps(x_T, {})|^2 / E|eps(x_T, c+) - eps(x_T, {})|^2

how much naming the concept moves the prediction, relative to naming the safe alternative.
"""

from __future__ import annotations

import torch

#: timesteps measured: the top this share of the schedule
TOP_SHARE = 0.05


@torch.no_grad()
def unprompted_ratio(backbone, target: str, safe: str, samples: int = 32, seed: int = 0,
                     batch: int = 16) -> float:
    """q above (small: the model draws ``target`` unprompted, relative to ``safe``), text only."""
    if not safe.strip():
        raise ValueError(f"the unprompted ratio of {target!r} compares it with a safe alternative; give one")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    g = torch.Generator().manual_seed(seed)
    T = backbone.num_train_timesteps
    texts = backbone.encode_text(["", backbone.concept_text(target), backbone.concept_text(safe)])
    moved = {"target": 0.0, "safe": 0.0}
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        x = torch.randn((n, *backbone.sample_shape), generator=g).to(backbone.device)
        t = torch.randint(int(T * (1 - TOP_SHARE)), T, (n,), generator=g).to(backbone.device)
        eps = [backbone.predict_noise(x, t, c.expand(n, *c.shape)).float() for c in texts]
        moved["target"] += (eps[1] - eps[0]).pow(2).flatten(1).sum(1).sum().item()
        moved["safe"] += (eps[2] - eps[0]).pow(2).flatten(1).sum(1).sum().item()
    return moved["target"] / max(moved["safe"], 1e-12)


#: the anchor share a concept gets wherever naming it moves the prediction at least as much as
#: naming its safe alternative does (the fixed default of 2026-11-25 .. 12-05)
ANCHOR_FLOOR = 0.5


def anchor_from_ratio(q: float) -> float:
    """The negative anchor's share a of the safe prediction for unprompted ratio ``q``.

    The push is along d - a d+ (d = eps(c) - eps({}), d+ = eps(c+) - eps({})); with d orthogonal to
    d+ its length reaches |d+| at a = sqrt(1 - q). Floored at :data:`ANCHOR_FLOOR`; 1 where q = 0."""
    return round(max(ANCHOR_FLOOR, min(1.0, max(0.0, 1.0 - q) ** 0.5)), 3)


def measured_anchors(backbone, pairs: list[tuple[str, str]], samples: int = 64, seed: int = 0
                     ) -> list[tuple[float, float | None]]:
    """(anchor share, q) per (target, safe) pair: :func:`anchor_from_ratio` of its
    :func:`unprompted_ratio`; a pair without a safe alternative gets (0, None), the empty-prompt
    anchor (ESD), since there is nothing else to anchor on."""
    out = []
    for target, safe in pairs:
        if not safe.strip():
            out.append((0.0, None))
            continue
        q = unprompted_ratio(backbone, target, safe, samples=samples, seed=seed)
        out.append((anchor_from_ratio(q), round(q, 4)))
    return out
