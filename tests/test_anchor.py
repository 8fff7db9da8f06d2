"""The unprompted ratio (bierasing.erase.anchor): how much naming a concept moves the top-of-schedule
prediction, relative to naming its safe alternative. Measured on the shipped world."""

import pytest

from bierasing.erase.anchor import ANCHOR_FLOOR, anchor_from_ratio, measured_anchors, unprompted_ratio
from bierasing.world.models import ShapesWorldBackbone


@pytest.fixture(scope="module")
def world():
    return ShapesWorldBackbone.load("shapesworld")


def test_the_world_draws_gray_and_crosses_unprompted_and_not_black_or_red(world):
    # shipped UNet world, 64 draws (2026-12-05): gray 0.151, cross 0.042; black 6.63, white 8.40,
    # red 1.21, square 0.41 - the two concepts the default erases worst are the two lowest
    q = {c: unprompted_ratio(world, c, s, samples=64) for c, s in
         (("gray", "black"), ("cross", "circle"), ("black", "gray"), ("red", "green"), ("square", "circle"))}
    assert q["gray"] < 0.25 and q["cross"] < 0.25, q
    assert q["black"] > 2 and q["red"] > 0.5 and q["square"] > 0.3, q


def test_the_ratio_is_seeded_and_validated(world):
    a = unprompted_ratio(world, "gray", "black", samples=8, seed=3)
    assert a == unprompted_ratio(world, "gray", "black", samples=8, seed=3)
    assert a != unprompted_ratio(world, "gray", "black", samples=8, seed=4)
    with pytest.raises(ValueError, match="give one"):
        unprompted_ratio(world, "gray", " ")


def test_anchor_rule_lifts_only_concepts_drawn_unprompted():
    assert anchor_from_ratio(2.4) == anchor_from_ratio(0.75) == ANCHOR_FLOOR == 0.5
    assert anchor_from_ratio(0.151) == pytest.approx(0.921, abs=1e-3)  # gray: sqrt(1 - q)
    assert anchor_from_ratio(0.0) == 1.0


def test_auto_anchor_is_measured_per_concept_and_contexts_share_it(world):
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import resolve_for_model

    cfg, concepts = resolve_for_model(world, EraseConfig(), [Concept("on a gray background", "on a black background"),
                                                             Concept("something red", "something green")])
    by_target = {c.target: c.neg_anchor for c in concepts}
    assert by_target["on a gray background"] > 0.9 and by_target["something red"] == 0.5, by_target
    contexts = concepts[2:]
    assert contexts and all(c.neg_anchor == by_target["something red" if " red " in c.target
                                                      else "on a gray background"] for c in contexts)
    assert cfg.neg_anchor == -1.0  # recorded as auto; each concept's share is in the erasure's info
    _, fixed = resolve_for_model(world, EraseConfig(neg_anchor=0.2, contexts=0),
                                 [Concept("on a gray background", "on a black background")])
    assert fixed[0].neg_anchor is None  # a given number holds for every concept
    _, given = resolve_for_model(world, EraseConfig(contexts=0),
                                 [Concept("on a gray background", "on a black background", neg_anchor=0.3)])
    assert given[0].neg_anchor == 0.3
    assert measured_anchors(world, [("on a gray background", "")]) == [(0.0, None)]  # no safe: the empty prompt
    with pytest.raises(ValueError, match=r"neg_anchor of 'x' must be in \[0, 1\]"):
        Concept("x", "y", neg_anchor=1.5)
