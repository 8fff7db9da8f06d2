"""ShapesWorld data: procedural, seeded images of coloured shapes with captions.

Three concept axes:
  * shape      (object-like):    circle, square, triangle, cross, star
  * colour     (attribute-like): red, yellow, green, blue, purple
  * background (style-like):     black, white, gray

Every concept has a canonical word and synonyms.  The world model is trained on all of them, so a
synonym prompt really means the concept; erasure training uses only canonical words, which keeps
synonyms free for attacks ("did the erasure only hit one word?").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("black", "white", "gray")

COLOR_RGB = {
    "red": (225, 35, 35),
    "yellow": (235, 210, 30),
    "green": (40, 185, 55),
    "blue": (40, 75, 230),
    "purple": (150, 45, 205),
}
BACKGROUND_RGB = {"black": (12, 12, 12), "white": (242, 242, 242), "gray": (128, 128, 128)}

# canonical word first; the rest are synonyms the world model also learns
SHAPE_WORDS = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid", "three-sided shape"),
    "cross": ("cross", "plus sign", "plus"),
    "star": ("star", "five-pointed star", "starlet"),
}
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "magenta"),
}
BACKGROUND_WORDS = {
    "black": ("black", "dark", "jet-black"),
    "white": ("white", "bright", "snow-white"),
    "gray": ("gray", "grey", "silver"),
}
AXES = {"shape": SHAPES, "color": COLORS, "background": BACKGROUNDS}
AXIS_WORDS = {"shape": SHAPE_WORDS, "color": COLOR_WORDS, "background": BACKGROUND_WORDS}

_TEMPLATES_FULL = (
    "a {c} {s} on a {b} background",
    "a picture of a {c} {s} on a {b} background",
    "{c} {s} , {b} background",
    "a {s} in {c} against a {b} background",
)
_TEMPLATES_CS = ("a {c} {s}", "a picture of a {c} {s}", "a {s} in {c}", "an image of a {c} {s}")
_TEMPLATES_S = ("a {s}", "a picture of a {s}", "a {s} on a {b} background")
_TEMPLATES_C = ("something {c}", "a {c} thing", "something {c} on a {b} background")


@dataclass(frozen=True)
class Concepts:
    """The ground-truth concepts of one image; None in a caption means "not mentioned"."""

    shape: str | None
    color: str | None
    background: str | None

    def get(self, axis: str) -> str | None:
        return getattr(self, axis)


def axis_of(concept: str) -> str:
    """Which axis a canonical concept word belongs to ("circle" -> "shape")."""
    for axis, values in AXES.items():
        if concept in values:
            return axis
    known = ", ".join(v for values in AXES.values() for v in values)
    raise ValueError(f"unknown ShapesWorld concept {concept!r}; known concepts: {known}")


def prompt(shape: str | None = None, color: str | None = None, background: str | None = None,
           synonym: int = 0) -> str:
    """A canonical prompt for the given concepts; synonym=k picks the k-th word of each concept."""
    s = SHAPE_WORDS[shape][synonym] if shape else None
    c = COLOR_WORDS[color][synonym] if color else None
    b = BACKGROUND_WORDS[background][synonym] if background else None
    if s and c:
        text = f"a {c} {s}"
    elif s:
        text = f"a {s}"
    elif c:
        text = f"something {c}"
    else:
        text = ""
    if b:
        text = (text + f" on a {b} background").strip()
    return text


def random_caption(concepts: Concepts, rng: np.random.Generator, p_color: float = 0.85,
                   p_shape: float = 0.9, p_background: float = 0.5) -> tuple[str, Concepts]:
    """Caption an image with a random template and random synonyms.

    Returns the caption and the concepts it mentions (the others are None).
    """
    has_s = rng.random() < p_shape
    has_c = rng.random() < p_color
    has_b = rng.random() < p_background
    if not (has_s or has_c):
        has_s = True
    s = _pick(rng, SHAPE_WORDS[concepts.shape])
    c = _pick(rng, COLOR_WORDS[concepts.color])
    b = _pick(rng, BACKGROUND_WORDS[concepts.background])
    if has_s and has_c:
        templates = _TEMPLATES_FULL if has_b else _TEMPLATES_CS
    elif has_s:
        templates = _TEMPLATES_S if has_b else _TEMPLATES_S[:2]
    else:
        templates = _TEMPLATES_C if has_b else _TEMPLATES_C[:2]
    template = templates[rng.integers(len(templates))]
    mentioned = Concepts(concepts.shape if has_s else None, concepts.color if has_c else None,
                         concepts.background if "{b}" in template else None)
    article_fixed = template.format(s=s, c=c, b=b).replace("a emerald", "an emerald").replace(
        "a azure", "an azure")
    return article_fixed, mentioned


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    # the canonical word is drawn half the time, each synonym equally often otherwise
    if rng.random() < 0.5:
        return words[0]
    return words[1 + rng.integers(len(words) - 1)]


def polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "square":
        h = r * 0.8
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        pts = [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    elif shape == "cross":
        a, w = r * 0.9, r * 0.32
        pts = [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
               (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
               (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return np.asarray(pts, dtype=np.float64)


def render(shape: str, color: str, background: str, rng: np.random.Generator | None = None,
           size: int = IMAGE_SIZE, noise: float = 3.0, radius: float | None = None,
           center: tuple[float, float] | None = None, spread: float = 1.0) -> np.ndarray:
    """Render one image as uint8 HWC RGB.

    The shape is drawn anti-aliased at 4x and downsampled; position and size are random unless
    given (radius and center in pixels of the output image). ``spread`` scales a random
    position's offset from the image centre (0 = centred; the same random draws either way).
    """
    import cv2

    rng = rng if rng is not None else np.random.default_rng(0)
    if radius is None:
        radius = size * rng.uniform(0.28, 0.40)
    if center is None:
        margin = radius + 1.5
        mid = size / 2
        center = tuple(mid + spread * (rng.uniform(margin, size - margin) - mid) for _ in range(2))
    big = size * _SUPERSAMPLE
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = BACKGROUND_RGB[background]
    fg = COLOR_RGB[color]
    cx, cy, r = center[0] * _SUPERSAMPLE, center[1] * _SUPERSAMPLE, radius * _SUPERSAMPLE
    shift = 4  # sub-pixel precision for cv2 drawing
    if shape == "circle":
        cv2.circle(canvas, (int(cx * 16), int(cy * 16)), int(r * 16), fg, -1, cv2.LINE_AA, shift)
    else:
        pts = np.round(polygon(shape, cx, cy, r) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [pts], fg, cv2.LINE_AA, shift)
    img = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    if noise > 0:
        img += rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def random_concepts(rng: np.random.Generator) -> Concepts:
    return Concepts(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
                    BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def sample_batch(n: int, rng: np.random.Generator, caption_kwargs: dict | None = None, spread: float = 1.0
                 ) -> tuple[np.ndarray, list[str], list[Concepts], list[Concepts]]:
    """n random images (uint8 NHWC), their captions, true concepts and caption-mentioned concepts;
    ``spread`` as in :func:`render`."""
    images, captions, truths, mentions = [], [], [], []
    for _ in range(n):
        c = random_concepts(rng)
        images.append(render(c.shape, c.color, c.background, rng, spread=spread))
        cap, mentioned = random_caption(c, rng, **(caption_kwargs or {}))
        captions.append(cap)
        truths.append(c)
        mentions.append(mentioned)
    return np.stack(images), captions, truths, mentions


def vocabulary() -> list[str]:
    """Every word a ShapesWorld caption can contain (lower case, tokenized on spaces/punctuation)."""
    words: set[str] = set()
    texts = list(_TEMPLATES_FULL + _TEMPLATES_CS + _TEMPLATES_S + _TEMPLATES_C)
    for table in AXIS_WORDS.values():
        for syns in table.values():
            texts.extend(syns)
    texts += ["an", "image", "photo", "of", "drawing", "a"]
    for t in texts:
        for tok in t.replace("{s}", " ").replace("{c}", " ").replace("{b}", " ").replace(
                "-", " - ").replace(",", " , ").split():
            words.add(tok)
    return sorted(words)


def to_float(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the model's pixel space)."""
    return (images_uint8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255)
    return np.round(x).astype(np.uint8).transpose(0, 2, 3, 1)


DEFAULT_SAFE = {"circle": "square", "square": "circle", "triangle": "square", "cross": "circle",
                "star": "circle", "red": "green", "yellow": "blue", "green": "red", "blue": "yellow",
                "purple": "green", "black": "gray", "white": "gray", "gray": "black"}


def concept_prompt(concept: str, synonym: int = 0) -> str:
    """The prompt that names one concept alone: "a circle", "something red", "on a white background"."""
    axis = axis_of(concept)
    return prompt(**{axis: concept}, synonym=synonym)


def is_concept(word: str) -> bool:
    return any(word in values for values in AXES.values())
