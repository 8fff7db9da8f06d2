"""Random-weight stand-ins for the model files the shipped templates name, so anyone can open and run
every template in a ComfyUI install without downloading a model (the images they draw are noise).

    python -m bierasing standins --comfyui ~/ComfyUI        (with ComfyUI's Python)

Writes, only where no file of that name exists (never over a user's file):
  models/checkpoints/v1-5-pruned-emaonly.safetensors and tiny_sd15.safetensors: the smallest UNet
      ComfyUI detects as SD1.5 (one level, 25.8 M parameters) + a full-size CLIP-L + TAESD
  models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors: a full-size ViT-H/14 (632 M, fp16,
      1.3 GB; ComfyUI picks the vision config from the layer count, so it cannot be smaller)
  models/ipadapter/ip-adapter_sd15.safetensors: IP-Adapter SD1.5 tensors for that UNet
  models/checkpoints/sd_xl_base_1.0.safetensors: the smallest SDXL-family UNet ComfyUI detects
      (:data:`TINY_SDXL_UNET`) + full-size CLIP-L and bigG + TAESD, fp16 (1.9 GB); --no-sdxl skips it
  models/ipadapter/ip-adapter_sdxl_vit-h.safetensors: IP-Adapter SDXL (ViT-H) tensors for that UNet
  input/exemplars/dog/: four exemplar images with masks
Every file carries the metadata ``bierasing_standin``; ``--remove`` deletes exactly those files.
ComfyUI's own classes build the tensors, so this module imports ComfyUI, and only when called.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

STANDIN_KEY = "bierasing_standin"
STANDIN_TAG = {STANDIN_KEY: "random weights for trying workflows; not a model"}
CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "tiny_sd15.safetensors")
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
IP_ADAPTER = "ip-adapter_sd15.safetensors"
SDXL_IP_ADAPTER = "ip-adapter_sdxl_vit-h.safetensors"
EXEMPLARS = Path("exemplars") / "dog"

#: the smallest UNet config ComfyUI's model detection still calls SD15
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}


#: the smallest SDXL-family UNet ComfyUI detects (as Segmind Vega, an SDXL distillation: SDXL's model
#: class, conditioning and CLIP): 320 channels, 2048-d context, 2816-d added conditions, linear
#: projections, transformer depth [0, 0, 1, 1, 2, 2]; the channel multipliers shrink to 1
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


def import_comfyui(comfyui: str | os.PathLike) -> None:
    """Make ``comfyui``'s packages importable (a ComfyUI checkout: the folder holding main.py)."""
    root = Path(comfyui).expanduser().resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise ValueError(f"{root} is not a ComfyUI folder (no comfy/model_patcher.py); give the folder "
                         "that holds ComfyUI's main.py")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from comfy.cli_args import args

        args.cpu = True  # weights are built on the CPU; argv is not parsed when ComfyUI is imported
        import comfy.supported_models  # noqa: F401
    except ImportError as e:
        raise ValueError(f"cannot import ComfyUI from {root} ({e}); run this with ComfyUI's Python") from None


