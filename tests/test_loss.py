"""The step's loss is one named function of named teacher predictions, checked against the
equations written out by hand on hand-made tensors (a swapped row changes the number)."""

import pytest
import torch

from bierasing.erase.objectives import STUDENT_ROWS, TEACHER_ROWS, LossWeights, erasure_loss, loss_targets


def _rows(names, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, 2, 4, 4, generator=g) for n in names}


def _reference(s, e, w, x0=None):
    """The equations, term by term, with nothing shared with the library's code."""
    def mse(a, b, wt=None):
        per = ((a - b) ** 2).flatten(1).mean(1)
        return (per * wt).mean() if wt is not None else per.mean()

    a = w.neg_anchor
    anchor = (1 - a) * e["uncond-"] + a * e["safe"]
    neg_t = anchor - w.neg_guidance * (e["concept"] - anchor)
    pos_t = e["uncond+"] + w.pos_guidance * (e["safe"] - e["uncond+"])
    adv_t = e["adv_uncond"] - w.neg_guidance * (e["adv_concept"] - e["adv_uncond"])
    return (w.neg * mse(s["neg"], neg_t, x0) + w.pos * mse(s["pos"], pos_t, x0) + w.map * mse(s["map"], pos_t, x0)
            + w.adv * mse(s["adv"], adv_t, x0) + w.keep * mse(s["keep"], e["keep"], x0))


@pytest.mark.parametrize("anchor", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("x0", [False, True])
def test_loss_matches_the_equations_for_every_row_kind(anchor, x0):
    w = LossWeights(neg=0.6, pos=0.4, map=0.3, adv=0.3, keep=1.0, neg_guidance=1.5, pos_guidance=2.0,
                    neg_anchor=anchor)
    e, s = _rows(TEACHER_ROWS, 0), _rows(STUDENT_ROWS, 1)
    weight = torch.tensor([0.5, 1.0, 2.0]) if x0 else None
    loss, parts = erasure_loss(s, loss_targets(e, w), {k: weight for k in s} if x0 else None)
    assert set(parts) == set(STUDENT_ROWS)
    ref = _reference(s, e, w, weight)
    assert torch.allclose(loss, ref, rtol=1e-6), (loss.item(), ref.item())
    assert loss.item() > 1.0  # random rows: every term contributes


@pytest.mark.parametrize("a, b", [("uncond-", "concept"), ("uncond+", "safe"), ("concept", "safe"),
                                  ("adv_uncond", "adv_concept"), ("keep", "uncond-")])
def test_a_swapped_teacher_row_changes_the_loss(a, b):
    w = LossWeights(neg=0.6, pos=0.4, map=0.3, adv=0.3, keep=1.0, neg_anchor=0.5)
    e, s = _rows(TEACHER_ROWS, 0), _rows(STUDENT_ROWS, 1)
    swapped = {**e, a: e[b], b: e[a]}
    good = erasure_loss(s, loss_targets(e, w))[0]
    bad = erasure_loss(s, loss_targets(swapped, w))[0]
    assert abs(good.item() - bad.item()) > 1e-3


def test_weights_say_which_rows_a_step_runs():
    assert LossWeights(neg=1.0).teacher_rows() == ["uncond-", "concept"]
    assert LossWeights(neg=1.0).student_rows() == ["neg"]
    both = LossWeights(neg=0.6, pos=0.4, map=0.15, adv=0.3, keep=1.0, neg_anchor=0.5)
    # eta+ = 1 (the default): the positive target is the safe prediction itself, eps*({}, I+) is not run
    assert both.teacher_rows() == ["uncond-", "concept", "safe", "adv_uncond", "adv_concept", "keep"]
    strong = LossWeights(neg=0.6, pos=0.4, pos_guidance=2.0)
    assert strong.teacher_rows() == ["uncond-", "concept", "uncond+", "safe"]
    assert both.student_rows() == ["neg", "pos", "map", "adv", "keep"]
    # the anchor alone needs the safe prediction; without the negative branch it needs nothing
    assert LossWeights(neg=1.0, neg_anchor=0.5).teacher_rows() == ["uncond-", "concept", "safe"]
    assert LossWeights(pos=1.0, neg_anchor=0.5).teacher_rows() == ["safe"]


def test_at_unit_positive_guidance_the_target_is_the_safe_prediction_without_the_uncond_row():
    w = LossWeights(neg=0.6, pos=0.4, map=0.3)
    e = _rows(TEACHER_ROWS, 0)
    targets = loss_targets({k: v for k, v in e.items() if k != "uncond+"}, w)
    assert torch.equal(targets["pos"][1], e["safe"]) and torch.equal(targets["map"][1], e["safe"])
    spelled = e["uncond+"] + 1.0 * (e["safe"] - e["uncond+"])
    assert torch.allclose(targets["pos"][1], spelled, atol=1e-6)


def test_shares_scale_a_partial_term_so_micro_batches_add_up():
    w = LossWeights(neg=0.6, pos=0.4)
    e, s = _rows(TEACHER_ROWS, 0), _rows(STUDENT_ROWS, 1)
    t = loss_targets(e, w)
    whole = erasure_loss({"neg": s["neg"]}, t)[0]
    halves = [erasure_loss({"neg": s["neg"][sl]}, {"neg": (t["neg"][0], t["neg"][1][sl])}, None,
                           {"neg": (sl.stop - sl.start) / 3})[0] for sl in (slice(0, 1), slice(1, 3))]
    assert torch.allclose(whole, halves[0] + halves[1], rtol=1e-6)
