"""Load a model for erasure from what a user has on disk: the one place that knows which model
families exist (the engine, job and scorer see only the :class:`Backbone`).

    load_backbone("shapesworld")                          # the shipped toy world (UNet)
    load_backbone("shapesworld-flow")                     # the shipped flow world (FLUX layout)
    load_backbone("runs/world/model")                     # a ShapesWorld folder (world.json)
    load_backbone("sd15/", ip_adapter="ip-adapter_sd15.safetensors", image_encoder="image_encoder/")
    load_backbone("FLUX.1-dev/", ip_adapter="flux1-redux-dev.safetensors", image_encoder="siglip/")

FLUX.1 comes as a diffusers pipeline folder; SD1.x as a diffusers pipeline folder or a single-file checkpoint (converted with diffusers
from the SD1.5 config the package ships). Nothing is downloaded and only safetensors weights are
read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .io import _PICKLE_SUFFIXES

SUPPORTED = ("'shapesworld' or 'shapesworld-flow'", "a ShapesWorld model folder",
             "a diffusers SD1.x, SDXL or FLUX.1 pipeline folder",
             "a single-file SD1.x or SDXL .safetensors checkpoint")


def model_kind(model: str | os.PathLike | None) -> str:
    """'world', 'sd1' / 'sdxl' / 'flux' (diffusers folders) or 'sd1_file' / 'sdxl_file' (single files) for what
    ``model`` names; a clear error for anything else."""
    if model in (None, "", "shapesworld", "shapesworld-flow"):
        return "world"
    path = Path(model).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{model}: pickled checkpoints can run code when loaded and are never read; "
                         "convert it to .safetensors or give a diffusers folder")
    if not path.exists():
        raise ValueError(f"{model!r} does not exist; give 'shapesworld' or a path to "
                         + ", ".join(SUPPORTED[1:]))
    if path.is_dir() and (path / "world.json").is_file():
        return "world"
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from .single_file import check_sd1_single_file
        from .single_file_xl import is_sdxl_single_file

        if is_sdxl_single_file(path):  # these read the header only
            return "sdxl_file"
        _refuse_refiner(path)
        check_sd1_single_file(path)
        return "sd1_file"
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        cls = json.loads((path / "transformer" / "config.json").read_text()).get("_class_name")
        if cls != "FluxTransformer2DModel":
            raise ValueError(f"{path} holds a {cls}; of the transformer models this version erases FLUX.1 "
                             "(FluxTransformer2DModel)")
        return "flux"
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        return _unet_kind(json.loads((path / "unet" / "config.json").read_text()), path)
    raise ValueError(f"{model!r} is not a model this command can load; give one of: {', '.join(SUPPORTED)}")


def _refuse_refiner(path: Path) -> None:
    from .single_file_xl import sdxl_problem

    try:
        problem = sdxl_problem(path)
    except Exception:  # noqa: BLE001  an unreadable file: check_sd1_single_file says so
        return
    if problem and "refiner" in problem:
        raise ValueError(f"{path} {problem}")


def _unet_kind(cfg: dict, path: Path) -> str:
    width, extra = cfg.get("cross_attention_dim"), cfg.get("addition_embed_type")
    if extra == "text_time" and cfg.get("in_channels", 4) == 4:
        if cfg.get("projection_class_embeddings_input_dim") == 2560:  # 1280 pooled + 5 aesthetic-score ids
            raise ValueError(f"{path} holds the SDXL refiner; erase from the SDXL base model (or a fine-tune "
                             "of it), then use the refiner as usual")
        return "sdxl"
    if width == 768 and cfg.get("in_channels", 4) == 4 and not extra:
        return "sd1"
    what = "SD2.x" if width == 1024 else f"a UNet with {width}-d cross-attention"
    raise ValueError(f"{path} holds {what}; this version erases from ShapesWorld, SD1.x and SDXL models")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_dtype(name: str, device: str, kind: str) -> torch.dtype:
    """The weights' dtype for ``name``; adapters and optimiser state stay fp32 whatever this is.
    "auto" is fp32, except FLUX on a GPU: bf16 (fp16 where the GPU lacks it), since its transformer
    alone is 47.6 GB in fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    if kind != "flux" or not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_backbone(model: str | os.PathLike | None = "shapesworld", ip_adapter: str | os.PathLike | None = None,
                  image_encoder: str | os.PathLike | None = None, resolution: int = 512,
                  device: str | None = None, config: str | os.PathLike | None = None, dtype: str = "auto"):
    """The :class:`~bierasing.backbone.Backbone` for ``model``, with its image branch where given;
    ``config`` is the diffusers config folder of a single-file checkpoint (default: SD1.5's, shipped);
    ``dtype`` the real model's weights (:func:`model_dtype`; ShapesWorld is always fp32)."""
    kind = model_kind(model)
    device = device or default_device()
    dt = model_dtype(dtype, device, kind)
    if kind == "world":
        if ip_adapter or image_encoder:
            raise ValueError("ShapesWorld brings its own image branch; drop --ip-adapter / --image-encoder")
        from .world.models import ShapesWorldBackbone

        return ShapesWorldBackbone.load(model or None, device=device)
    for name, p, want in (("--ip-adapter", ip_adapter, "file"), ("--image-encoder", image_encoder, "dir")):
        if p is not None and not (Path(p).is_file() if want == "file" else Path(p).is_dir()):
            raise ValueError(f"{name} {p}: no such {'file' if want == 'file' else 'folder'}")
    if ip_adapter is not None and Path(ip_adapter).suffix.lower() != ".safetensors":
        raise ValueError(f"--ip-adapter {ip_adapter}: only .safetensors adapters are read (pickled files can run code)")
    if kind == "sd1_file":
        from .single_file import load_sd1_single_file

        return load_sd1_single_file(Path(model).expanduser(), ip_adapter=ip_adapter, image_encoder=image_encoder,
                                    resolution=resolution, device=device, config=config, dtype=dt)
    if kind == "sdxl_file":
        from .single_file_xl import load_sdxl_single_file

        return load_sdxl_single_file(Path(model).expanduser(), ip_adapter=ip_adapter, image_encoder=image_encoder,
                                     resolution=resolution, device=device, config=config, dtype=dt)
    if kind == "flux":
        from .flux1 import FluxBackbone

        return FluxBackbone.from_pretrained(Path(model).expanduser(), ip_adapter=ip_adapter,
                                            image_encoder=image_encoder, resolution=resolution, device=device,
                                            dtype=dt)
    if kind == "sdxl":
        from .sdxl import SDXLBackbone

        return SDXLBackbone.from_pretrained(Path(model).expanduser(), ip_adapter=ip_adapter,
                                            image_encoder=image_encoder, resolution=resolution, device=device,
                                            dtype=dt)
    from .sd15 import SD15Backbone

    return SD15Backbone.from_pretrained(Path(model).expanduser(), ip_adapter=ip_adapter,
                                        image_encoder=image_encoder, resolution=resolution, device=device, dtype=dt)
