"""Every use of ComfyUI internals lives here: MODEL/CLIP/VAE/CLIP_VISION as a ``bierasing`` Backbone.

The erasure engine is the library's; this module only makes ComfyUI's objects speak its interface:

* noise prediction through ``BaseModel.apply_model`` (ComfyUI's own dtype casting and
  model_sampling), converted between DDPM timesteps/x_t and ComfyUI's sigma/x = x0 + sigma * eps;
* the IP-Adapter image channel as a wrapper around each ``attn2`` CrossAttention (ComfyUI's LDM
  names), numbered like ``ip-adapter_sd15`` through ComfyUI's LDM -> diffusers name map;
* weights loaded inside the prompt's ``torch.inference_mode()`` are inference tensors, which autograd
  refuses to save; :func:`training_session` re-creates them once as plain tensors (same values) and
  runs the loop with inference mode off;
* erasures are exported under diffusers-style kohya names, so a file made here is the same format as
  one made by the library's diffusers path (LoraLoader and diffusers both read it).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from bierasing.adapter import ImageProjModel
from bierasing.backbone import Backbone


class NotSD1Error(ValueError):
    pass


def check_sd1(model) -> None:
    """Refuse anything that is not an SD1.x-style UNet (768-d cross-attention, no extra conds)."""
    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    name = type(model.model.model_config).__name__ if hasattr(model.model, "model_config") else "?"
    if cfg.get("context_dim") != 768 or cfg.get("adm_in_channels") is not None or "num_res_blocks" not in cfg:
        raise NotSD1Error(f"this node erases from SD1.x models; the connected MODEL is {name} "
                          f"(cross-attention width {cfg.get('context_dim')}). Load an SD1.5 checkpoint "
                          "with Load Checkpoint.")


def ldm_to_diffusers_names(model) -> dict[str, str]:
    """ComfyUI (LDM) module name -> diffusers module name, for every weight of the UNet."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {ldm[:-len(".weight")]: dif[:-len(".weight")] for dif, ldm in mapping.items() if ldm.endswith(".weight")}


def attn2_in_ip_adapter_order(model) -> list[str]:
    """LDM names of the attn2 modules in diffusers' attn_processors order (down, up, mid), the order
    in which ip-adapter_sd15 numbers them (1, 3, 5, ...)."""
    to_dif = ldm_to_diffusers_names(model)
    unet = model.model.diffusion_model
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")]
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def key(ldm: str):
        dif = to_dif.get(f"{ldm}.to_k")
        if dif is None:
            raise ValueError(f"no diffusers name for {ldm}; unsupported UNet layout")
        parts = dif.split(".")
        nums = [int(p) for p in parts if p.isdigit()]
        return (group[parts[0]], *nums)

    return sorted(names, key=key)


class IPState:
    """Image tokens of the current UNet call (None: the image channel is off)."""

    tokens: torch.Tensor | None = None


