"""Tests for the deterministic ShapesWorld detector (bierasing.world.detector)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bierasing.world import data
from bierasing.world.detector import NONE, Detection, detect, detect_batch

cv2.setNumThreads(1)
AXES = ("shape", "color", "background")
S = data.IMAGE_SIZE


def _rendered(n: int, seed: int, noise: float = 3.0, blur: float | None = None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = data.random_concepts(rng)
        im = data.render(c.shape, c.color, c.background, rng, noise=noise)
        if blur:
            im = cv2.GaussianBlur(im, (0, 0), blur)
        out.append((im, c))
    return out


def _accuracy(items) -> dict[str, float]:
    dets = detect_batch(np.stack([im for im, _ in items]))
    return {ax: float(np.mean([getattr(d, ax) == getattr(c, ax) for d, (_, c) in zip(dets, items)]))
            for ax in AXES}


def _canvas(background: str, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((S, S, 3), np.float32)
    img[:] = data.BACKGROUND_RGB[background]
    return img


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    return np.clip(np.round(img + rng.normal(0, noise, img.shape)), 0, 255).astype(np.uint8)


def _paint(img: np.ndarray, mask_4x: np.ndarray, color: str) -> np.ndarray:
    """Composite a 4x-resolution binary mask, anti-aliased like data.render."""
    a = cv2.resize(mask_4x.astype(np.float32), (S, S), interpolation=cv2.INTER_AREA)[..., None]
    return img * (1 - a) + np.array(data.COLOR_RGB[color], np.float32) * a


def _wobbly_blob(rng: np.random.Generator) -> np.ndarray:
    """An amorphous blob: an ellipse whose radius wobbles with two random harmonics."""
    big = 4 * S
    t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    wob = 1 + sum(rng.uniform(0.08, 0.18) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
                  for k in rng.choice([2, 3, 4, 5], 2, replace=False))
    r0, aspect = big * rng.uniform(0.25, 0.35), rng.uniform(1.0, 1.5)
    rx, ry = r0 * np.sqrt(aspect) * wob, r0 / np.sqrt(aspect) * wob
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    mask = np.zeros((big, big), np.uint8)
    cv2.fillPoly(mask, [np.round(pts + big / 2).astype(np.int32)], 1)
    return mask


# ---------------------------------------------------------------- accuracy on clean renders


def test_clean_render_accuracy_per_axis():
    acc = _accuracy(_rendered(300, seed=0))
    for ax in AXES:
        assert acc[ax] >= 0.98, (ax, acc)


@pytest.mark.parametrize("background", data.BACKGROUNDS)
def test_every_shape_and_colour_on_every_background(background):
    rng = np.random.default_rng(1)
    for shape in data.SHAPES:
        for color in data.COLORS:
            d = detect(data.render(shape, color, background, rng))
            assert (d.shape, d.color, d.background) == (shape, color, background), d.features


@pytest.mark.parametrize("radius", [0.22 * S, 0.44 * S])
def test_small_and_large_radii(radius):
    rng = np.random.default_rng(2)
    for shape in data.SHAPES:
        im = data.render(shape, "yellow", "white", rng, radius=radius, center=(S / 2, S / 2))
        assert detect(im).shape == shape


def test_robust_to_noise_and_blur():
    for kwargs in ({"noise": 20.0}, {"blur": 1.0}):
        acc = _accuracy(_rendered(100, seed=3, **kwargs))
        assert min(acc.values()) >= 0.95, (kwargs, acc)


def test_other_image_sizes():
    rng = np.random.default_rng(4)
    for size in (16, 64):
        for shape in data.SHAPES:
            im = data.render(shape, "purple", "gray", rng, size=size)
            d = detect(im)
            assert (d.shape, d.color, d.background) == (shape, "purple", "gray")


def test_colour_survives_washed_out_and_grayish_rendering():
    # a generator's colours drift towards the background or towards gray; hue should survive
    rng = np.random.default_rng(5)
    for color in data.COLORS:
        for background in data.BACKGROUNDS:
            f = data.render("square", color, background, rng).astype(np.float32)
            bg = np.array(data.BACKGROUND_RGB[background], np.float32)
            gray = f.mean(axis=2, keepdims=True)
            for variant in (bg + 0.55 * (f - bg), gray + 0.45 * (f - gray)):
                assert detect(np.clip(variant, 0, 255).astype(np.uint8)).color == color


# ---------------------------------------------------------------- "none"


@pytest.mark.parametrize("background", data.BACKGROUNDS)
def test_empty_background(background):
    d = detect(_finish(_canvas(background, np.random.default_rng(6)), np.random.default_rng(6)))
    assert (d.shape, d.color, d.background) == (NONE, NONE, background)


def test_pure_noise_is_none_on_every_axis():
    rng = np.random.default_rng(7)
    for _ in range(10):
        d = detect(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
        assert (d.shape, d.color, d.background) == (NONE, NONE, NONE)


def test_blobs_do_not_fall_through_to_circle():
    rng = np.random.default_rng(8)
    shapes = []
    for _ in range(60):
        background = data.BACKGROUNDS[rng.integers(3)]
        color = data.COLORS[rng.integers(5)]
        img = _finish(_paint(_canvas(background, rng), _wobbly_blob(rng), color), rng)
        d = detect(img)
        shapes.append(d.shape)
        assert d.color == color and d.background == background
    assert shapes.count(NONE) / len(shapes) >= 0.95, shapes
    assert shapes.count("circle") <= 1, shapes


def test_ellipse_is_not_a_circle():
    mask = np.zeros((4 * S, 4 * S), np.uint8)
    cv2.ellipse(mask, (2 * S, 2 * S), (48, 30), 0, 0, 360, 1, -1)
    rng = np.random.default_rng(9)
    assert detect(_finish(_paint(_canvas("black", rng), mask, "red"), rng)).shape == NONE


@pytest.mark.parametrize("shape", data.SHAPES)
def test_two_shapes_are_none(shape):
    rng = np.random.default_rng(10)
    r = 0.18 * S
    left = data.render(shape, "green", "black", rng, radius=r, center=(r + 2, S / 2), noise=0)
    right = data.render("circle", "blue", "black", rng, radius=r, center=(S - r - 2, S / 2),
                        noise=0)
    bg = np.array(data.BACKGROUND_RGB["black"], np.float32)
    two = left.astype(np.float32) + right.astype(np.float32) - bg
    d = detect(_finish(two, rng))
    assert d.shape == NONE and d.features["shape_reason"] == "several_objects"
    assert d.color == NONE  # green and blue
    assert d.background == "black"


def test_two_overlapping_shapes_are_none():
    rng = np.random.default_rng(11)
    img = _canvas("gray", rng)
    mask = np.zeros((4 * S, 4 * S), np.uint8)
    cv2.circle(mask, (48, 64), 26, 1, -1)
    cv2.rectangle(mask, (64, 40), (110, 86), 1, -1)
    assert detect(_finish(_paint(img, mask, "red"), rng)).shape == NONE


@pytest.mark.parametrize("shape", data.SHAPES)
def test_fragment_cropped_by_the_frame_is_none(shape):
    rng = np.random.default_rng(12)
    im = data.render(shape, "red", "white", rng, radius=0.35 * S, center=(0.0, S / 2))
    assert detect(im).shape == NONE


def test_shape_cut_by_the_bottom_edge_is_none():
    # the visible tip of this triangle is itself a perfect triangle, but it runs along the frame
    rng = np.random.default_rng(12)
    im = data.render("triangle", "red", "gray", rng, radius=0.35 * S, center=(S / 2, S + 1.0))
    d = detect(im)
    assert d.shape == NONE and d.features["shape_reason"] == "cropped"


def test_half_circle_is_none():
    rng = np.random.default_rng(13)
    im = data.render("circle", "blue", "white", rng, radius=0.35 * S, center=(S / 2, S / 2))
    im[:, S // 2:] = im[0, 0]
    assert detect(im).shape == NONE


def test_ring_is_not_a_circle():
    rng = np.random.default_rng(18)
    mask = np.zeros((4 * S, 4 * S), np.uint8)
    cv2.circle(mask, (64, 64), 44, 1, -1)
    cv2.circle(mask, (64, 64), 26, 0, -1)
    d = detect(_finish(_paint(_canvas("white", rng), mask, "blue"), rng))
    assert d.shape == NONE and d.features["shape_reason"] == "holes"
    assert d.color == "blue"


def test_speck_is_none_but_keeps_colour():
    rng = np.random.default_rng(14)
    d = detect(data.render("circle", "red", "gray", rng, radius=2.0))
    assert d.shape == NONE and d.features["shape_reason"] == "speck"
    assert d.color == "red"


def test_achromatic_shape_has_no_colour():
    rng = np.random.default_rng(15)
    mask = np.zeros((4 * S, 4 * S), np.uint8)
    cv2.circle(mask, (64, 64), 40, 1, -1)
    a = cv2.resize(mask.astype(np.float32), (S, S), interpolation=cv2.INTER_AREA)[..., None]
    img = _canvas("black", rng) * (1 - a) + np.array([205.0, 195.0, 195.0]) * a  # faint pink tint
    d = detect(_finish(img, rng))
    assert (d.shape, d.color) == ("circle", NONE)
    assert d.features["chroma"] < 25


def test_two_colours_in_one_shape_have_no_colour():
    rng = np.random.default_rng(16)
    im = data.render("square", "red", "black", rng, radius=0.35 * S, center=(S / 2, S / 2))
    yellow = data.render("square", "yellow", "black", rng, radius=0.35 * S, center=(S / 2, S / 2))
    im[:, S // 2:] = yellow[:, S // 2:]
    d = detect(im)
    assert (d.shape, d.color) == ("square", NONE)


def test_coloured_background_is_none():
    rng = np.random.default_rng(17)
    img = np.empty((S, S, 3), np.float32)
    img[:] = data.COLOR_RGB["green"]
    assert detect(_finish(img, rng)).background == NONE


# ---------------------------------------------------------------- API


def test_determinism_and_batch_equals_single():
    images = np.stack([im for im, _ in _rendered(40, seed=17, noise=10.0)])
    batch = detect_batch(images)
    single = [detect(im) for im in images]
    assert batch == single == detect_batch(images.copy())
    assert [d.features for d in batch] == [d.features for d in single]
    assert all(isinstance(d, Detection) for d in batch)
    for d in batch:
        assert d.shape in (*data.SHAPES, NONE)
        assert d.color in (*data.COLORS, NONE)
        assert d.background in (*data.BACKGROUNDS, NONE)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        detect(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        detect(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        detect(np.zeros((32, 24, 3), np.uint8))
    with pytest.raises(ValueError):
        detect_batch(np.zeros((32, 32, 3), np.uint8))
