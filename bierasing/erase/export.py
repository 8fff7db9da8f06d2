"""Erasure files: safetensors that ComfyUI's LoraLoader reads (and diffusers, for LoRA ranks > 0).

Two key layouts, chosen by the model (``Backbone.lora_layout``):

* ``kohya`` (UNets): ``lora_unet_<diffusers module path with _>``
    LoRA adapters  -> ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``  (ComfyUI and diffusers'
                      ``load_lora_weights``)
    full deltas    -> ``.diff`` (ComfyUI's full weight-difference format; diffusers does not read it)
* ``peft`` (FLUX): ``transformer.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight`` with
  alpha / rank folded into ``lora_B`` (scale 1 in both loaders; ComfyUI maps these keys onto its
  fused q/k/v slices, and diffusers' FLUX loader sends any kohya key to a converter that assumes
  FLUX.1's 19 + 38 blocks); full deltas as ``transformer.<path>.diff`` (ComfyUI only).

In memory an erasure is always in the kohya form; the layout is applied on save and undone on read.
The metadata carries everything needed to reproduce the run (``bierasing`` JSON) plus the kohya
``ss_*`` fields other tools display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..io import load_safetensors, save_safetensors
from .adapters import AdapterSet, attach_from_tensors

PREFIX = "lora_unet_"
PEFT_PREFIX = "transformer."
LAYOUTS = ("kohya", "peft")


def kohya_name(module_name: str) -> str:
    return PREFIX + module_name.replace(".", "_")


#: file precisions of an erasure's weights (``EraseConfig.save_precision``)
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def erasure_tensors(adapters: AdapterSet, rename: dict[str, str] | None = None,
                    precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Adapter weights under kohya keys, in ``precision`` (alphas stay fp32); ``rename`` maps module
    names first (ComfyUI's LDM names -> diffusers names, so files from both paths are the same format)."""
    if precision not in SAVE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(SAVE_DTYPES)}; got {precision!r}")
    dt = SAVE_DTYPES[precision]
    out = {}
    for name, layer in adapters.layers.items():
        key = kohya_name((rename or {}).get(name, name))
        if layer.rank == 0:
            out[f"{key}.diff"] = layer.delta.detach().to(dt)
        else:
            out[f"{key}.lora_down.weight"] = layer.down.detach().to(dt)
            out[f"{key}.lora_up.weight"] = layer.up.detach().to(dt)
            out[f"{key}.alpha"] = torch.tensor(layer.alpha)
    return out


def peft_tensors(tensors: dict[str, torch.Tensor], module_names) -> dict[str, torch.Tensor]:
    """kohya-form erasure tensors -> the ``peft`` layout (module docstring); ``module_names`` are the
    model's dotted module names, which the kohya keys flatten."""
    by_kohya = {kohya_name(n): n for n in module_names}
    out = {}
    for key, v in tensors.items():
        stem, _, suffix = key.partition(".")
        if stem not in by_kohya:
            raise ValueError(f"{key!r} names no module of this model")
        name = PEFT_PREFIX + by_kohya[stem]
        if suffix == "lora_down.weight":
            out[f"{name}.lora_A.weight"] = v
        elif suffix == "lora_up.weight":
            rank = v.shape[1]
            alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else rank
            out[f"{name}.lora_B.weight"] = (v.float() * (alpha / rank)).to(v.dtype)
        elif suffix == "diff":
            out[f"{name}.diff"] = v
        elif suffix != "alpha":
            raise ValueError(f"unsupported key suffix in {key!r}")
    return out


def kohya_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`peft_tensors` (an ``.alpha`` key, where a file has one, is kept)."""
    out = {}
    for key, v in tensors.items():
        body = key[len(PEFT_PREFIX):]
        for peft, kohya in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                            (".diff", "diff"), (".alpha", "alpha")):
            if body.endswith(peft):
                out[f"{kohya_name(body[:-len(peft)])}.{kohya}"] = v
                break
        else:
            raise ValueError(f"unsupported key {key!r} (expected .lora_A.weight, .lora_B.weight, .alpha or .diff)")
    for key, v in list(out.items()):
        stem = key.partition(".")[0]
        if key.endswith(".lora_down.weight") and f"{stem}.alpha" not in out:
            out[f"{stem}.alpha"] = torch.tensor(float(v.shape[0]))
    return out


def peft_module_names(keys) -> list[str]:
    """The dotted module names that ``peft``-layout keys (``transformer.<name>.<suffix>``) adapt."""
    return sorted({k[len(PEFT_PREFIX):].rsplit(".", 2 if ".lora_" in k else 1)[0] for k in keys})


def in_kohya_form(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str] | None]:
    """(kohya-form tensors, layout, module names for ``peft``) of erasure tensors in either layout."""
    if tensors and all(k.startswith(PEFT_PREFIX) for k in tensors):
        return kohya_tensors(tensors), "peft", peft_module_names(tensors)
    return tensors, "kohya", None


def file_layout(paths) -> tuple[str, list[str] | None]:
    """(layout, dotted module names for ``peft``) shared by erasure files (keys only are read); files of
    both layouts together are refused."""
    from safetensors import safe_open

    layouts, names = set(), set()
    for p in paths:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
        peft = bool(keys) and all(k.startswith(PEFT_PREFIX) for k in keys)
        layouts.add("peft" if peft else "kohya")
        if peft:
            names |= set(peft_module_names(keys))
    if len(layouts) > 1:
        raise ValueError("these erasures are for different model families (FLUX's transformer.* keys and a UNet's "
                         "lora_unet_* keys); combine erasures of one model")
    layout = layouts.pop() if layouts else "kohya"
    return layout, sorted(names) if layout == "peft" else None


def save_erasure(path: str | os.PathLike, adapters: AdapterSet, info: dict,
                 rename: dict[str, str] | None = None, precision: str = "fp32", layout: str = "kohya") -> Path:
    """Atomically write the erasure; ``info`` (method, concepts, hyper-parameters...) goes to metadata."""
    names = [(rename or {}).get(n, n) for n in adapters.layers]
    return save_erasure_tensors(path, erasure_tensors(adapters, rename, precision), info, layout, names)


def save_erasure_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict,
                         layout: str = "kohya", module_names=None) -> Path:
    """Write kohya-form ``tensors`` in ``layout`` (``peft`` needs the ``module_names`` they flatten)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"erasures are saved as .safetensors, got {path.name!r}")
    if not tensors or not all(k.startswith(PREFIX) for k in tensors):
        raise ValueError(f"not an erasure: tensor keys must start with {PREFIX!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_down.weight")} or {0}
    if layout == "peft":
        tensors = peft_tensors(tensors, module_names or ())
    meta = {"bierasing": json.dumps(info, default=str), "format": "pt",
            "ss_network_module": "networks.lora" if ranks != {0} else "diff",
            "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(ranks)),
            "modelspec.title": str(info.get("title", path.stem))}
    keep = lambda v: v if v.dtype in SAVE_DTYPES.values() else v.float()  # noqa: E731 (fp32/fp16/bf16 as given)
    save_safetensors(path, {k: keep(v.detach()).contiguous() for k, v in tensors.items()}, meta)
    return path


