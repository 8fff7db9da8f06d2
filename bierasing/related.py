"""Related concepts from the model itself: what an erasure should hold, and where else to erase.

A phrase's place in a model is what it changes in the text conditioning the denoiser reads: its
token states minus the empty prompt's, flattened (every backbone's ``encode_text``, so SD1.5, SDXL,
flow transformers and ShapesWorld alike). The vocabulary phrases nearest the target by cosine are
the concepts an erasure is most likely to drag along, so they are held unchanged (the preserve
set); phrases almost identical to it (cosine >= ``same_above``) read as its synonyms and are left
to be erased with it. Contexts put the target and its safe alternative into the same templates
("a photo of {}"), and each context also holds the target's nearest neighbours in it: erasing a
concept in a context drags its neighbours in that context unless they are held (ShapesWorld's
shape "ladder").

Deterministic: no sampling, only the model's text encoder; ties keep the vocabulary's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch

#: phrases closer than this to the target are its synonyms: erased with it, never held
SAME_ABOVE = 0.95
#: nearest phrases held alone, and in each context (of those that fit its slot)
HOLD, HOLD_IN_CONTEXT = 8, 3


@dataclass(frozen=True)
class Vocabulary:
    """Candidate phrases and context templates ({} = the concept)."""

    phrases: tuple[str, ...]
    contexts: tuple[str, ...]
    #: prompts never suggested (ShapesWorld: its evaluation prompts, so holding cannot inflate ACC_p)
    never: frozenset[str] = frozenset()
    #: the phrases that fit a template's slot (None: every phrase; ShapesWorld: the target's axis)
    slot: frozenset[str] | None = None
    #: a concept as the templates take it, by how it may be written (ShapesWorld: "a circle" ->
    #: "circle"); a concept not listed goes in as written
    slot_names: tuple[tuple[str, str], ...] = ()

    def fill(self, template: str, concept: str) -> str:
        """``template`` with ``concept`` in its slot."""
        return template.format(dict(self.slot_names).get(concept.strip().lower(), concept))

    def __post_init__(self):
        bad = [c for c in self.contexts if c.count("{}") != 1]
        if bad:
            raise ValueError(f"context templates need exactly one {{}} for the concept, got {bad}")
        if not self.phrases:
            raise ValueError("a vocabulary needs at least one phrase")


def shipped_vocabulary() -> Vocabulary:
    """``bierasing/vocabulary/general.json``: 350 objects, animals, people, styles, artists' names,
    colours, places, body and clothing words, and 12 context templates."""
    raw = json.loads(resources.files("bierasing").joinpath("vocabulary/general.json").read_text("utf-8"))
    phrases = tuple(dict.fromkeys(p for k, v in raw.items() if k not in ("_about", "contexts") for p in v))
    return Vocabulary(phrases, tuple(raw["contexts"]))


@torch.no_grad()
def conditioning_vectors(backbone, prompts: Sequence[str], batch: int = 32,
                         cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Unit vectors [N, L*D] of what each prompt changes in the text conditioning, fp32 on the CPU.
    ``cache`` (prompt -> vector, this backbone only) is read and filled: ranking many concepts over
    one vocabulary encodes each phrase once."""
    cache = {} if cache is None else cache
    todo = list(dict.fromkeys(p for p in prompts if p not in cache))
    if todo:
        if "" not in cache:
            cache[""] = backbone.encode_text([""]).float().flatten(1).cpu()
        for i in range(0, len(todo), batch):
            states = backbone.encode_text(todo[i:i + batch]).float().flatten(1).cpu()
            cache.update(zip(todo[i:i + batch], torch.nn.functional.normalize(states - cache[""], dim=1)))
    return torch.stack([cache[p] for p in prompts])


_STOP = frozenset({"a", "an", "the", "of", "in", "on"})


def _content(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.lower().replace(",", " ").split() if w not in _STOP)


def names(phrase: str, concept: str) -> bool:
    """Whether ``phrase`` names ``concept``: the concept's words, in order, appear in it ("a hot dog"
    names "dog"; "manga style" does not name "anime style", though both say "style")."""
    c, p = _content(concept), _content(phrase)
    return bool(c) and any(p[i:i + len(c)] == c for i in range(len(p) - len(c) + 1))


