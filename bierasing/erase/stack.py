"""Erasures one after another: the files of earlier erasures and a new one, as one file.

Erasure B trained on a model that carries erasure A (A merged into its weights) is a delta on top of
A's; applying both is W + dA + dB. One LoRA file holds both exactly: per layer, the LoRAs' ranks are
concatenated, each ``up`` carrying its own alpha / rank scale (the file's alpha equals its rank, scale
1). A layer with a full delta (``.diff``) in any of them gets the sum of all as one ``.diff``. The
metadata keeps each erasure's own record, in order (``stack``), and every erased concept.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from .export import SAVE_DTYPES, file_layout, merge_erasure, read_erasure, save_erasure_tensors

DOWN, UP, ALPHA, DIFF = ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff"


def _layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya layer key -> {suffix: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        for suffix in (DOWN, UP, ALPHA, DIFF):
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], {})[suffix] = v
                break
        else:
            raise ValueError(f"unsupported erasure key {k!r}")
    return out


def _scaled_up(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    rank = parts[DOWN].shape[0]
    alpha = float(parts[ALPHA]) if ALPHA in parts else float(rank)  # kohya: no alpha means alpha = rank
    return parts[UP].float() * (alpha / rank)


def _delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if DIFF in parts:
        return parts[DIFF].float()
    up, down = _scaled_up(parts), parts[DOWN].float()
    if down.ndim == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def stack_tensors(erasures: list[dict[str, torch.Tensor]], scales: list[float] | None = None
                  ) -> dict[str, torch.Tensor]:
    """One erasure whose effect is the sum of ``erasures``' (each times its scale; fp32, exact up to
    rounding)."""
    scales = scales or [1.0] * len(erasures)
    by_layer: dict[str, list[tuple[dict[str, torch.Tensor], float]]] = {}
    for tensors, scale in zip(erasures, scales):
        for key, parts in _layers(tensors).items():
            by_layer.setdefault(key, []).append((parts, scale))
    out = {}
    for key, parts in by_layer.items():
        if any(DIFF in p for p, _ in parts):
            out[key + DIFF] = sum(s * _delta(p) for p, s in parts)
            continue
        out[key + DOWN] = torch.cat([p[DOWN].float() for p, _ in parts], 0)
        out[key + UP] = torch.cat([s * _scaled_up(p) for p, s in parts], 1)
        out[key + ALPHA] = torch.tensor(float(out[key + DOWN].shape[0]))
    return out


def _record(info: dict, source: str, scale: float) -> list[dict]:
    """An erasure's own records: a stacked file contributes its stack, any other file itself."""
    records = list(info["stack"]) if "stack" in info else [{**info, "file": source}]
    return records if scale == 1.0 else [{**r, "strength": r.get("strength", 1.0) * scale} for r in records]


def stack(sources: list[str | os.PathLike | tuple[dict, dict]], scales: list[float] | None = None,
          precision: str = "fp32") -> tuple[dict[str, torch.Tensor], dict]:
    """The erasures in ``sources`` (files, or (tensors, info) pairs, in the order they were made),
    each at its scale, as one erasure: (tensors in ``precision``, metadata with every record)."""
    if not sources:
        raise ValueError("give at least one erasure")
    scales = scales or [1.0] * len(sources)
    tensors, records = [], []
    for s, scale in zip(sources, scales):
        t, info = s if isinstance(s, tuple) else read_erasure(s)
        tensors.append(t)
        records += _record(info, "(this run)" if isinstance(s, tuple) else Path(s).name, scale)
    concepts = [c for r in records for c in r.get("concepts", [])]
    info = {"library": f"bierasing {__version__}", "method": "stack", "concepts": concepts, "stack": records}
    dt = SAVE_DTYPES[precision]
    return {k: v if k.endswith(ALPHA) else v.to(dt) for k, v in stack_tensors(tensors, scales).items()}, info


def stack_erasures(path: str | os.PathLike, sources: list[str | os.PathLike | tuple[dict, dict]],
                   precision: str = "fp32") -> Path:
    """:func:`stack` written to ``path``, atomically."""
    if len(sources) < 2:
        raise ValueError("stacking needs at least two erasures")
    layout, names = file_layout([s for s in sources if not isinstance(s, tuple)])
    return save_erasure_tensors(path, *stack(sources, precision=precision), layout, names)


@contextmanager
def carrying(unet: nn.Module, paths: list[str | os.PathLike | tuple[dict, dict]]):
    """``unet`` with the erasures in ``paths`` (files or (tensors, info) pairs) merged into its
    weights, in order (a model that already carries them), and its own weights back, exactly,
    afterwards."""
    originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for p in paths:
            merge_erasure(unet, p, originals=originals)
        yield unet
    finally:  # through the weights themselves: adapters attached meanwhile may wrap their modules
        with torch.no_grad():
            for weight, saved in originals.values():
                weight.copy_(saved)

