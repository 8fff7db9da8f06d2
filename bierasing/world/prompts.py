"""The prompts an erasure of a ShapesWorld concept is measured on (no model needed: both the
evaluation and the related-concept suggestions read them)."""

from __future__ import annotations

from . import data


def erasure_prompts(target: str, synonym: int = 0) -> list[tuple[str, str, data.Concepts]]:
    """(prompt, kind, wanted concepts) for a target concept; synonym=k uses the k-th synonym."""
    axis = data.axis_of(target)
    out = []
    if axis == "shape":
        for s in data.SHAPES:
            for c in data.COLORS[:3] if s != target else data.COLORS:
                out.append((data.prompt(s, c, synonym=synonym), "target" if s == target else "other",
                            data.Concepts(s, c, None)))
    elif axis == "color":
        for c in data.COLORS:
            for s in data.SHAPES[:3] if c != target else data.SHAPES:
                out.append((data.prompt(s, c, synonym=synonym), "target" if c == target else "other",
                            data.Concepts(s, c, None)))
    else:
        for b in data.BACKGROUNDS:
            for k, s in enumerate(data.SHAPES):
                c = data.COLORS[k]
                out.append((data.prompt(s, c, b, synonym=synonym), "target" if b == target else "other",
                            data.Concepts(s, c, b)))
    return out