def read_erasure(path: str | os.PathLike, keep_layout: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(kohya-form tensors, the run's info) of an erasure or LoRA file in either layout; with
    ``keep_layout`` the tensors as the file holds them (what ComfyUI's LoraLoader is given)."""
    raw, meta = load_safetensors(path)
    tensors = in_kohya_form(raw)[0]
    if not tensors or not all(k.startswith(PREFIX) for k in tensors):
        raise ValueError(f"{Path(path).name} is not a LoRA this loader reads (keys must start with {PREFIX!r} "
                         f"or, for FLUX, {PEFT_PREFIX!r}); give an erasure file written by bierasing or "
                         "another such LoRA")
    info = json.loads(meta["bierasing"]) if "bierasing" in meta else {}
    return (raw if keep_layout else tensors), info


def _module_index(unet: nn.Module) -> dict[str, str]:
    return {kohya_name(n): n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _check_shape(path, key: str, suffix: str, v: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse a tensor that cannot fit its layer before anything is attached to the UNet."""
    w = tuple(weight.shape)
    if suffix == "alpha":
        ok = v.numel() == 1
    elif suffix == "diff":
        ok = tuple(v.shape) == w
    elif suffix == "lora_down.weight":  # [rank, in, (k, k)]
        ok = v.ndim == len(w) and tuple(v.shape[1:]) == w[1:]
    else:  # lora_up.weight: [out, rank, (1, 1)]
        ok = v.ndim == len(w) and v.shape[0] == w[0] and tuple(v.shape[2:]) == (1,) * (len(w) - 2)
    if suffix in ("diff", "alpha", "lora_down.weight", "lora_up.weight") and not ok:
        raise ValueError(f"{Path(path).name}: {key!r} has shape {tuple(v.shape)}, which does not fit this UNet's "
                         f"layer of shape {w} (made for another architecture?); load it with the model it was made for")


def load_erasure(unet: nn.Module, path: str | os.PathLike | tuple[dict, dict], strength: float = 1.0
                 ) -> tuple[AdapterSet, dict]:
    """Attach a saved erasure (a file, or its (tensors, info)) to ``unet`` as adapters (the erased
    model's exact forward pass)."""
    tensors, info = path if isinstance(path, tuple) else read_erasure(path)
    if isinstance(path, tuple):
        path = "(this run's erasure)"
    index = _module_index(unet)
    own, alphas = {}, {}
    for key, v in tensors.items():
        stem, _, suffix = key.partition(".")
        if stem not in index:
            raise ValueError(f"{Path(path).name}: key {key!r} matches no layer of this UNet "
                             "(was it made for another architecture?); load it with the model it was made for")
        name = index[stem]
        _check_shape(path, key, suffix, v, unet.get_submodule(name).weight)
        if suffix == "lora_down.weight":
            own[f"{name}.down"] = v
        elif suffix == "lora_up.weight":
            own[f"{name}.up"] = v
        elif suffix == "diff":
            own[f"{name}.delta"] = v
        elif suffix == "alpha":
            alphas[name] = float(v)
        else:
            raise ValueError(f"{Path(path).name}: unsupported key suffix in {key!r}")
    adapters = attach_from_tensors(unet, own, alphas)
    adapters.set_multiplier(strength)
    return adapters, info


def merge_erasure(unet: nn.Module, path: str | os.PathLike | tuple[dict, dict], strength: float = 1.0,
                  originals: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Add a saved erasure into the UNet's weights in place (what LoraLoader does); ``originals``
    collects (the weight, a copy of it) before its first change, to restore it exactly."""
    adapters, info = load_erasure(unet, path, strength)
    with torch.no_grad():
        for name, layer in adapters.layers.items():
            if originals is not None and name not in originals:
                originals[name] = (layer.base.weight, layer.base.weight.detach().clone())
            layer.base.weight += strength * layer.delta_weight().to(layer.base.weight)
    adapters.remove(unet)
    return info
