"""Stable Diffusion XL from one ``.safetensors`` file in the original SGM layout (what ComfyUI and A1111
users have: ``model.diffusion_model.*``, ``first_stage_model.*``, CLIP-L under
``conditioner.embedders.0.transformer.*`` and OpenCLIP bigG under ``conditioner.embedders.1.model.*``),
converted offline with diffusers' own converters and the SDXL base configs the package ships
(``bierasing/configs/sdxl``)::

    bb = load_sdxl_single_file("sd_xl_base_1.0.safetensors")

:func:`build_sdxl_single_file` writes a tiny random SDXL-architecture single file (with its diffusers
original and config folder) for tests. Only safetensors are read; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .single_file import (CONFIGS, UNET_PREFIX, VAE_PREFIX, _fill, _header, _read_config, _unet_to_ldm,
                          _vae_to_ldm, clip_tokenizer)

SDXL_CONFIG = CONFIGS / "sdxl"
TEXT_L_PREFIX = "conditioner.embedders.0.transformer."
TEXT_G_PREFIX = "conditioner.embedders.1.model."
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def sdxl_problem(path: str | os.PathLike) -> str | None:
    """None if ``path`` is an SDXL base-architecture single file (from its header), else what it is."""
    keys = _header(Path(path)).keys()
    if not any(k.startswith(TEXT_G_PREFIX) for k in keys):
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            return "is the SDXL refiner (one OpenCLIP text encoder); erase from the SDXL base model"
        return "is not an SDXL checkpoint (no conditioner.embedders.1.model.* keys)"
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_L_PREFIX, "CLIP-L text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            return f"has no {what} ({prefix}* keys)"
    return None


def is_sdxl_single_file(path: str | os.PathLike) -> bool:
    try:
        return sdxl_problem(path) is None
    except Exception:  # noqa: BLE001  an unreadable header is judged elsewhere
        return False


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()  # noqa: SIM118 - a safe_open handle is not iterable
                if k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_L_PREFIX, TEXT_G_PREFIX))}


def load_sdxl_single_file(path: str | os.PathLike, ip_adapter: str | os.PathLike | None = None,
                          image_encoder: str | os.PathLike | None = None, resolution: int = 1024,
                          device: str = "cpu", dtype: torch.dtype = torch.float32,
                          config: str | os.PathLike | None = None, image_normalization: str = "bi-erasing"):
    """An :class:`~bierasing.sdxl.SDXLBackbone` from an SDXL single-file ``.safetensors``; ``config`` is a
    folder of ``unet/ vae/ text_encoder/ text_encoder_2/ scheduler/`` configs (default: SDXL base's,
    shipped). Tokenizers come from ``tokenizer(_2)/`` there, or from the shipped CLIP BPE file."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .sdxl import SDXLBackbone

    path = Path(path).expanduser()
    problem = sdxl_problem(path)
    if problem:
        raise ValueError(f"{path} {problem}")
    cfg_dir = Path(config).expanduser() if config is not None else SDXL_CONFIG
    cfgs = {sub: _read_config(cfg_dir, sub) for sub in _COMPONENTS}
    ckpt = _load(path)
    unet = _fill(lambda: UNet2DConditionModel.from_config(cfgs["unet"]),
                 sfu.convert_ldm_unet_checkpoint(ckpt, cfgs["unet"]), dtype, "UNet", path)
    vae = _fill(lambda: AutoencoderKL.from_config(cfgs["vae"]), sfu.convert_ldm_vae_checkpoint(ckpt, cfgs["vae"]),
                dtype, "VAE", path)
    l_cfg = CLIPTextConfig.from_json_file(str(cfg_dir / "text_encoder" / "config.json"))
    l_sd = sfu.convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if k.startswith(TEXT_L_PREFIX)},
                                           remove_prefix=TEXT_L_PREFIX)
    text_l = _fill(lambda: CLIPTextModel(l_cfg), l_sd, dtype, "CLIP-L text encoder", path)
    g_cfg = CLIPTextConfig.from_json_file(str(cfg_dir / "text_encoder_2" / "config.json"))
    with torch.device("meta"):
        shape_only = CLIPTextModelWithProjection(g_cfg)
    g_sd = sfu.convert_open_clip_checkpoint(shape_only, ckpt, prefix=TEXT_G_PREFIX)
    text_g = _fill(lambda: CLIPTextModelWithProjection(g_cfg), g_sd, dtype, "OpenCLIP bigG text encoder", path)
    del ckpt
    sched = DDPMScheduler.from_config(cfgs["scheduler"])
    toks = [CLIPTokenizer.from_pretrained(cfg_dir / sub) if (cfg_dir / sub).is_dir() else clip_tokenizer(pad_token=pad)
            for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    return SDXLBackbone.assemble_xl(toks, [text_l, text_g], unet, vae, sched, ip_adapter, image_encoder,
                                    resolution, device, dtype, image_normalization)


# ---- the inverse, for stand-ins -------------------------------------------------------------------
def _open_clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModelWithProjection`` tensors -> OpenCLIP layout under :data:`TEXT_G_PREFIX`: the
    inverse of diffusers' ``convert_open_clip_checkpoint`` (its own name tables, reversed)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in table["layers"]:
            out[TEXT_G_PREFIX + table["layers"][k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        if k.endswith("position_ids"):
            continue
        new = k
        for hf, ldm in table["transformer"].items():
            new = new.replace(hf, ldm)
        for part in ("q_proj", "k_proj", "v_proj"):
            if f".{part}." in new:
                stem, param = new.split(f".{part}.")
                qkv.setdefault((stem, param), {})[part] = v
                break
        else:
            out[TEXT_G_PREFIX + "transformer." + new] = v
    for (stem, param), parts in qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
        out[f"{TEXT_G_PREFIX}transformer.{stem}.in_proj_{param}"] = fused
    return out


def build_sdxl_single_file(path: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """The tiny SDXL stand-in of :func:`bierasing.standins.build_sdxl_folder` as one SGM-layout file
    ``path``, with ``<stem>_config/`` (configs + tokenizers for ``load_sdxl_single_file(config=...)``)
    and ``<stem>_diffusers/`` (the original, image encoder and IP-Adapter SDXL file).
    Returns ``{"checkpoint", "config", "diffusers", "ip_adapter", "image_encoder"}``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .io import save_safetensors
    from .standins import build_sdxl_folder

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the stand-in single file must end in .safetensors")
    original, config = path.parent / f"{path.stem}_diffusers", path.parent / f"{path.stem}_config"
    got = build_sdxl_folder(original, seed=seed)
    unet = UNet2DConditionModel.from_pretrained(original / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(original / "vae", use_safetensors=True)
    text_l = CLIPTextModel.from_pretrained(original / "text_encoder", use_safetensors=True)
    text_g = CLIPTextModelWithProjection.from_pretrained(original / "text_encoder_2", use_safetensors=True)
    out = _unet_to_ldm(unet.state_dict(), unet.config)
    out.update(_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    out.update({TEXT_L_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
                for k, v in text_l.state_dict().items()})
    out.update(_open_clip_to_ldm(text_g.state_dict()))
    save_safetensors(path, {k: v.detach().contiguous().clone() for k, v in out.items()})
    if config.exists():
        shutil.rmtree(config)
    for sub in (*_COMPONENTS, "tokenizer", "tokenizer_2"):
        shutil.copytree(original / sub, config / sub, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (config / "README.md").write_text("Configs of the tiny SDXL stand-in (bierasing.single_file_xl).\n")
    return {"checkpoint": path, "config": config, "diffusers": original, "ip_adapter": got["ip_adapter"],
            "image_encoder": got["image_encoder"]}


def write_sdxl_configs(folder: str | os.PathLike = SDXL_CONFIG) -> None:
    """Write SDXL base's component configs (no weights) into ``folder``: what the package ships."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .standins import sdxl_unet_config

    folder = Path(folder)
    with torch.device("meta"):
        UNet2DConditionModel(**sdxl_unet_config("full")).save_config(folder / "unet")
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                      sample_size=1024, scaling_factor=0.13025).save_config(folder / "vae")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, steps_offset=1).save_config(folder / "scheduler")
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)
    for sub, cfg in (("text_encoder", CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, hidden_act="quick_gelu",
                                                     projection_dim=768, **common)),
                     ("text_encoder_2", CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                       num_attention_heads=20, hidden_act="gelu",
                                                       projection_dim=1280, **common))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(str(folder / sub / "config.json"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}, indent=2) + "\n")
