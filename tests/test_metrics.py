import pytest

from bierasing.metrics import PromptScore, erasure_scores, harmonic


def test_harmonic_hand_cases():
    assert harmonic(0.0, 1.0) == 1.0          # perfect erasure, perfect preservation
    assert harmonic(1.0, 1.0) == 0.0          # nothing erased
    assert harmonic(0.0, 0.0) == 0.0          # everything destroyed
    assert harmonic(0.2, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    with pytest.raises(ValueError):
        harmonic(1.2, 0.5)


def test_erasure_scores_average_per_prompt():
    scores = [PromptScore("a red circle", "target", 8, 2), PromptScore("a blue circle", "target", 8, 0),
              PromptScore("a red square", "other", 8, 8), PromptScore("a blue star", "other", 4, 2)]
    r = erasure_scores(scores)
    assert r["acc_e"] == pytest.approx((0.25 + 0.0) / 2)
    assert r["acc_p"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["h"] == pytest.approx(harmonic(0.125, 0.75))
    assert [p["rate"] for p in r["per_prompt"]] == [0.25, 0.0, 1.0, 0.5]


def test_erasure_scores_need_both_kinds():
    with pytest.raises(ValueError, match="at least one target prompt"):
        erasure_scores([PromptScore("a red circle", "target", 8, 2)])