def _overlaps(a: str, b: str) -> bool:
    return names(a, b) or names(b, a)


def nearest(backbone, concept: str, vocabulary: Vocabulary, k: int, exclude: Sequence[str] = (),
            same_above: float = SAME_ABOVE, cache: dict[str, torch.Tensor] | None = None
            ) -> list[tuple[str, float]]:
    """The ``k`` vocabulary phrases nearest ``concept`` in the model's conditioning, with cosines.

    Every phrase is read as the model reads a concept (``backbone.concept_text``). Left out:
    synonyms (cosine >= ``same_above``) and phrases that name the concept or one of ``exclude``, or
    are named by it (erasing "dog" holds neither "a hot dog" nor the safe "a cat" twice).
    ``cache``: as :func:`conditioning_vectors` takes it."""
    banned = [concept, *(e for e in exclude if e.strip())]
    candidates = [p for p in vocabulary.phrases if not any(_overlaps(p, b) for b in banned)]
    if not candidates or k <= 0:
        return []
    vecs = conditioning_vectors(backbone, [backbone.concept_text(p) for p in (concept, *candidates)], cache=cache)
    cos = (vecs[1:] @ vecs[0]).tolist()
    ranked = sorted(range(len(candidates)), key=lambda i: -cos[i])  # stable: ties keep file order
    return [(candidates[i], round(cos[i], 4)) for i in ranked if cos[i] < same_above][:k]


def related_excluded(pairs: list[tuple[str, str]], i: int) -> list[str]:
    """What pair ``i``'s neighbours must not name: the other erased targets and its own safe concept."""
    target, safe = pairs[i]
    return [t for t, _ in pairs if t != target] + [safe]


def suggest(backbone, pairs: list[tuple[str, str]], n_contexts: int, hold: int = HOLD,
            hold_in_context: int = HOLD_IN_CONTEXT,
            neighbours: list[list[tuple[str, float]]] | None = None
            ) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """The preserve prompts for all ``(target, safe)`` pairs together, and each pair's context pairs,
    over each target's ``backbone.related_vocabulary``.

    Held: each target's ``hold`` nearest phrases (as the model reads them), and in each of its
    ``n_contexts`` contexts its ``hold_in_context`` nearest of the phrases that fit the template's
    slot, however far down the ranking (ShapesWorld: erasing blue drew red squares as something
    else until red, blue's farthest colour, was held in context); never a phrase naming an erased
    target nor one the vocabulary rules out. A pair without a safe alternative gets no contexts
    (nothing to pull the target towards in them). Templates take the concepts as written.
    ``neighbours``: each pair's whole :func:`nearest` ranking, if already computed."""
    # an erased concept as a template takes it ("on a gray background" -> "gray" in ShapesWorld)
    vocabs = [backbone.related_vocabulary(t) for t, _ in pairs]
    erased = [v.fill("{}", t) for v, (t, _) in zip(vocabs, pairs)]
    keep: list[str] = []
    contexts = []
    cache: dict[str, torch.Tensor] = {}
    for i, ((target, safe), vocab) in enumerate(zip(pairs, vocabs)):
        ranked = neighbours[i] if neighbours is not None else nearest(
            backbone, target, vocab, len(vocab.phrases), related_excluded(pairs, i), cache=cache)
        near = [p for p, _ in ranked]
        templates = vocab.contexts[:max(n_contexts, 0)] if safe else ()
        pairs_in = [(vocab.fill(tpl, target), vocab.fill(tpl, safe)) for tpl in templates]
        contexts.append([pr for pr in pairs_in if not set(pr) & vocab.never])
        held = [backbone.concept_text(p) for p in near[:hold]]
        fits = [p for p in near if vocab.slot is None or p in vocab.slot][:hold_in_context]
        held += [vocab.fill(tpl, p) for tpl in templates for p in fits]
        keep.extend(p for p in held if p not in keep and p not in vocab.never and not any(names(p, e) for e in erased))
    return keep, contexts
