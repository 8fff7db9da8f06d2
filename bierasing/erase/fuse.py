"""Erasures merged into a checkpoint's weights: a single-file SD1.x or SDXL model that draws as the
model with its erasure LoRAs loaded, and from which the erasure cannot be switched off.

    fuse_single_file("v1-5-pruned-emaonly.safetensors", ["erasure.safetensors"], "v1-5-erased.safetensors")

Only the UNet tensors the erasures touch change (each in fp32, stored back in the file's own dtype);
every other tensor and the file's metadata are copied as they are, and the metadata gains
``bierasing_fused``: which erasures went in, at what strength. ComfyUI users get the same from the
stock Save Checkpoint node on the erased MODEL.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..io import load_safetensors
from .export import kohya_name
from .stack import _delta, _layers, stack


def _unet_names(checkpoint: Path, config: str | os.PathLike | None) -> dict[str, str]:
    """diffusers module name -> LDM module name for the checkpoint's UNet (SD1.x or SDXL base)."""
    from ..single_file import SD15_CONFIG, _read_config, check_sd1_single_file, is_sd1_single_file
    from ..single_file_xl import SDXL_CONFIG, is_sdxl_single_file
    from ..unet_names import diffusers_to_ldm

    if is_sdxl_single_file(checkpoint):
        default = SDXL_CONFIG
    elif is_sd1_single_file(checkpoint):
        default = SD15_CONFIG
    else:
        check_sd1_single_file(checkpoint)  # raises, saying what the file is
        raise ValueError(f"{checkpoint} is not an SD1.x or SDXL single-file checkpoint")
    return diffusers_to_ldm(_read_config(Path(config) if config else default, "unet"))


def fuse_single_file(checkpoint: str | os.PathLike, erasures: list[str | os.PathLike], out: str | os.PathLike,
                     strengths: list[float] | None = None, config: str | os.PathLike | None = None) -> dict:
    """Write ``checkpoint`` with ``erasures`` (in order, each at its strength) added into its UNet
    weights to ``out`` (a new file, written atomically). Returns what went in."""
    from ..single_file import UNET_PREFIX

    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if not erasures:
        raise ValueError("give at least one erasure to fuse")
    if strengths is not None and len(strengths) != len(erasures):
        raise ValueError(f"{len(erasures)} erasures but {len(strengths)} strengths; give one per erasure")
    if out.suffix != ".safetensors":
        raise ValueError(f"write the fused checkpoint as .safetensors, not {out.name!r}")
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise ValueError("write the fused checkpoint to a new file; the original is left as it is")
    names = _unet_names(checkpoint, config)
    by_kohya = {kohya_name(m): m for m in names}
    delta_tensors, info = stack(list(erasures), strengths)
    parts = _layers(delta_tensors)
    unknown = sorted(set(parts) - set(by_kohya))
    if unknown:
        raise ValueError(f"{len(unknown)} erasure layers are not in this checkpoint's UNet (e.g. {unknown[0]}); "
                         "fuse erasures made for this model's architecture")
    tensors, meta = load_safetensors(checkpoint)
    for key, layer in parts.items():
        name = UNET_PREFIX + names[by_kohya[key]] + ".weight"
        w, d = tensors[name], _delta(layer)
        if d.numel() != w.numel():
            raise ValueError(f"{key}: the erasure's delta has shape {tuple(d.shape)}, the checkpoint's {name} "
                             f"{tuple(w.shape)}; fuse erasures made for this model")
        tensors[name] = (w.float() + d.reshape(w.shape)).to(w.dtype)
    fused = {"library": f"bierasing {__version__}", "checkpoint": checkpoint.name, "layers": len(parts),
             "erasures": info["stack"]}
    _save(out, tensors, {**meta, "bierasing_fused": json.dumps(fused, default=str)})
    return fused


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """safetensors straight to a temporary file beside ``path``, then renamed (atomic, and no
    second in-memory copy of a multi-GB checkpoint)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
