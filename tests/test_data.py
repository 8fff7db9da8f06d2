import numpy as np
import pytest

from bierasing.world import data
from bierasing.world.detector import detect_batch
from bierasing.world.models import build_tokenizer


def test_render_is_seeded_and_sized():
    a = data.render("star", "red", "white", np.random.default_rng(3))
    b = data.render("star", "red", "white", np.random.default_rng(3))
    c = data.render("star", "red", "white", np.random.default_rng(4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rendered_colours_and_backgrounds_are_what_was_asked():
    rng = np.random.default_rng(0)
    for color in data.COLORS:
        for bg in data.BACKGROUNDS:
            img = data.render("square", color, bg, rng, noise=0, radius=12, center=(16, 16))
            assert np.abs(img[16, 16].astype(int) - data.COLOR_RGB[color]).max() <= 1
            assert np.abs(img[0, 0].astype(int) - data.BACKGROUND_RGB[bg]).max() <= 1


def test_captions_mention_only_true_concepts_and_use_synonyms():
    rng = np.random.default_rng(1)
    words_seen = set()
    for _ in range(2000):
        truth = data.random_concepts(rng)
        cap, mentioned = data.random_caption(truth, rng)
        for axis in data.AXES:
            m = mentioned.get(axis)
            assert m is None or m == truth.get(axis)
            if m is not None:
                assert any(w in cap for w in data.AXIS_WORDS[axis][m])
        assert mentioned.shape or mentioned.color
        words_seen.update(cap.split())
    # every synonym of every shape is used somewhere
    for syns in data.SHAPE_WORDS.values():
        for s in syns:
            assert s.split()[0] in words_seen


def test_every_caption_word_is_one_known_token():
    tok = build_tokenizer(16)
    rng = np.random.default_rng(2)
    for _ in range(500):
        cap, _ = data.random_caption(data.random_concepts(rng), rng)
        ids = tok(cap).input_ids
        assert tok.unk_token_id not in ids, cap
        assert len(ids) <= 16, cap


def test_sample_batch_matches_detector_ground_truth():
    imgs, caps, truths, _ = data.sample_batch(64, np.random.default_rng(5))
    dets = detect_batch(imgs)
    agree = np.mean([d.shape == t.shape and d.color == t.color and d.background == t.background
                     for d, t in zip(dets, truths)])
    assert agree >= 0.98


def test_prompt_and_axis_helpers():
    assert data.prompt("circle", "red") == "a red circle"
    assert data.prompt("circle", "red", "white") == "a red circle on a white background"
    assert data.prompt("circle", "red", synonym=1) == "a crimson disk"
    assert data.axis_of("purple") == "color"
    with pytest.raises(ValueError, match="unknown ShapesWorld concept 'hexagon'"):
        data.axis_of("hexagon")


def test_float_round_trip():
    imgs, *_ = data.sample_batch(4, np.random.default_rng(0))
    assert np.array_equal(data.to_uint8(data.to_float(imgs)), imgs)


def test_spread_zero_centres_the_shape_and_one_is_the_plain_draw():
    centred = [data.render("circle", "red", "black", np.random.default_rng(i), spread=0.0) for i in range(6)]
    for img in centred:
        ys, xs = np.nonzero(img[..., 0] > 120)  # the red disk on black
        assert abs(xs.mean() - 15.5) < 0.6 and abs(ys.mean() - 15.5) < 0.6
    plain = data.render("star", "blue", "white", np.random.default_rng(7))
    assert np.array_equal(plain, data.render("star", "blue", "white", np.random.default_rng(7), spread=1.0))
    imgs, _, _, _ = data.sample_batch(8, np.random.default_rng(0), spread=0.0)
    assert imgs.shape == (8, 32, 32, 3)
