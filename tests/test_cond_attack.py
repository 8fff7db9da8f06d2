"""The conditioning-space attack (bierasing.cond_attack), adversarial erasure training and
``bierasing eval --attack``."""

import json

import pytest
import torch

from bierasing.world import attack
from bierasing.cond_attack import AttackConfig, attack_conditioning
from bierasing.erase import Concept, EraseConfig, ErasureInterrupted
from bierasing.erase.engine import Eraser
from bierasing.world import data


@pytest.fixture(scope="module")
def red_images(world):
    import numpy as np

    return world.to_x(attack._target_images("red", 16, np.random.default_rng(0)))


def test_attack_lowers_loss_within_budget_and_keeps_bos(world, red_images):
    base = world.encode_text(["a thing"])  # neutral start: the attack has to find "red" itself
    flags = [p.requires_grad for p in world.unet.parameters()]
    calls = []
    a = attack_conditioning(world, red_images, base, steps=15, budget=0.5, seed=0,
                            callback=lambda i, n: calls.append((i, n)))
    # measured 0.000932 -> 0.000779, the loss of "something red" itself (0.000773)
    assert a.final_loss < 0.9 * a.initial_loss
    assert a.relative_size() <= 0.5 + 1e-5
    assert torch.equal(a.delta[0, 0], torch.zeros_like(a.delta[0, 0]))  # BOS never moves
    assert torch.equal(a.base, base)
    assert calls[-1] == (15, 15) and len(a.losses) == 15
    assert [p.requires_grad for p in world.unet.parameters()] == flags
    assert all(p.grad is None for p in world.unet.parameters())


def test_attack_is_seeded_and_budget_zero_is_no_attack(world, red_images):
    base = world.encode_text([data.concept_prompt("red")])
    kw = dict(steps=3, batch=2, eval_batch=2)
    a = attack_conditioning(world, red_images, base, seed=1, **kw)
    b = attack_conditioning(world, red_images, base, seed=1, **kw)
    c = attack_conditioning(world, red_images, base, seed=2, **kw)
    assert torch.equal(a.delta, b.delta) and a.losses == b.losses
    assert not torch.equal(a.delta, c.delta)
    z = attack_conditioning(world, red_images, base, seed=1, budget=0.0, **kw)
    assert float(z.delta.abs().max()) == 0.0


def test_attack_stops_when_asked(world, red_images):
    base = world.encode_text([data.concept_prompt("red")])
    a = attack_conditioning(world, red_images, base, steps=50, batch=2, eval_batch=2,
                            should_stop=lambda: True)
    assert a.losses == [] and a.config["steps_done"] == 0


def test_attack_config_and_argument_errors(world, red_images):
    with pytest.raises(ValueError, match="budget must be in"):
        AttackConfig(budget=-1.0)
    with pytest.raises(ValueError, match="steps must be in"):
        AttackConfig(steps=0)
    assert AttackConfig().to_kwargs()["batch"] == 4
    with pytest.raises(ValueError, match=r"\[1, L, D\]"):
        attack_conditioning(world, red_images, world.encode_text(["a", "b"]), steps=1)
    with pytest.raises(ValueError, match="at least one image"):
        attack_conditioning(world, red_images[:0], world.encode_text(["a"]), steps=1)


def test_embedding_attack_regenerates_red_on_untouched_model(world):
    """The untouched model draws red for 'something red' anyway: the attack must not break that."""
    a = attack.embedding_attack(world, "red", steps=10, seed=0)
    asr = attack.attack_success(world, "red", a.cond(), samples=8, seed=0)
    assert asr >= 0.75


# ---- adversarial erasure training --------------------------------------------------------------

def _images(seed, n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    base = dict(steps=6, batch_size=2, cache_size=4, xt_steps=5, adversarial=1.0, adversarial_every=2,
                adversarial_steps=2, preserve="", contexts=0)
    base.update(kw)
    return EraseConfig(**base)


def _concept():
    return Concept("a circle", "a square", _images(1), _images(2))


def test_adversarial_rows_train_and_are_reported(tiny_world):
    res = Eraser(tiny_world, [_concept()], _cfg()).run()
    res.adapters.remove(tiny_world.unet)
    assert all("adv" in h and h["adv"] > 0 for h in res.history)
    assert [r["step"] for r in res.adversarial] == [0, 2, 4]
    assert res.info()["adversarial_refreshes"] == 3
    plain = Eraser(tiny_world, [_concept()], _cfg(adversarial=0.0)).run()
    plain.adapters.remove(tiny_world.unet)
    assert "adv" not in plain.history[-1] and "adversarial_refreshes" not in plain.info()
    # per step 2 teacher + 1 student (x3) rows of batch 2 = 10 more, plus 3 attacks of 2 steps: 3 * 2 * (3 * 2 + 2)
    assert res.forward_rows - plain.forward_rows == 6 * 10 + 3 * 2 * (3 * 2 + 2)


def test_adversarial_esd_x_uses_trajectory_states(tiny_world):
    res = Eraser(tiny_world, [Concept("a circle")], _cfg(method="esd-x")).run()
    res.adapters.remove(tiny_world.unet)
    assert len(res.adversarial) == 3 and "adv" in res.history[-1]
    with pytest.raises(ValueError, match="adversarial training attacks with images"):
        Eraser(tiny_world, [Concept("a circle")], _cfg(method="esd-x", xt_source="esd"))


def test_adversarial_run_resumes_to_identical_tensors(tiny_world, tmp_path):
    full = Eraser(tiny_world, [_concept()], _cfg()).run()
    want = {k: v.clone() for k, v in full.adapters.state_tensors().items()}
    full.adapters.remove(tiny_world.unet)
    ckpt = tmp_path / "ckpt.safetensors"
    calls = []
    with pytest.raises(ErasureInterrupted):
        Eraser(tiny_world, [_concept()], _cfg(), checkpoint_path=ckpt,
               should_stop=lambda: calls.append(1) or len(calls) == 3).run()
    resumed = Eraser(tiny_world, [_concept()], _cfg(), checkpoint_path=ckpt).run()
    got = resumed.adapters.state_tensors()
    resumed.adapters.remove(tiny_world.unet)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.adversarial == full.adversarial


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_eval_attack_prints_attack_rates(capsys):
    from bierasing.cli import main

    rc = main(["eval", "--concept", "red", "--samples", "1", "--attack", "--attack-steps", "2", "--json",
               "--threads", "2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    att = out["concepts"]["red"]["attacks"]
    for k in ("synonym_asr", "paraphrase_asr", "soft_prompt_asr", "embedding_asr", "embedding_init_asr"):
        assert 0.0 <= att[k] <= 1.0
    assert att["embedding_attack"]["steps"] == 2 and att["soft_prompt"]["steps"] == 2


def test_each_concept_refreshes_its_attack_on_its_own_draws(tiny_world):
    """Contexts are concepts of their own: each one's attack is refreshed every adversarial_every
    steps that draw it, so adding contexts adds no attacks per step."""
    concepts = [_concept(), Concept("a star", "a square", _images(3), _images(4))]
    e = Eraser(tiny_world, concepts, _cfg(steps=12))
    res = e.run()
    res.adapters.remove(tiny_world.unet)
    assert sum(e.adv_draws) == 12 and min(e.adv_draws) > 0
    for ci, draws in enumerate(e.adv_draws):
        assert sum(r["concept"] == ci for r in res.adversarial) == (draws + 1) // 2  # draws 0, 2, 4, ...
    assert len(res.adversarial) < 12  # every concept on every second step would be 12 attacks
