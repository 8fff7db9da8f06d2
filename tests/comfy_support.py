"""Real ComfyUI for tests: import it as a library (CPU) and build architecture-true stand-ins.

Used only when COMFYUI_PATH points at a ComfyUI checkout and the tests run with a Python that has
ComfyUI's requirements (e.g. ``COMFYUI_PATH=~/ComfyUI ~/ComfyUI/.venv/bin/python -m pytest -m comfyui``).
Stand-ins are built at test time from ComfyUI's own classes with seeded random weights: the smallest
UNet ComfyUI detects as SD15 (model_channels 320, one level), full CLIP-L, TAESD; an IP-Adapter SD1.5
file with the real key names for that UNet; a small CLIP vision model with ViT-H's 1024-d output.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
from pathlib import Path

import torch

COMFY = os.environ.get("COMFYUI_PATH", "")
REPO = Path(__file__).resolve().parents[1]
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}
SMALL_VISION = {"hidden_act": "gelu", "hidden_size": 64, "image_size": 224, "intermediate_size": 128,
                "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 4,
                "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 1024}


def comfy_available() -> str | None:
    """None if usable, else why not."""
    if not COMFY or not (Path(COMFY) / "comfy" / "model_patcher.py").is_file():
        return "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout and run with its Python"
    try:
        import torchvision  # noqa: F401  ComfyUI imports it at module level
        import aiohttp  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"this Python lacks ComfyUI's requirements ({e}); run the tests with ComfyUI's venv"
    return None


_NODES = None


def load_comfy():
    """ComfyUI's ``nodes`` module with this pack loaded (once per process)."""
    global _NODES
    if _NODES is not None:
        return _NODES
    sys.path.insert(0, COMFY)
    os.chdir(COMFY)
    from comfy.cli_args import args

    args.cpu = True  # argv is not parsed when ComfyUI is imported as a library
    import utils.extra_config  # noqa: F401  (before nodes/server: ComfyUI's sys.path shadowing)
    import utils.install_util  # noqa: F401

    import nodes
    import server

    async def _load():
        if getattr(server.PromptServer, "instance", None) is None:
            loop = asyncio.get_running_loop()
            if "asset_manager" in inspect.signature(server.PromptServer.__init__).parameters:  # newer ComfyUI
                from app.assets.manager import default_asset_manager

                server.PromptServer(loop, default_asset_manager())
            else:  # 0.3.x
                server.PromptServer(loop)
        if not await nodes.load_custom_node(str(REPO), module_parent="custom_nodes"):
            raise RuntimeError("the Bi-Erasing pack failed to import into ComfyUI (see the log)")

    asyncio.run(_load())
    _NODES = nodes
    return nodes


def pack(submodule: str):
    """A module of this pack as ComfyUI loaded it (its ``nodes`` package is not the top-level
    ``nodes``: that name is ComfyUI's own nodes.py)."""
    for name, m in list(sys.modules.items()):
        f = getattr(m, "__file__", None)
        if name.endswith(submodule) and f and Path(f).resolve().is_relative_to(REPO):
            return m
    raise LookupError(f"the pack's {submodule} is not loaded; loaded: "
                      f"{[n for n in sys.modules if n.endswith(submodule.split('.')[-1])]}")


@torch.no_grad()
def _reinit(sd: dict, gen: torch.Generator) -> None:
    for k, t in sd.items():
        if not t.is_floating_point():
            continue
        if t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        elif t.dim() == 1 and k.endswith(".weight"):
            t.fill_(1.0)
        elif k.endswith("vae_scale"):
            t.fill_(1.0)
        else:
            t.zero_()


def build_standins(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write checkpoints/tiny_sd15.safetensors, ipadapter/tiny_ip_sd15.safetensors and
    clip_vision/small_vision.json (+ weights) under ``root`` and register those folders."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import comfy.utils
    import folder_paths

    gen = torch.Generator().manual_seed(seed)
    cfg = comfy.supported_models.SD15(dict(TINY_UNET))
    model = cfg.get_model({})
    unet_sd = model.diffusion_model.state_dict()
    clip_sd = comfy.sd1_clip.SD1ClipModel().state_dict()
    vae_sd = comfy.taesd.taesd.TAESD().state_dict()
    for sd in (unet_sd, clip_sd, vae_sd):
        _reinit(sd, gen)
    out = dict(cfg.process_unet_state_dict_for_saving(unet_sd))
    clip_sd = {(k if k.startswith("clip_l.") else "clip_l." + k): v for k, v in clip_sd.items()}
    out.update(cfg.process_clip_state_dict_for_saving(clip_sd))
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out.update(cfg.process_vae_state_dict_for_saving(vae_sd))
    paths = {}
    for sub in ("checkpoints", "ipadapter", "clip_vision", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(root / sub), is_default=True)
    paths["checkpoint"] = root / "checkpoints" / "tiny_sd15.safetensors"
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in out.items()}, str(paths["checkpoint"]))

    # IP-Adapter SD1.5 layout for this UNet: image_proj + ip_adapter.{1,3,5,7}.to_{k,v}_ip
    ip = {"image_proj.proj.weight": torch.randn(4 * 768, 1024, generator=gen) * 0.02,
          "image_proj.proj.bias": torch.zeros(4 * 768),
          "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768)}
    n_attn2 = sum(1 for n, m in model.diffusion_model.named_modules() if n.endswith("attn2"))
    for i in range(n_attn2):
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"ip_adapter.{2 * i + 1}.{part}.weight"] = torch.randn(320, 768, generator=gen) * 0.02
    paths["ip_adapter"] = root / "ipadapter" / "tiny_ip_sd15.safetensors"
    comfy.utils.save_torch_file(ip, str(paths["ip_adapter"]))

    paths["vision_config"] = root / "clip_vision" / "small_vision.json"
    paths["vision_config"].write_text(json.dumps(SMALL_VISION))
    return paths


def small_clip_vision(config: Path, seed: int = 0):
    """A ComfyUI ClipVisionModel (the class CLIPVisionLoader returns) with a small config."""
    import comfy.clip_vision

    cv = comfy.clip_vision.ClipVisionModel(str(config))
    sd = cv.model.state_dict()
    _reinit(sd, torch.Generator().manual_seed(seed))
    cv.model.load_state_dict(sd)
    return cv
