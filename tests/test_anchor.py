"""The unprompted ratio (bierasing.erase.anchor): how much naming a concept moves the top-of-schedule
prediction, relative to naming its safe alternative. Measured on the shipped world."""

import pytest

from bierasing.erase.anchor import unprompted_ratio
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
