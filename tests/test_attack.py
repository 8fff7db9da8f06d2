"""Attacks on erased ShapesWorld models (bierasing.world.attack): prompt sets and the soft-prompt attack."""

import re

import pytest
import torch

from bierasing.world import attack
from bierasing.world import data

ALL = [c for values in data.AXES.values() for c in values]


def _skeleton(prompt: str) -> str:
    """The caption template behind a prompt: concept phrases -> {s} / {c} / {b}."""
    phrases = sorted(((w, slot) for slot, table in (("s", data.SHAPE_WORDS), ("c", data.COLOR_WORDS),
                                                       ("b", data.BACKGROUND_WORDS))
                      for syns in table.values() for w in syns), key=lambda x: -len(x[0]))
    out = " " + prompt + " "
    for w, slot in phrases:
        out = re.sub(rf"(?<=\s){re.escape(w)}(?=\s)", "{" + slot + "}", out)
    return out.strip().replace("an {", "a {")


def _training_skeletons() -> set[str]:
    temps = set(data._TEMPLATES_FULL + data._TEMPLATES_CS + data._TEMPLATES_S + data._TEMPLATES_C)
    # every data.prompt() form (what erasure training and measure_erasure use)
    for s in (None, "circle"):
        for c in (None, "red"):
            for b in (None, "white"):
                if s or c or b:
                    temps.add(_skeleton(data.prompt(s, c, b)))
    return temps


@pytest.mark.parametrize("target", ALL)
def test_paraphrases_avoid_canonical_word_and_training_templates(target):
    prompts = attack.paraphrase_prompts(target)
    assert len(prompts) >= 5 and len(set(prompts)) == len(prompts)
    vocab = set(data.vocabulary())
    training = _training_skeletons()
    syns = [data.AXIS_WORDS[data.axis_of(target)][target][k] for k in attack.attack_synonyms(target)]
    assert syns and all(target not in attack.words_of(s) for s in syns)
    for p in prompts:
        words = attack.words_of(p)
        assert target not in words, p
        assert set(words) <= vocab, f"{p!r} has words the world model never saw"
        assert any(s in p for s in syns), p
        assert _skeleton(p) not in training, f"{p!r} uses a training template"


def test_skeleton_helper_recognises_training_captions():
    # the helper the test above relies on does map training captions onto their templates
    assert _skeleton("a crimson disk on a bright background") == "a {c} {s} on a {b} background"
    assert _skeleton("an image of an emerald plus sign") == "an image of a {c} {s}"
    assert _skeleton("scarlet five-pointed star , snow-white background") == "{c} {s} , {b} background"
    assert _skeleton(data.prompt("circle", "red", synonym=1)) in _training_skeletons()


def test_snow_white_is_no_synonym_attack():
    assert attack.attack_synonyms("white") == [1]
    assert attack.attack_synonyms("star") == [2]
    assert attack.attack_synonyms("red") == [1, 2]


@pytest.fixture(scope="module")
def red_attack(world):
    before = world.encode_text(["a red circle", "", "a thing thing"]).clone()
    sp = attack.soft_prompt_attack(world, "red", steps=10, seed=0)
    return before, sp


def test_soft_prompt_lowers_its_loss_and_leaves_no_hook(world, red_attack):
    before, sp = red_attack
    assert sp.final_loss < sp.initial_loss
    assert len(sp.losses) == 10
    assert sp.embeddings.shape == (2, 64) and not torch.equal(sp.embeddings, sp.init_embeddings)
    assert sp.init_words == ["thing", "thing"] and sp.positions == [2, 3]
    # the hook only exists inside encode(): plain prompts are encoded exactly as before
    emb_layer = world.text_encoder.text_model.embeddings.token_embedding
    assert not emb_layer._forward_hooks
    after = world.encode_text(["a red circle", "", "a thing thing"])
    assert torch.equal(before, after)
    cond = sp.encode()
    assert cond.shape == (1, 16, 64)
    assert not torch.allclose(cond, before[2:3])          # the learned tokens change the conditioning
    torch.testing.assert_close(sp.encode_init(), before[2:3], rtol=0, atol=1e-6)  # init = plain prompt
    assert not emb_layer._forward_hooks
    assert all(not p.requires_grad for p in world.unet.parameters())


def test_soft_prompt_regenerates_red_on_untouched_model(world, red_attack):
    _, sp = red_attack
    learned = attack.attack_success(world, "red", sp, samples=8, seed=0)
    plain = attack.attack_success(world, "red", sp.encode_init(), samples=8, seed=0)
    assert 0.0 <= plain <= 1.0 and 0.0 <= learned <= 1.0
    assert learned >= 0.5          # measured 1.0 (8/8)
    assert plain <= 0.25           # "a thing thing": red only by chance (measured 1/8)


def test_soft_prompt_is_seed_deterministic_and_budgeted(world):
    kw = dict(steps=2, batch=2, eval_batch=2)
    a = attack.soft_prompt_attack(world, "circle", seed=3, **kw)
    b = attack.soft_prompt_attack(world, "circle", seed=3, **kw)
    c = attack.soft_prompt_attack(world, "circle", seed=4, **kw)
    assert torch.equal(a.embeddings, b.embeddings) and a.losses == b.losses
    assert not torch.equal(a.embeddings, c.embeddings)
    r = attack.soft_prompt_attack(world, "circle", seed=5, init="random", budget=0.01, **kw)
    assert (r.embeddings - r.init_embeddings).norm(dim=1).max() <= 0.01 + 1e-6
    banned = {w for s in data.SHAPE_WORDS["circle"] for w in attack.words_of(s)}
    assert len(set(r.init_words)) == 2 and not set(r.init_words) & banned


def test_adapters_stay_frozen_and_untouched(world):
    from bierasing.erase.adapters import attach

    adapters = attach(world.unet, "attn2", rank=2, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            for p in adapters.parameters():
                p.add_(0.01)
        snap = {k: v.clone() for k, v in adapters.state_tensors().items()}
        assert all(p.requires_grad for p in adapters.parameters())
        attack.soft_prompt_attack(world, "circle", steps=2, batch=2, eval_batch=2, seed=0)
        assert all(p.grad is None for p in adapters.parameters())
        assert all(p.requires_grad for p in adapters.parameters())   # flags restored
        assert all(torch.equal(snap[k], v) for k, v in adapters.state_tensors().items())
    finally:
        adapters.remove(world.unet)
        world.unet.requires_grad_(False)


def test_bad_arguments(world):
    with pytest.raises(ValueError):
        attack.soft_prompt_attack(world, "circle", steps=1, template="no placeholder")
    with pytest.raises(ValueError):
        attack.soft_prompt_attack(world, "hexagon", steps=1)
    with pytest.raises(ValueError):
        attack.soft_prompt_attack(world, "circle", steps=1, init="zebra")
    with pytest.raises(ValueError):
        attack.attack_success(world, "red", torch.zeros(2, 16, 64))
