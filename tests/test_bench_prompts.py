"""The benchmark's context prompts (bench/erasure_bench.py) never leak evaluation prompts."""

import importlib.util
from pathlib import Path

import pytest

from bierasing.world import data
from bierasing.world.evaluate import erasure_prompts

_spec = importlib.util.spec_from_file_location("erasure_bench", Path(__file__).parents[1] / "bench" / "erasure_bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("target", ["circle", "star", "red", "blue", "white"])
def test_context_prompts_are_disjoint_from_every_evaluation_prompt(target):
    evaluated = {p for k in range(3) for p, _, _ in erasure_prompts(target, synonym=k)}
    held = bench.context_preserve(target)
    pairs = bench.context_targets(target)
    assert len(pairs) == 4 and len(held) >= 8
    assert not evaluated & set(held)
    assert not evaluated & {t for t, _ in pairs}
    axis, safe = data.axis_of(target), data.DEFAULT_SAFE[target]
    for t, s in pairs:  # the same context, target word swapped for the safe one
        assert data.AXIS_WORDS[axis][target][0] in t.split()
        assert t.replace(data.AXIS_WORDS[axis][target][0], data.AXIS_WORDS[axis][safe][0]) == s
    for p in held:  # held prompts never name the target
        assert data.AXIS_WORDS[axis][target][0] not in p.split()
