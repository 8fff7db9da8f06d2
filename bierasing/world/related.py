"""What an erasure of a ShapesWorld concept should hold and where else it should erase it.

Preserve prompts and context pairs are drawn from the world's vocabulary and never include a
prompt that :func:`~bierasing.world.evaluate.measure_erasure` samples (canonical or synonym), so
training on them cannot inflate the ACC_p it reports: they are the training split of the prompts.
"""

from __future__ import annotations

from . import data
from .prompts import erasure_prompts


def evaluated_prompts(target: str) -> set[str]:
    """Every prompt the evaluation of ``target`` samples, canonical and synonym."""
    return {p for k in range(3) for p, _, _ in erasure_prompts(target, synonym=k)}


def axis_preserve(target: str) -> list[str]:
    """The other concepts on the target's axis, each named alone ("a square", "something blue")."""
    return [data.concept_prompt(c) for c in data.AXES[data.axis_of(target)] if c != target]


def context_preserve(target: str) -> list[str]:
    """:func:`axis_preserve` plus each other concept of the axis *in context* (the other axes named),
    in contexts that the evaluation of ``target`` never samples."""
    axis = data.axis_of(target)
    evaluated = evaluated_prompts(target)
    held = []
    for s in data.SHAPES:
        for c in data.COLORS:
            for b in (data.BACKGROUNDS if axis == "background" else (None,)):
                mine = {"shape": s, "color": c, "background": b}[axis]
                p = data.prompt(s, c, b)
                if mine != target and p not in evaluated:
                    held.append(p)
    if axis == "background":  # 5 x 5 x 2 is too many: keep each shape once per background
        held = [p for i, p in enumerate(held) if i % 5 == 0]
    return axis_preserve(target) + held


def _contexts(target: str, n: int) -> list[dict]:
    """Up to ``n`` contexts (the other axes' concepts) in which naming ``target`` is not an evaluation prompt."""
    axis = data.axis_of(target)
    evaluated = evaluated_prompts(target)
    out = []
    for k in range(len(data.SHAPES)):
        ctx = {"shape": data.SHAPES[k], "color": data.COLORS[(k + 1) % len(data.COLORS)],
               "background": data.BACKGROUNDS[k % len(data.BACKGROUNDS)]}
        if data.prompt(**{**ctx, axis: target}) not in evaluated and len(out) < n:
            out.append(ctx)
    return out


def context_pairs(target: str, safe: str, n: int = 4) -> list[tuple[str, str]]:
    """Up to ``n`` (target prompt, safe prompt) pairs naming both concepts in the same context
    ("a red square on a white background" -> "a green square on a white background"), none of
    them an evaluation prompt. ``safe`` must be on the target's axis."""
    axis = data.axis_of(target)
    if data.axis_of(safe) != axis:
        raise ValueError(f"{safe!r} is not on the {axis} axis of {target!r}; no shared context exists")
    return [tuple(data.prompt(**{**ctx, axis: c}) for c in (target, safe)) for ctx in _contexts(target, n)]


def context_neighbours(target: str, safe: str, n: int = 4) -> list[str]:
    """The target axis's other concepts in each context of :func:`context_pairs` ("a yellow triangle on
    a black background" beside "a yellow star on a black background" -> "a yellow circle ..."), none
    of them an evaluation prompt. Erasing the target in a context moves its neighbours in that context
    unless they are held: without them, erasing star in yellow and green contexts drew yellow and green
    triangles as crosses."""
    axis = data.axis_of(target)
    evaluated = evaluated_prompts(target)
    out = []
    for ctx in _contexts(target, n):
        for c in data.AXES[axis]:
            p = data.prompt(**{**ctx, axis: c})
            if c not in (target, safe) and p not in evaluated and p not in out:
                out.append(p)
    return out


def concept_named(text: str) -> str | None:
    """The world concept a prompt names alone ("circle" or its canonical prompt "a circle"), else None."""
    t = text.strip().lower()
    if data.is_concept(t):
        return t
    return next((c for axis in data.AXES.values() for c in axis if data.concept_prompt(c) == t), None)


def suggest(pairs: list[tuple[str, str]], n_contexts: int) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """Preserve prompts for all erased concepts together, and each pair's context pairs.

    With contexts, the preserve set also holds the target axis's other concepts in those contexts.
    Pairs whose target is not a world concept get no contexts; a preserve prompt that names any
    erased concept is dropped (erasing "circle" and "red" together must not hold "a red square")."""
    targets = [concept_named(t) for t, _ in pairs]
    erased = {c for c in targets if c}
    keep: list[str] = []

    def hold(prompts: list[str]) -> None:
        keep.extend(p for p in prompts if p not in keep and not erased & set(p.split()))

    for c in targets:
        if c:
            hold(context_preserve(c))
    contexts = []
    for c, (_, safe) in zip(targets, pairs):
        s = concept_named(safe) if safe else None
        ok = c and s and data.axis_of(s) == data.axis_of(c) and n_contexts > 0
        contexts.append(context_pairs(c, s, n_contexts) if ok else [])
        if ok:
            hold(context_neighbours(c, s, n_contexts))
    return keep, contexts


def world_vocabulary(target: str):
    """The world's concepts as :mod:`bierasing.related` vocabulary: every concept word, the
    target's contexts as templates ("a red {} on a black background"), never an evaluation prompt.
    ``target`` may be a concept word or its prompt ("circle", "a circle")."""
    from ..related import Vocabulary

    words = tuple(c for axis in data.AXES.values() for c in axis)
    names = tuple((data.concept_prompt(c), c) for c in words)
    concept = concept_named(target)
    if concept is None:
        return Vocabulary(words, (), frozenset(), slot_names=names)
    axis = data.axis_of(concept)
    word = data.AXIS_WORDS[axis][concept][0]
    templates = tuple(data.prompt(**{**ctx, axis: concept}).replace(word, "{}")
                      for ctx in _contexts(concept, len(data.SHAPES)))
    return Vocabulary(words, templates, frozenset(evaluated_prompts(concept)), frozenset(data.AXES[axis]), names)
