"""Small line plots drawn with opencv (no plotting library): loss curves for people to glance at."""

from __future__ import annotations

from typing import Sequence

import numpy as np

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def line_plot(series: dict[str, Sequence[float]], title: str = "", xlabel: str = "step",
              size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """uint8 RGB [H, W, 3] plot of one or more series sharing an x axis (index + 1)."""
    import cv2

    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 64, 16, 40, 40
    font = cv2.FONT_HERSHEY_SIMPLEX
    if title:
        cv2.putText(img, title, (left, 26), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    vals = [np.asarray(v, np.float64) for v in series.values() if len(v)]
    finite = np.concatenate([v[np.isfinite(v)] for v in vals]) if vals else np.zeros(0)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    if finite.size == 0:
        cv2.putText(img, "no data", (w // 2 - 40, h // 2), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        return img
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(v) for v in vals)
    px = lambda i: left + (w - left - right) * (i / max(1, n - 1))  # noqa: E731
    py = lambda y: h - bottom - (h - top - bottom) * ((y - lo) / (hi - lo))  # noqa: E731
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        cv2.putText(img, f"{y:.3g}", (4, int(py(y)) + 4), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(img, f"{xlabel} 1..{n}", (left, h - 14), font, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    for k, (name, v) in enumerate(series.items()):
        v = np.asarray(v, np.float64)
        pts = np.array([[px(i), py(y)] for i, y in enumerate(v) if np.isfinite(y)], np.int32)
        color = _COLORS[k % len(_COLORS)]
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, color, 1, cv2.LINE_AA)
        elif len(pts) == 1:
            cv2.circle(img, tuple(int(c) for c in pts[0]), 2, color, -1)
        cv2.putText(img, name, (w - right - 120, top + 18 + 16 * k), font, 0.45, color, 1, cv2.LINE_AA)
    return img


def loss_curve(history: Sequence[dict], title: str = "erasure loss") -> np.ndarray:
    """Plot of the engine's per-step records (``loss`` and its parts ``neg``/``pos``/``map``)."""
    keys = [k for k in ("loss", "neg", "pos", "map") if any(k in r for r in history)]
    series = {k: [r.get(k, float("nan")) for r in history] for k in keys}
    return line_plot(series, title)