class IPCrossAttention:
    """ComfyUI CrossAttention + a decoupled image channel: softmax(QK^T)V + s * softmax(QK_ip^T)V_ip.

    Installed as the attn2 module's instance ``forward`` (the module tree and its weight names stay
    exactly ComfyUI's, so trainable-set selection and ComfyUI's weight patching see no change); the
    image K/V weights live here, outside the UNet's state dict.
    """

    def __init__(self, base: nn.Module, to_k_ip: torch.Tensor | None, to_v_ip: torch.Tensor | None,
                 state: IPState, scale: float):
        self.base = base
        self.to_k_ip = self.to_v_ip = None
        if to_k_ip is not None:  # without weights the wrapper only records attention maps
            dev = base.to_k.weight.device
            self.to_k_ip = nn.Linear(to_k_ip.shape[1], to_k_ip.shape[0], bias=False, device=dev)
            self.to_v_ip = nn.Linear(to_v_ip.shape[1], to_v_ip.shape[0], bias=False, device=dev)
            with torch.no_grad():
                self.to_k_ip.weight.copy_(to_k_ip)
                self.to_v_ip.weight.copy_(to_v_ip)
            self.to_k_ip.requires_grad_(False)
            self.to_v_ip.requires_grad_(False)
        self.state, self.scale, self.heads = state, scale, base.heads
        self.attention_store: list | None = None  # automatic masks read the text-attention maps here

    def _split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        tokens = self.state.tokens
        if tokens is None and self.attention_store is None:
            return type(self.base).forward(self.base, x, context=context, value=value, mask=mask,
                                           transformer_options=transformer_options)
        b = self.base
        context = x if context is None else context
        q = self._split(b.to_q(x))
        k = self._split(b.to_k(context))
        v = self._split(b.to_v(context if value is None else value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.attention_store is not None:
            probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            self.attention_store.append(probs.mean(1).float().detach())
        if tokens is not None and self.to_k_ip is not None:
            tok = tokens
            k_ip = self._split(self.to_k_ip(tok.float()).to(q.dtype))
            v_ip = self._split(self.to_v_ip(tok.float()).to(q.dtype))
            out = out + self.scale * F.scaled_dot_product_attention(q, k_ip, v_ip)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, q.shape[1] * q.shape[-1])
        return b.to_out(out)


def plain_tensors_(module: nn.Module) -> int:
    """Replace inference-mode parameters/buffers by ordinary copies (same values); returns how many."""
    n = 0
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[k] = nn.Parameter(p.detach().clone(), requires_grad=False)
                n += 1
        for k, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[k] = b.clone()
                n += 1
    return n


def plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A normal (non-inference) copy of a node input, usable with autograd."""
    return None if t is None else t.detach().clone()


class ComfyBackbone(Backbone):
    """ComfyUI's SD1.x MODEL/CLIP (+ VAE, CLIP_VISION, IP-Adapter weights) behind the library's interface."""

    prediction_type = "epsilon"  # predict_noise converts whatever ComfyUI's model_sampling predicts

    def __init__(self, model, clip, vae=None, clip_vision=None, ip_weights: dict | None = None,
                 ip_scale: float = 1.0, resolution: int = 512):
        check_sd1(model)
        if clip is None:
            raise ValueError("no CLIP connected: the erasure needs the model's text encoder")
        self.patcher, self.clip, self.vae, self.clip_vision = model, clip, vae, clip_vision
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        ms = self.base_model.model_sampling
        self.model_sampling = ms
        self.alphas_cumprod = (1.0 / (1.0 + ms.sigmas.float().cpu() ** 2))
        self.sample_shape = (4, resolution // 8, resolution // 8)
        self.ip_state = IPState()
        self.ip_weights, self.ip_scale = ip_weights, ip_scale
        self.image_proj: ImageProjModel | None = None
        self._wrapped: dict[str, IPCrossAttention] = {}
        self._text_memo: dict[str, torch.Tensor] = {}
        self._image_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latent_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    # ---- conditioning (computed before the UNet is loaded for training, then memoised) ---------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            if p not in self._text_memo:
                cond = self.clip.encode_from_tokens(self.clip.tokenize(p))
                if cond.shape[1] != 77:
                    raise ValueError(f"the prompt {p[:60]!r} is longer than CLIP's 75 tokens; shorten it")
                self._text_memo[p] = plain(cond[:1])
            out.append(self._text_memo[p])
        return torch.cat(out).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        key = id(images)
        if key not in self._image_memo:
            if self.clip_vision is None or self.ip_weights is None:
                raise ValueError("image exemplars need a CLIP_VISION (ViT-H for IP-Adapter SD1.5) and an image "
                                 "adapter (Load Image Adapter) connected to the erase node")
            embeds = self.clip_vision.encode_image(images.permute(0, 2, 3, 1).cpu())["image_embeds"]
            proj = self._projector(embeds.shape[-1])
            with torch.no_grad():
                self._image_memo[key] = (images, plain(proj(embeds.float().cpu())))
        return self._image_memo[key][1].to(self.device)

    def _projector(self, embed_dim: int) -> ImageProjModel:
        if self.image_proj is None:
            sd = self.ip_weights
            w = sd.get("image_proj.proj.weight")
            if w is None:
                raise ValueError("the image adapter has no image_proj.proj.weight: not an IP-Adapter SD1.5 file "
                                 "(IP-Adapter Plus/FaceID variants are not supported)")
            dim = sd["image_proj.norm.weight"].shape[0]
            if w.shape[1] != embed_dim:
                raise ValueError(f"the image adapter expects {w.shape[1]}-d image embeddings but the CLIP vision "
                                 f"model gives {embed_dim}-d; IP-Adapter SD1.5 needs the ViT-H CLIP vision model")
            proj = ImageProjModel(w.shape[1], dim, w.shape[0] // dim)
            proj.load_state_dict({k[len("image_proj."):]: v.float() for k, v in sd.items()
                                  if k.startswith("image_proj.")})
            self.image_proj = proj.eval()
        return self.image_proj

    @property
    def can_encode_images(self) -> bool:  # the VAE is an optional node input
        return self.vae is not None

    @torch.no_grad()
    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        key = id(images)
        if key not in self._latent_memo:
            if self.vae is None:
                raise ValueError("connect a VAE: the 'noised' x_t source and automatic masks encode the exemplars")
            lat = self.vae.encode(images.permute(0, 2, 3, 1).cpu())
            self._latent_memo[key] = (images, plain(self.base_model.process_latent_in(lat)))
        return self._latent_memo[key][1].to(self.device)

    @torch.no_grad()
    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(self.base_model.process_latent_out(x0.cpu()))
        return img.permute(0, 3, 1, 2).clamp(0, 1)

    # ---- the UNet -------------------------------------------------------------------------------
    def predict_noise(self, x_t, t, text, image_tokens=None):
        sigma = self.model_sampling.sigma(t.float().cpu()).to(x_t.device)
        s = sigma.view(-1, 1, 1, 1).to(x_t.dtype)
        x = x_t * (1 + s ** 2).sqrt()  # DDPM x_t -> ComfyUI's x0 + sigma * eps
        self.ip_state.tokens = image_tokens
        try:
            den = self.base_model.apply_model(x, sigma, c_crossattn=text)
        finally:
            self.ip_state.tokens = None
        return ((x - den) / s).to(x_t.dtype)

    def model_output(self, x_t, t, text, image_tokens=None):
        return self.predict_noise(x_t, t, text, image_tokens)

    def attn2_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")}

    def module_name_map(self) -> dict[str, str] | None:
        """ComfyUI's LDM module names -> diffusers names, so trainable sets pick the same layers."""
        return ldm_to_diffusers_names(self.patcher) or None

    def attention_recorders(self) -> list:
        return list(self._wrapped.values())

    def word_positions(self, prompt: str, word: str) -> list[int]:
        def ids(text):
            toks = next(iter(self.clip.tokenize(text).values()))[0]
            return [int(t[0]) for t in toks]

        p, w = ids(prompt), ids(word)
        end = w[-1]
        w = w[1:w.index(end, 1)] if end in w[1:] else w[1:]
        for i in range(1, len(p) - len(w) + 1):
            if p[i:i + len(w)] == w:
                return list(range(i, i + len(w)))
        raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}")

    # ---- image channel on/off -------------------------------------------------------------------
    def install_image_branch(self) -> None:
        """Wrap every attn2: with IP-Adapter weights it adds the image channel, without them it only
        records attention maps (automatic masks)."""
        if self._wrapped:
            return
        names = attn2_in_ip_adapter_order(self.patcher)
        nums: list[int | None] = [None] * len(names)
        if self.ip_weights is not None:
            nums = sorted({int(k.split(".")[1]) for k in self.ip_weights if k.startswith("ip_adapter.")})
            if len(nums) != len(names):
                raise ValueError(f"the image adapter has {len(nums)} attn2 layers, this UNet has {len(names)}; "
                                 "use the IP-Adapter made for this model family (SD1.5: ip-adapter_sd15)")
        for n, name in zip(nums, names):
            base = self.unet.get_submodule(name)
            k = v = None
            if n is not None:
                k = self.ip_weights[f"ip_adapter.{n}.to_k_ip.weight"].float()
                v = self.ip_weights[f"ip_adapter.{n}.to_v_ip.weight"].float()
                if k.shape != base.to_k.weight.shape:
                    raise ValueError(f"ip_adapter.{n}.to_k_ip is {tuple(k.shape)} but {name}.to_k is "
                                     f"{tuple(base.to_k.weight.shape)}: adapter and model do not match")
            channel = IPCrossAttention(base, k, v, self.ip_state, self.ip_scale)
            base.forward = channel
            self._wrapped[name] = channel

    def remove_image_branch(self) -> None:
        for channel in self._wrapped.values():
            del channel.base.forward  # back to the class's forward
        self._wrapped.clear()


