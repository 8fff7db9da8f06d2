"""Related concepts from the model's own text encoder (bierasing.related): deterministic, for any
backbone, never suggesting what is erased or what the evaluation samples."""

import subprocess
import sys

import pytest
import torch

from bierasing import related
from bierasing.world.models import ShapesWorldBackbone
from bierasing.world.related import evaluated_prompts


@pytest.fixture(scope="module")
def world():
    return ShapesWorldBackbone.load("shapesworld")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from bierasing.sd15 import SD15Backbone
    from bierasing.standins import build_sd15_folder

    return SD15Backbone.from_pretrained(build_sd15_folder(tmp_path_factory.mktemp("sd15"), "tiny")["model"])


def test_the_shipped_vocabulary_is_large_and_its_templates_have_one_slot():
    vocab = related.shipped_vocabulary()
    assert len(vocab.phrases) >= 300 and len(set(vocab.phrases)) == len(vocab.phrases)
    assert {"Van Gogh", "a dog", "nudity", "a bikini", "a forest", "red"} <= set(vocab.phrases)
    assert len(vocab.contexts) >= 8 and all(c.count("{}") == 1 for c in vocab.contexts)
    with pytest.raises(ValueError, match=r"exactly one \{\}"):
        related.Vocabulary(("a cat",), ("a {} and a {}",))


def test_world_neighbours_follow_the_trained_text_encoder(world):
    # the world's text encoder puts circle beside square and triangle beside cross (measured cosines
    # of the concept prompts' conditioning: 0.93 and 0.92), far above any pair across axes
    vocab = world.related_vocabulary("circle")
    (first, cos), *_ = related.nearest(world, "circle", vocab, 3)
    assert first == "square" and cos > 0.85
    assert related.nearest(world, "triangle", vocab, 1)[0][0] == "cross"
    assert "square" not in [p for p, _ in related.nearest(world, "circle", vocab, 12, exclude=["square"])]


def test_world_suggestions_hold_neighbours_in_context_and_never_an_evaluation_prompt(world):
    keep, contexts = related.suggest(world, [("star", "circle")], 4)
    (pairs,) = contexts
    assert len(pairs) == 4 and all("star" in t and "circle" in s for t, s in pairs)
    assert not set(keep) & evaluated_prompts("star")
    assert not any("star" in p.split() for p in keep)
    in_context = [p for p in keep if "background" in p and len(p.split()) > 4]
    assert in_context and all(p.split()[2] in ("circle", "square", "triangle", "cross") for p in in_context)
    # erasing two concepts holds neither of them anywhere
    keep2, _ = related.suggest(world, [("red", "green"), ("circle", "square")], 4)
    assert not any({"red", "circle"} & set(p.split()) for p in keep2)


def test_world_concepts_named_by_their_prompts_get_the_same_suggestions(world):
    # the engine passes concepts as typed ("a circle", "on a white background"); templates take the word
    assert related.suggest(world, [("a star", "a circle")], 4) == related.suggest(world, [("star", "circle")], 4)
    _, (pairs,) = related.suggest(world, [("on a white background", "on a gray background")], 4)
    assert pairs and all(t.endswith("on a white background") and s.endswith("on a gray background")
                         and len(t.split()) == 7 for t, s in pairs)  # "a yellow circle on a white background"


def test_sd15_standin_suggestions_are_phrases_and_deterministic(sd15, tmp_path):
    a = related.suggest(sd15, [("Van Gogh", "Claude Monet")], 3)
    b = related.suggest(sd15, [("Van Gogh", "Claude Monet")], 3)
    assert a == b
    keep, (pairs,) = a
    vocab = related.shipped_vocabulary()
    assert len(keep) >= 8 and all(isinstance(p, str) and p for p in keep)
    assert pairs == [(t.format("Van Gogh"), t.format("Claude Monet")) for t in vocab.contexts[:3]]
    assert not any({"van", "gogh", "claude", "monet"} & set(p.lower().split()) for p in keep)
    near = related.nearest(sd15, "a dog", vocab, 5)
    cos = [c for _, c in near]
    assert len(near) == 5 and cos == sorted(cos, reverse=True) and all(-1 <= c < related.SAME_ABOVE for c in cos)
    vecs = related.conditioning_vectors(sd15, ["a dog", "a cat"])
    assert vecs.shape[0] == 2 and torch.allclose(vecs.norm(dim=1), torch.ones(2))


def test_ranking_many_concepts_encodes_the_vocabulary_once(sd15, monkeypatch):
    vocab = related.shipped_vocabulary()
    alone = related.suggest(sd15, [("Van Gogh", "Claude Monet")], 2)
    encoded: list[str] = []
    encode = sd15.encode_text
    monkeypatch.setattr(sd15, "encode_text", lambda prompts: (encoded.extend(prompts), encode(prompts))[1])
    pairs = [("Van Gogh", "Claude Monet"), ("a dog", "a cat"), ("nudity", "")]
    keep, contexts = related.suggest(sd15, pairs, 2)
    assert len(encoded) == len(set(encoded)) and len(encoded) <= len(vocab.phrases) + len(pairs) + 1
    assert contexts[0] == alone[1][0]
    cache: dict = {}
    cached = related.conditioning_vectors(sd15, ["a dog", "a cat", "a dog"], cache=cache)
    assert set(cache) == {"", "a dog", "a cat"}
    assert torch.allclose(cached, related.conditioning_vectors(sd15, ["a dog", "a cat", "a dog"]), atol=1e-6)


def test_no_safe_alternative_means_no_contexts(sd15):
    keep, contexts = related.suggest(sd15, [("nudity", "")], 4)
    assert contexts == [[]] and len(keep) == 8


def test_cli_suggest_prints_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bierasing", "suggest", "--concept", "star", "--json",
                        "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["concepts"][0]["safe"] == "circle" and len(out["concepts"][0]["nearest"]) == 8
    assert len(out["contexts"][0]) == 4 and out["preserve"]


def test_a_phrase_is_left_out_only_when_it_names_an_erased_concept(world):
    assert related.names("a hot dog", "dog") and related.names("a red square", "red")
    assert not related.names("manga style", "anime style") and not related.names("on a white background", "gray")
    # ShapesWorld's backgrounds all end in "background": erasing gray still holds the other backgrounds,
    # alone and in context, and a colour erasure holds the other colours ("something purple")
    keep, _ = related.suggest(world, [("on a gray background", "on a black background")], 4)
    assert "on a white background" in keep and any(p.endswith("on a white background") and p != "on a white background"
                                                   for p in keep), keep
    assert not any("gray" in p or "black" in p for p in keep), keep
    keep, _ = related.suggest(world, [("something blue", "something yellow")], 4)
    assert "something purple" in keep and not any("blue" in p or "yellow" in p for p in keep), keep
