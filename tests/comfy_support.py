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

from bierasing.comfy_standins import randomize

COMFY = os.environ.get("COMFYUI_PATH", "")
REPO = Path(__file__).resolve().parents[1]
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


def build_standins(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write checkpoints/tiny_sd15.safetensors, ipadapter/tiny_ip_sd15.safetensors and
    clip_vision/small_vision.json (+ weights) under ``root`` and register those folders."""
    import comfy.utils
    import folder_paths

    from bierasing.comfy_standins import checkpoint_tensors, ip_adapter_tensors

    paths = {}
    for sub in ("checkpoints", "ipadapter", "clip_vision", "loras"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(root / sub), is_default=True)
    ckpt, n_attn2 = checkpoint_tensors(seed)
    paths["checkpoint"] = root / "checkpoints" / "tiny_sd15.safetensors"
    comfy.utils.save_torch_file(ckpt, str(paths["checkpoint"]))
    paths["ip_adapter"] = root / "ipadapter" / "tiny_ip_sd15.safetensors"
    comfy.utils.save_torch_file(ip_adapter_tensors(n_attn2, seed), str(paths["ip_adapter"]))
    paths["vision_config"] = root / "clip_vision" / "small_vision.json"
    paths["vision_config"].write_text(json.dumps(SMALL_VISION))
    return paths


def small_clip_vision(config: Path, seed: int = 0):
    """A ComfyUI ClipVisionModel (the class CLIPVisionLoader returns) with a small config."""
    import comfy.clip_vision

    cv = comfy.clip_vision.ClipVisionModel(str(config))
    sd = cv.model.state_dict()
    randomize(sd, torch.Generator().manual_seed(seed))
    cv.model.load_state_dict(sd)
    return cv


def first_step_both_ways(glue, model, clip, diffusers_backbone) -> dict:
    """One esd-x training step through ComfyUI (``glue.ComfyBackbone``) and through the diffusers twin
    built by ``diffusers_backbone(texts)`` from the same start: x_t cache difference, both losses,
    gradient difference, and the share of LoRA weights equal to 1e-6 after the step."""
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.erase.export import erasure_tensors

    cfg = EraseConfig(method="esd-x", steps=2, batch_size=2, rank=4, xt_source="cache", cache_size=2,
                      xt_steps=3, lr=1e-3, seed=0)
    concepts = [Concept("cat", "dog")]
    cb = glue.ComfyBackbone(model, clip, resolution=64)
    grads = lambda ad: {n: torch.cat([la.down.grad.flatten(), la.up.grad.flatten()])  # noqa: E731
                        for n, la in ad.layers.items()}
    with torch.inference_mode(False):
        texts = dict(zip(["", "cat", "dog"], cb.encode_text(["", "cat", "dog"]).split(1)))
        db = diffusers_backbone(texts)
        names = glue.ldm_to_diffusers_names(model)
        with glue.unet_session(cb, train=True):
            ec, ed = Eraser(cb, concepts, cfg), Eraser(db, concepts, cfg)
            ec.prepare()
            ed.prepare()
            # LoRA "down" init is seeded in module order, which differs between LDM and diffusers
            # layouts: start both from the same weights
            by_dif = {names[n]: layer for n, layer in ec.adapters.layers.items()}
            with torch.no_grad():
                for n, layer in ed.adapters.layers.items():
                    layer.down.copy_(by_dif[n].down)
            a, b = ec.cache.states[0], ed.cache.states[0]
            cache_diff = float((a - b).abs().max() / b.abs().max())
            rc, rd = ec.training_step(), ed.training_step()
            gc = {names[n]: g for n, g in grads(ec.adapters).items()}
            tc = erasure_tensors(ec.adapters, names)
            ec.adapters.remove(cb.unet)
        gd, td = grads(ed.adapters), erasure_tensors(ed.adapters)
        ed.adapters.remove(db.unet)
    assert set(tc) == set(td) and set(gc) == set(gd)
    diffs = torch.cat([(tc[k] - td[k]).abs().flatten() for k in tc])
    return {"cache_diff": cache_diff, "loss_comfy": rc["loss"], "loss_diffusers": rd["loss"], "layers": len(gd),
            "grad_rel": max(float((gc[n] - gd[n]).abs().max() / gd[n].abs().max()) for n in gd),
            "same_weights": float((diffs < 1e-6).float().mean())}


def given_backbone(base, unet, texts: dict, **attrs):
    """A ``base`` backbone (SD15Backbone, SDXLBackbone) around a diffusers ``unet`` whose text
    conditioning is looked up in ``texts`` (computed by ComfyUI's CLIP), SD's DDPM schedule, 8x8 latents."""
    from diffusers import DDPMScheduler

    class Given(base):
        def __init__(self):
            self.unet = unet
            sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            self.alphas_cumprod = sched.alphas_cumprod.float()
            self.prediction_type = "epsilon"
            self.sample_shape = (4, 8, 8)
            self.__dict__.update(attrs)

        def encode_text(self, prompts):
            return torch.cat([texts[p] for p in prompts])

    return Given()
