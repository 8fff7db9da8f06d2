"""Labelled image grids (PNG) - what a person looks at before reading numbers."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .io import atomic_write_bytes


def make_grid(cells: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
              cell_px: int = 96, label_px: int = 260, title: str | None = None,
              marks: np.ndarray | None = None) -> np.ndarray:
    """cells: uint8 [rows, cols, H, W, 3] RGB -> one uint8 RGB image with labels.

    ``marks`` (bool [rows, cols]) draws a red frame around flagged cells (e.g. "target detected").
    """
    import cv2

    rows, cols = cells.shape[:2]
    if len(row_labels) != rows:
        raise ValueError(f"{rows} rows but {len(row_labels)} row labels")
    head = 28 if col_labels is not None else 0
    top = 34 if title else 0
    img = np.full((top + head + rows * cell_px, label_px + cols * cell_px, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    if title:
        cv2.putText(img, title, (6, 24), font, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
    if col_labels is not None:
        for c, lab in enumerate(col_labels):
            cv2.putText(img, str(lab)[:14], (label_px + c * cell_px + 4, top + 20), font, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
    for r in range(rows):
        y0 = top + head + r * cell_px
        _put_wrapped(img, row_labels[r], 6, y0 + 20, label_px - 10)
        for c in range(cols):
            x0 = label_px + c * cell_px
            tile = cv2.resize(cells[r, c], (cell_px - 4, cell_px - 4), interpolation=cv2.INTER_NEAREST)
            img[y0 + 2:y0 + cell_px - 2, x0 + 2:x0 + cell_px - 2] = tile
            if marks is not None and marks[r, c]:
                cv2.rectangle(img, (x0 + 1, y0 + 1), (x0 + cell_px - 2, y0 + cell_px - 2), (220, 0, 0), 2)
    return img


def _put_wrapped(img: np.ndarray, text: str, x: int, y: int, width: int) -> None:
    import cv2

    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    line = ""
    for word in text.split():
        trial = (line + " " + word).strip()
        if cv2.getTextSize(trial, font, scale, 1)[0][0] > width and line:
            cv2.putText(img, line, (x, y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
            y, line = y + 18, word
        else:
            line = trial
    cv2.putText(img, line, (x, y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Atomic PNG write of an RGB uint8 image."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode PNG for {path}")
    atomic_write_bytes(path, buf.tobytes())
