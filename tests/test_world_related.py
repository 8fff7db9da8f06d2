"""ShapesWorld's preserve / context suggestions never leak evaluation prompts, and the engine
resolves ``preserve='auto'`` / ``contexts=-1`` with them (and only for Bi-Erasing)."""

import pytest
import torch

from bierasing.erase import Concept, EraseConfig
from bierasing.erase.config import MAP_AUTO, MAP_AUTO_KEEP
from bierasing.erase.engine import Eraser, resolve_for_model
from bierasing.related import suggest as model_suggest
from bierasing.world import data, related
from bierasing.world.evaluate import erasure_prompts


@pytest.mark.parametrize("target", ["circle", "star", "red", "blue", "white"])
def test_context_prompts_are_disjoint_from_every_evaluation_prompt(target):
    evaluated = {p for k in range(3) for p, _, _ in erasure_prompts(target, synonym=k)}
    held = related.context_preserve(target)
    safe = data.DEFAULT_SAFE[target]
    pairs = related.context_pairs(target, safe)
    assert len(pairs) == 4 and len(held) >= 8
    assert not evaluated & set(held)
    assert not evaluated & {t for t, _ in pairs}
    axis = data.axis_of(target)
    for t, s in pairs:  # the same context, target word swapped for the safe one
        assert data.AXIS_WORDS[axis][target][0] in t.split()
        assert t.replace(data.AXIS_WORDS[axis][target][0], data.AXIS_WORDS[axis][safe][0]) == s
    for p in held:  # held prompts never name the target
        assert data.AXIS_WORDS[axis][target][0] not in p.split()
    near = related.context_neighbours(target, safe)
    assert near and not evaluated & set(near)
    others = {data.AXIS_WORDS[axis][c][0] for c in data.AXES[axis] if c not in (target, safe)}
    for p in near:  # another concept of the axis, in one of the erased contexts
        (word,) = others & set(p.split())
        assert any(t.replace(data.AXIS_WORDS[axis][target][0], word) == p for t, _ in pairs)


def test_suggestions_for_two_concepts_never_hold_either():
    keep, ctx = related.suggest([("a circle", "a square"), ("something red", "something green")], 4)
    assert keep and not any({"circle", "red"} & set(p.split()) for p in keep)
    assert "a square" in keep and "something blue" in keep
    assert [len(c) for c in ctx] == [4, 4]
    # a concept the world does not know, or a safe concept on another axis: no contexts
    keep2, ctx2 = related.suggest([("a dragon", "a cat"), ("a circle", "something green")], 4)
    assert ctx2 == [[], []] and keep2 == related.context_preserve("circle")
    with pytest.raises(ValueError, match="not on the shape axis"):
        related.context_pairs("circle", "green")


def _concept(neg=True):
    imgs = torch.rand(2, 3, 32, 32)
    return Concept("a circle", "a square", imgs if neg else None, imgs)


def test_engine_resolves_auto_with_the_models_suggestions(tiny_world):
    cfg = EraseConfig(steps=1)
    assert cfg.preserve == "auto" and cfg.contexts == -1 and cfg.map_target_to_safe == -1
    got, concepts = resolve_for_model(tiny_world, cfg, [_concept()])
    # the same mechanism as on every backbone (bierasing.related), over the world's words and contexts
    keep, pairs = model_suggest(tiny_world, [("a circle", "a square")], 4)
    assert got.preserved() == keep and len(keep) >= 8
    assert got.contexts == 4 and got.map_target_to_safe == MAP_AUTO_KEEP
    assert [(c.target, c.safe) for c in concepts[1:]] == pairs[0]
    assert set(pairs[0]) <= set(related.context_pairs("circle", "square", 5))  # the world's own contexts
    assert not set(keep) & related.evaluated_prompts("circle")
    assert all(c.negative_images is concepts[0].negative_images for c in concepts)
    # explicit settings win; an empty preserve gives the weaker pull
    got, concepts = resolve_for_model(tiny_world, EraseConfig(preserve="", contexts=0), [_concept()])
    assert got.preserved() == [] and len(concepts) == 1 and got.map_target_to_safe == MAP_AUTO
    got, concepts = resolve_for_model(tiny_world, EraseConfig(preserve="a star", contexts=2), [_concept()])
    assert got.preserved() == ["a star"] and len(concepts) == 3
    # the baselines as published: no preserve set, no contexts
    got, concepts = resolve_for_model(tiny_world, EraseConfig(method="esd-x"), [_concept()])
    assert got.preserved() == [] and got.contexts == 0 and len(concepts) == 1
    # the resolved config is what the run records
    er = Eraser(tiny_world, [_concept()], EraseConfig(steps=1, adversarial=0.0))
    assert er.cfg.to_dict()["preserve"] == ", ".join(keep)
    with pytest.raises(ValueError, match="resolved against a model"):
        EraseConfig().preserved()


def test_contexts_on_a_model_that_cannot_suggest_them_is_a_clear_error(tiny_world):
    with pytest.raises(ValueError, match="cannot suggest contexts"):
        resolve_for_model(tiny_world, EraseConfig(contexts=2), [Concept("a dragon", "a cat", torch.rand(1, 3, 32, 32),
                                                                   torch.rand(1, 3, 32, 32))])
    got, concepts = resolve_for_model(tiny_world, EraseConfig(), [Concept("a dragon", "a cat")])
    # a phrase outside the world's words: its nearest world concepts are held, no contexts
    assert len(got.preserved()) == 8 and got.contexts == 0 and len(concepts) == 1