@contextlib.contextmanager
def unet_session(backbone: ComfyBackbone, train: bool = True):
    """Load the UNet fully, (for training) make its weights autograd-usable, wrap attn2; undo on exit.

    Conditioning must be computed before (it is memoised): loading CLIP/VAE while attn2 is wrapped
    could make ComfyUI move weights under names that no longer exist.
    """
    grad = torch.enable_grad() if train else torch.no_grad()
    with torch.inference_mode(False), grad:
        mm.load_models_gpu([backbone.patcher], memory_required=1e20 if train else 0, force_full_load=True)
        if train:
            plain_tensors_(backbone.unet)
        backbone.install_image_branch()
        try:
            yield backbone
        finally:
            backbone.remove_image_branch()
            if train:
                mm.soft_empty_cache()


def interrupted() -> bool:
    return mm.processing_interrupted()


def raise_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (the UI bar and the Cancel button's polling)."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def __call__(self, step: int, total: int, *_):
        self.bar.update_absolute(step, total)


def apply_lora(model, tensors: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` with the erasure applied the way the stock LoraLoader does."""
    new_model, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength, 0.0)
    return new_model


def sample(model, clip, vae, prompts: Sequence[str], negative: str, seeds: Sequence[int], steps: int,
           cfg: float, resolution: int) -> torch.Tensor:
    """One image per (prompt, seed) with ComfyUI's own sampler (euler, normal) -> IMAGE [B, H, W, 3]."""
    import comfy.sample

    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
    out = []
    pbar = comfy.utils.ProgressBar(len(prompts))
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        noise = comfy.sample.prepare_noise(latent, seed)
        lat = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent,
                                  denoise=1.0, seed=seed, disable_pbar=True)
        out.append(vae.decode(lat))
        pbar.update_absolute(i + 1, len(prompts))
    return torch.cat(out).clamp(0, 1)


def register_model_folders() -> None:
    """models/ipadapter is not a core ComfyUI folder (IP-Adapter packs register it the same way)."""
    import os

    import folder_paths

    if "ipadapter" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("ipadapter", os.path.join(folder_paths.models_dir, "ipadapter"))


def files(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder)


def file_path(folder: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name!r} is not in ComfyUI's models/{folder} folder")
    return path


def output_folder(folder: str) -> str:
    import folder_paths

    return folder_paths.get_folder_paths(folder)[0]


def input_folder() -> str:
    import folder_paths

    return folder_paths.get_input_directory()