@torch.no_grad()
def randomize(sd: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """In place: matrices N(0, 0.02), norm weights 1, everything else 0 (a stable random network)."""
    for k, t in sd.items():
        if not t.is_floating_point():
            continue
        if t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        elif (t.dim() == 1 and k.endswith(".weight")) or k.endswith("vae_scale"):
            t.fill_(1.0)
        else:
            t.zero_()


def checkpoint_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """A single-file SD1.5 checkpoint (tiny UNet, CLIP-L, TAESD) and its number of attn2 layers."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    cfg = comfy.supported_models.SD15(dict(TINY_UNET))
    model = cfg.get_model({})
    unet_sd = model.diffusion_model.state_dict()
    clip_sd = comfy.sd1_clip.SD1ClipModel().state_dict()
    vae_sd = comfy.taesd.taesd.TAESD().state_dict()
    for sd in (unet_sd, clip_sd, vae_sd):
        randomize(sd, gen)
    out = dict(cfg.process_unet_state_dict_for_saving(unet_sd))
    out.update(cfg.process_clip_state_dict_for_saving(
        {(k if k.startswith("clip_l.") else "clip_l." + k): v for k, v in clip_sd.items()}))
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out.update(cfg.process_vae_state_dict_for_saving(vae_sd))
    n_attn2 = sum(1 for n, _ in model.diffusion_model.named_modules() if n.endswith("attn2"))
    return {k: v.contiguous() for k, v in out.items()}, n_attn2


def sdxl_checkpoint_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """A single-file SDXL-family checkpoint (:data:`TINY_SDXL_UNET`, full-size CLIP-L + bigG as ComfyUI
    builds them, TAESD) in fp16, and its number of attn2 layers."""
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    cfg = comfy.supported_models.Segmind_Vega(dict(TINY_SDXL_UNET))
    model = cfg.get_model({})
    unet_sd = model.diffusion_model.state_dict()
    clip_sd = comfy.sdxl_clip.SDXLClipModel(dtype=torch.float32).state_dict()
    vae_sd = comfy.taesd.taesd.TAESD().state_dict()
    for sd in (unet_sd, clip_sd, vae_sd):
        randomize(sd, gen)
    out = dict(cfg.process_unet_state_dict_for_saving(unet_sd))
    out.update(cfg.process_clip_state_dict_for_saving(clip_sd))
    out.update(cfg.process_vae_state_dict_for_saving(vae_sd))
    n_attn2 = sum(1 for n, _ in model.diffusion_model.named_modules() if n.endswith("attn2"))
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in out.items()}, n_attn2


def ip_adapter_tensors(n_attn2: int, seed: int = 0, inner_dim: int = 320, context_dim: int = 768,
                       embed_dim: int = 1024) -> dict[str, torch.Tensor]:
    """IP-Adapter layout (SD1.5: 768-d context; SDXL: 2048-d): image_proj (4 tokens from an ``embed_dim``
    image embedding, 1024 = ViT-H) and ip_adapter.{1,3,5,...}.to_{k,v}_ip for each attn2 in order."""
    gen = torch.Generator().manual_seed(seed + 1)
    ip = {"image_proj.proj.weight": torch.randn(4 * context_dim, embed_dim, generator=gen) * 0.02,
          "image_proj.proj.bias": torch.zeros(4 * context_dim),
          "image_proj.norm.weight": torch.ones(context_dim), "image_proj.norm.bias": torch.zeros(context_dim)}
    for i in range(n_attn2):
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"ip_adapter.{2 * i + 1}.{part}.weight"] = torch.randn(inner_dim, context_dim, generator=gen) * 0.02
    return ip


def vit_h_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full-size ViT-H/14 CLIP vision model in the key layout ComfyUI's CLIPVisionLoader detects (fp16)."""
    import json

    import comfy.clip_model
    import comfy.ops

    config = json.loads((Path(comfy.clip_model.__file__).parent / "clip_vision_config_h.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(seed + 2)
    out = {}
    for k, t in model.state_dict().items():
        one = {k: torch.empty(t.shape, dtype=torch.float32)}
        randomize(one, gen)
        out[k] = one[k].to(torch.float16)
    return out


def exemplar_pictures(seed: int = 0, n: int = 4, size: int = 128) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, BGR uint8 image, uint8 mask): an ellipse (the 'concept') on a textured background."""
    import cv2

    rng = np.random.default_rng(seed)
    pics = []
    for i in range(n):
        img = (rng.random((size, size, 3)) * 80 + 60).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        centre = tuple(int(c) for c in rng.integers(size // 3, 2 * size // 3, 2))
        axes = tuple(int(a) for a in rng.integers(size // 6, size // 3, 2))
        cv2.ellipse(mask, centre, axes, float(rng.integers(0, 180)), 0, 360, 255, -1)
        img[mask > 0] = rng.integers(120, 255, 3)
        pics.append((f"dog_{i:02d}", img, mask))
    return pics


def is_standin(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return path.with_name(path.name + ".standin").is_file()
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return STANDIN_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001  not a safetensors file: not ours
        return False


def planned_files(comfyui: str | os.PathLike) -> list[Path]:
    root = Path(comfyui).expanduser().resolve()
    models = root / "models"
    files = [models / "checkpoints" / n for n in CHECKPOINTS]
    files += [models / "clip_vision" / VISION, models / "ipadapter" / IP_ADAPTER]
    files += [models / "checkpoints" / SDXL_CHECKPOINT, models / "ipadapter" / SDXL_IP_ADAPTER]
    folder = root / "input" / EXEMPLARS
    for name, _, _ in exemplar_pictures():
        files += [folder / f"{name}.png", folder / f"{name}_mask.png"]
    return files


def write_standins(comfyui: str | os.PathLike, seed: int = 0, vision: bool = True, sdxl: bool = True,
                   log=print) -> list[Path]:
    """Write the stand-ins that are missing; returns the files written. Existing files are kept."""
    import cv2

    from .io import atomic_write_bytes, save_safetensors

    import_comfyui(comfyui)
    written = []
    todo = [p for p in planned_files(comfyui) if not p.exists()]
    for p in planned_files(comfyui):
        if p.exists():
            log(f"kept {p} (exists{', a stand-in' if is_standin(p) else ''})")
    if not vision:
        todo = [p for p in todo if p.name != VISION]
    if not sdxl:
        todo = [p for p in todo if p.name not in (SDXL_CHECKPOINT, SDXL_IP_ADAPTER)]
    names = {p.name for p in todo}
    n_attn2 = None
    if names & set(CHECKPOINTS) or IP_ADAPTER in names:
        ckpt, n_attn2 = checkpoint_tensors(seed)
        for p in todo:
            if p.name in CHECKPOINTS:
                save_safetensors(p, ckpt, STANDIN_TAG)
                written.append(p)
        del ckpt
    if {SDXL_CHECKPOINT, SDXL_IP_ADAPTER} & names:
        log("building an SDXL-family stand-in with full-size CLIP-L and bigG (1.9 GB, about a minute)...")
        ckpt, n_attn2_xl = sdxl_checkpoint_tensors(seed)
        for p in todo:
            if p.name == SDXL_CHECKPOINT:
                save_safetensors(p, ckpt, STANDIN_TAG)
                written.append(p)
            elif p.name == SDXL_IP_ADAPTER:
                save_safetensors(p, ip_adapter_tensors(n_attn2_xl, seed, 320, 2048, 1024), STANDIN_TAG)
                written.append(p)
        del ckpt
    for p in todo:
        if p.name in (SDXL_CHECKPOINT, SDXL_IP_ADAPTER):
            continue
        if p.name == IP_ADAPTER:
            save_safetensors(p, ip_adapter_tensors(n_attn2, seed), STANDIN_TAG)
        elif p.name == VISION:
            log("building a full-size ViT-H/14 with random weights (1.3 GB, about a minute)...")
            save_safetensors(p, vit_h_tensors(seed), STANDIN_TAG)
        elif p.suffix == ".png":
            pics = {name: (img, mask) for name, img, mask in exemplar_pictures(seed)}
            img, mask = pics[p.stem.removesuffix("_mask")]
            ok, buf = cv2.imencode(".png", mask if p.stem.endswith("_mask") else img)
            atomic_write_bytes(p, buf.tobytes())
            atomic_write_bytes(p.with_name(p.name + ".standin"), b"written by bierasing standins\n")
        else:
            continue
        written.append(p)
    for p in written:
        log(f"wrote {p}")
    return written


def remove_standins(comfyui: str | os.PathLike, log=print) -> list[Path]:
    """Delete the stand-ins this module wrote (recognised by their metadata or marker); nothing else."""
    removed = []
    for p in planned_files(comfyui):
        if p.is_file() and is_standin(p):
            p.unlink()
            p.with_name(p.name + ".standin").unlink(missing_ok=True)
            removed.append(p)
            log(f"removed {p}")
    return removed
