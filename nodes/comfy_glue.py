"""Every use of ComfyUI internals lives here: MODEL/CLIP/VAE/CLIP_VISION as a ``bierasing`` Backbone.

The erasure engine is the library's; this module only makes ComfyUI's objects speak its interface,
on a **clone** of the incoming MODEL, attaching everything the way ComfyUI's own LoRA trainer does:

* noise prediction through ``BaseModel.apply_model`` (ComfyUI's own dtype casting and
  model_sampling), converted between DDPM timesteps/x_t and ComfyUI's sigma/x = x0 + sigma * eps;
* trainable adapters as weight wrappers (``ModelPatcher.add_weight_wrapper``): ComfyUI applies them
  to each weight as its ops cast it for a forward, so they follow offloading and Dynamic VRAM and
  vanish with the clone;
* weights loaded inside the prompt's ``torch.inference_mode()`` are inference tensors, which
  autograd refuses to save: in a training session every other weight gets an identity wrapper, so
  ComfyUI's cast hands each forward an ordinary copy (nothing is replaced in the shared model);
* the IP-Adapter image channel as attn2 replace patches in the clone's model options, numbered
  like ``ip-adapter_sd15`` through ComfyUI's LDM -> diffusers name map;
* erasures are exported under diffusers-style kohya names, so a file made here is the same format as
  one made by the library's diffusers path (LoraLoader and diffusers both read it).
"""

from __future__ import annotations

import os
import time

import contextlib
import logging
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

logger = logging.getLogger(__name__)
POOLED_DIM = 1280  # SDXL's pooled text embedding (OpenCLIP bigG's projection)


class UnsupportedModelError(ValueError):
    pass


def model_family(model) -> str:
    """'sd1' (768-d cross-attention, no extra conditions) or 'sdxl' (2048-d, pooled text + sizes: SDXL
    base and its fine-tunes and distillations); a message naming what is supported for anything else."""
    import comfy.model_base

    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    name = type(model.model.model_config).__name__ if hasattr(model.model, "model_config") else "?"
    if "num_res_blocks" in cfg and cfg.get("in_channels", 4) == 4:
        if cfg.get("context_dim") == 768 and cfg.get("adm_in_channels") is None:
            return "sd1"
        if cfg.get("context_dim") == 2048 and cfg.get("adm_in_channels") == 2816 \
                and isinstance(model.model, comfy.model_base.SDXL):
            return "sdxl"
    raise UnsupportedModelError(
        f"this node erases from SD1.x, SDXL and FLUX.1 models (base and fine-tunes); the connected MODEL is {name} "
        f"(cross-attention width {cfg.get('context_dim')}, extra conditions {cfg.get('adm_in_channels')}). "
        "Load an SD1.5 or SDXL checkpoint with Load Checkpoint, or FLUX.1 dev/schnell with Load Diffusion Model "
        "(the SDXL refiner, SD2.x, SD3, FLUX Fill/Kontext and FLUX.2 are not supported yet).")


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
    """An attn2 replace patch: softmax(QK^T)V + s * softmax(QK_ip^T)V_ip on ComfyUI's q, k, v.

    ComfyUI computes q = to_q(x), k = to_k(context), v = to_v(context) and applies to_out to what
    this returns. Without image tokens (and not recording) it is ComfyUI's own attention, exactly
    as without the patch. The image K/V weights live here, outside the model.
    """

    def __init__(self, to_k_ip: torch.Tensor | None, to_v_ip: torch.Tensor | None, state: IPState,
                 scale: float, device: torch.device):
        self.to_k_ip = self.to_v_ip = None
        if to_k_ip is not None:  # without weights the patch only records attention maps
            self.to_k_ip = nn.Linear(to_k_ip.shape[1], to_k_ip.shape[0], bias=False, device=device)
            self.to_v_ip = nn.Linear(to_v_ip.shape[1], to_v_ip.shape[0], bias=False, device=device)
            with torch.no_grad():
                self.to_k_ip.weight.copy_(to_k_ip)
                self.to_v_ip.weight.copy_(to_v_ip)
            self.to_k_ip.requires_grad_(False)
            self.to_v_ip.requires_grad_(False)
        self.state, self.scale = state, scale
        self.attention_store: list | None = None  # automatic masks read the text-attention maps here

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        tokens = self.state.tokens
        if (tokens is None or self.to_k_ip is None) and self.attention_store is None:
            return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        qh, kh = split(q), split(k)
        out = F.scaled_dot_product_attention(qh, kh, split(v))
        if self.attention_store is not None:
            probs = (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1)
            self.attention_store.append(probs.mean(1).float().detach())
        if tokens is not None and self.to_k_ip is not None:
            tok = tokens.to(self.to_k_ip.weight.device).float()
            k_ip = split(self.to_k_ip(tok).to(q.dtype))
            v_ip = split(self.to_v_ip(tok).to(q.dtype))
            out = out + self.scale * F.scaled_dot_product_attention(qh, k_ip, v_ip)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def attn2_block(ldm_name: str) -> tuple[str, int, int]:
    """ComfyUI's attn2 patch key of an attn2 module: (block, number, transformer index), e.g.
    ``input_blocks.1.1.transformer_blocks.0.attn2`` -> ("input", 1, 0)."""
    parts = ldm_name.split(".")
    kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}.get(parts[0])
    if kind is None or "transformer_blocks" not in parts:
        raise ValueError(f"{ldm_name} is not an attn2 of an SD-style UNet")
    number = 0 if kind == "middle" else int(parts[1])
    return kind, number, int(parts[parts.index("transformer_blocks") + 1])


def _copy_weight(w: torch.Tensor) -> torch.Tensor:
    """Identity weight/bias wrapper: a detached copy of the cast weight, an ordinary tensor autograd
    can save (the loaded one is an inference tensor). Copied here because newer ComfyUI (Dynamic
    VRAM) hands wrappers its reusable cast buffer, which the next layer's cast overwrites."""
    return w.detach().clone()


def plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A normal (non-inference) copy of a node input, usable with autograd."""
    return None if t is None else t.detach().clone()


class ComfyBackbone(Backbone):
    """ComfyUI's SD1.x or SDXL MODEL/CLIP (+ VAE, CLIP_VISION, IP-Adapter weights) behind the library's
    interface."""

    prediction_type = "epsilon"  # predict_noise converts whatever ComfyUI's model_sampling predicts

    def __init__(self, model, clip, vae=None, clip_vision=None, ip_weights: dict | None = None,
                 ip_scale: float = 1.0, resolution: int = 512):
        self.family = model_family(model)
        if clip is None:
            raise ValueError("no CLIP connected: the erasure needs the model's text encoder")
        self._attach(model, clip, vae, clip_vision)
        ms = self.base_model.model_sampling
        self.model_sampling = ms
        self.alphas_cumprod = (1.0 / (1.0 + ms.sigmas.float().cpu() ** 2))
        self.sample_shape = (4, resolution // 8, resolution // 8)
        self.ip_state = IPState()
        self.ip_weights, self.ip_scale = ip_weights, ip_scale
        self.image_proj: ImageProjModel | None = None
        self._channels: dict[str, IPCrossAttention] = {}

    def _attach(self, model, clip, vae, clip_vision) -> None:
        # a clone: adapters, the image channel and training copies attach to it, never to ``model``
        self.patcher, self.clip, self.vae, self.clip_vision = model.clone(), clip, vae, clip_vision
        self.base_model = model.model
        self.unet = model.model.diffusion_model  # shared with ``model``: read here, never modified
        self._ours: set[int] = set()  # ids of the weight wrappers this backbone added
        self._loaded_uuid = None
        self._text_memo: dict[str, torch.Tensor] = {}
        self._image_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latent_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    # ---- conditioning (computed before the UNet is loaded for training, then memoised) ---------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, tokens, D] text tokens (:meth:`_text_tensor`), each prompt encoded once."""
        out = []
        for p in prompts:
            if p not in self._text_memo:
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)
                self._text_memo[p] = plain(self._text_tensor(p, cond, pooled))
            out.append(self._text_memo[p])
        return torch.cat(out).to(self.device)

    def _text_tensor(self, prompt: str, cond: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """[1, 77, D]; SDXL's carry the pooled embedding as a 78th token (:func:`bierasing.backbone.pack_pooled`),
        unpacked again in :meth:`predict_noise`."""
        from bierasing.backbone import pack_pooled

        if cond.shape[1] != 77:
            raise ValueError(f"the prompt {prompt[:60]!r} is longer than CLIP's 75 tokens; shorten it")
        cond = cond[:1]
        return pack_pooled(cond, pooled[:1].to(cond.dtype)) if self.family == "sdxl" else cond

    @torch.no_grad()
    def conditioning(self, text: torch.Tensor, prompt: str) -> list:
        """A ComfyUI CONDITIONING of a text tensor in :meth:`encode_text`'s form (SDXL's is unpacked into
        context and ``pooled_output``; SD1.x keeps CLIP's pooled output of ``prompt``, as CLIPTextEncode)."""
        if self.family == "sdxl":
            from bierasing.backbone import unpack_pooled

            context, pooled = unpack_pooled(text, POOLED_DIM)
        else:
            context = text
            pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)[1]
        extra = {"pooled_output": plain(pooled)} if pooled is not None else {}
        return [[plain(context), extra]]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        key = id(images)
        if key not in self._image_memo:
            if self.clip_vision is None or self.ip_weights is None:
                raise ValueError("image exemplars need a CLIP_VISION (ViT-H for ip-adapter_sd15 and _sdxl_vit-h) and an image "
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
                raise ValueError("the image adapter has no image_proj.proj.weight: not an IP-Adapter SD1.5/SDXL file "
                                 "(IP-Adapter Plus/FaceID variants are not supported)")
            dim = sd["image_proj.norm.weight"].shape[0]
            if w.shape[1] != embed_dim:
                raise ValueError(f"the image adapter expects {w.shape[1]}-d image embeddings but the CLIP vision "
                                 f"model gives {embed_dim}-d; ip-adapter_sd15 and ip-adapter_sdxl_vit-h need ViT-H (1024-d), "
                                 "ip-adapter_sdxl needs bigG (1280-d)")
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
        extra = {}
        if self.family == "sdxl":
            from bierasing.backbone import unpack_pooled

            text, pooled = unpack_pooled(text, POOLED_DIM)
            h, w = (s * 8 for s in x_t.shape[-2:])  # uncropped, at the training size (ComfyUI's default)
            extra["y"] = self.base_model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                                    target_width=w, target_height=h).to(x_t.device, x_t.dtype)
        self.ensure_loaded()
        self.ip_state.tokens = image_tokens
        try:
            den = self.base_model.apply_model(x, sigma, c_crossattn=text, **extra,
                                              transformer_options=self.patcher.model_options["transformer_options"])
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
        return list(self._channels.values())

    # ---- trainable adapters and loading -----------------------------------------------------------
    def attach_adapters(self, trainable: str, rank: int, generator: torch.Generator | None = None):
        """Adapters on the clone as weight wrappers (ComfyUI applies them where it casts each weight);
        they live on the device the model computes on, in fp32."""
        from bierasing.erase.adapters import AdaptedLayer, AdapterSet, select_modules

        layers = {}
        dynamic = getattr(self.patcher, "is_dynamic", lambda: False)()
        for name, m in select_modules(self.unet, trainable, self.module_name_map()).items():
            if dynamic and mm.module_size(m) <= 16 * 1024:  # Dynamic VRAM moves these whole, unwrapped
                logger.warning("not training %s: under Dynamic VRAM ComfyUI applies no weight wrapper to "
                               "modules this small", name)
                continue
            layer = AdaptedLayer(m, rank, float(rank), generator, device=self.device)
            self._add_wrapper(f"{name}.weight", lambda w, layer=layer: layer.patch_weight(w.detach().clone()))
            layers[name] = layer
        return AdapterSet(layers, in_place=False)

    def make_trainable(self) -> None:
        """Identity wrappers on every other weight and bias: each forward then runs on autograd-usable
        copies."""
        for name, m in self.unet.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            for param in ("weight", "bias"):  # norms save their bias for the backward too
                key = f"diffusion_model.{name}.{param}"
                if getattr(m, param, None) is not None and not self.patcher.weight_wrapper_patches.get(key):
                    self._add_wrapper(f"{name}.{param}", _copy_weight)

    def _add_wrapper(self, weight: str, fn) -> None:
        self.patcher.add_weight_wrapper(f"diffusion_model.{weight}", fn)
        self._ours.add(id(fn))

    def ensure_loaded(self) -> None:
        """Load the clone with everything attached so far (ComfyUI applies weight wrappers as it
        loads; after new ones the clone is unpatched and loaded again)."""
        if self._loaded_uuid == self.patcher.patches_uuid:
            return
        if self._loaded_uuid is not None:
            self.patcher.detach()
        mm.load_models_gpu([self.patcher])
        self._loaded_uuid = self.patcher.patches_uuid

    def release(self) -> None:
        """Unpatch the clone and take this backbone's wrappers off the shared modules."""
        if self._loaded_uuid is not None:
            self.patcher.detach()
            self._loaded_uuid = None
        for m in self.unet.modules():
            for attr in ("weight_function", "bias_function"):
                fns = m.__dict__.get(attr)
                if fns and any(id(f) in self._ours for f in fns):
                    setattr(m, attr, [f for f in fns if id(f) not in self._ours])

    def frozen_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight with the clone's patches (a loaded erasure) applied: ComfyUI writes them into
        the weights when it loads the model whole."""
        self.ensure_loaded()
        return module.weight

    def apply_erasure(self, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> None:
        """From now on the clone carries this erasure, as a LoRA patch (the stock loader's way)."""
        self.release()
        self.patcher = apply_lora(self.patcher, tensors, strength)

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Kohya-form erasure tensors in this model family's file layout (``lora_layout``)."""
        return lora_keys_for(self.patcher, tensors)

    def cross_attention_tokens(self, text: torch.Tensor) -> torch.Tensor:
        if self.family == "sdxl":
            from bierasing.backbone import unpack_pooled

            return unpack_pooled(text, POOLED_DIM)[0]
        return text

    def _token_ids(self, text: str) -> list[int]:
        """CLIP token ids of ``text`` as ComfyUI tokenizes it: BOS, the words, EOS, padding."""
        return [int(t[0]) for t in next(iter(self.clip.tokenize(text).values()))[0]]

    def content_token_count(self, prompt: str) -> int:
        ids = self._token_ids(prompt)
        return ids.index(ids[-1], 1) - 1 if ids[-1] in ids[1:] else len(ids) - 1

    def word_positions(self, prompt: str, word: str) -> list[int]:
        p, w = self._token_ids(prompt), self._token_ids(word)
        end = w[-1]
        w = w[1:w.index(end, 1)] if end in w[1:] else w[1:]
        for i in range(1, len(p) - len(w) + 1):
            if p[i:i + len(w)] == w:
                return list(range(i, i + len(w)))
        raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}")

    # ---- image channel on/off -------------------------------------------------------------------
    def install_image_branch(self) -> None:
        """An attn2 replace patch on every attn2 of the clone: with IP-Adapter weights it adds the
        image channel, without them it only records attention maps (automatic masks)."""
        if self._channels:
            return
        names = attn2_in_ip_adapter_order(self.patcher)
        nums: list[int | None] = [None] * len(names)
        if self.ip_weights is not None:
            nums = sorted({int(k.split(".")[1]) for k in self.ip_weights if k.startswith("ip_adapter.")})
            if len(nums) != len(names):
                raise ValueError(f"the image adapter has {len(nums)} attn2 layers, this UNet has {len(names)}; "
                                 "use the IP-Adapter made for this model family (SD1.5: ip-adapter_sd15, SDXL: "
                                 "ip-adapter_sdxl_vit-h or ip-adapter_sdxl)")
        for n, name in zip(nums, names):
            base = self.unet.get_submodule(name)
            k = v = None
            if n is not None:
                k = self.ip_weights[f"ip_adapter.{n}.to_k_ip.weight"].float()
                v = self.ip_weights[f"ip_adapter.{n}.to_v_ip.weight"].float()
                if k.shape != base.to_k.weight.shape:
                    raise ValueError(f"ip_adapter.{n}.to_k_ip is {tuple(k.shape)} but {name}.to_k is "
                                     f"{tuple(base.to_k.weight.shape)}: adapter and model do not match")
            channel = IPCrossAttention(k, v, self.ip_state, self.ip_scale, self.device)
            self.patcher.set_model_attn2_replace(channel, *attn2_block(name))
            self._channels[name] = channel


@contextlib.contextmanager
def unet_session(backbone: ComfyBackbone, train: bool = True):
    """Inference mode off and (for training) gradients on, the image channel patched into the clone
    and, for training, every weight made autograd-usable; the clone is loaded on first use and
    unpatched on exit, however the block ends (Cancel and errors included).

    Conditioning must be computed before (it is memoised)."""
    grad = torch.enable_grad() if train else torch.no_grad()
    with torch.inference_mode(False), grad:
        try:
            backbone.install_image_branch()
            if train:
                backbone.make_trainable()
            yield backbone
        finally:
            backbone.release()
            if train:
                mm.soft_empty_cache()


def interrupted() -> bool:
    return mm.processing_interrupted()


def raise_if_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar (the UI bar and the Cancel button's polling); with a ``LivePreview``
    also the node's preview picture and a 'step · loss · time left' line under the node."""

    PICTURE_SECONDS = 3.0  # redraw the curve at most this often (a sample step always redraws)

    def __init__(self, total: int, preview=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.total, self.preview = total, preview
        self.last_picture = float("-inf")

    def __call__(self, step: int, total: int, record: dict | None = None):
        picture = None
        if self.preview is not None:
            send_text(self.preview.text(step, total, record))
            now = time.monotonic()
            if self.preview.sample_due(step, total) or step == total or now - self.last_picture > self.PICTURE_SECONDS:
                from PIL import Image

                picture = ("JPEG", Image.fromarray(self.preview.render(step, total)), 768)
                self.last_picture = now
        self.bar.update_absolute(step, total, picture)


def send_text(text: str) -> None:
    """A line of text under the running node (ComfyUI's progress text; ignored where unsupported)."""
    try:
        import server
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None and getattr(server.PromptServer, "instance", None) is not None:
            server.PromptServer.instance.send_progress_text(text, ctx.node_id)
    except (ImportError, AttributeError):
        pass


def backbone(model, clip, vae=None, clip_vision=None, image_adapter: dict | None = None, resolution: int = 512):
    """The Backbone for ``model``'s family (SD1.x, SDXL or FLUX.1) on a clone of it; ``image_adapter``
    is Load Image Adapter's output (IP-Adapter for UNets, Redux for FLUX)."""
    from . import comfy_flux

    tensors = image_adapter["tensors"] if image_adapter else None
    kind = image_adapter.get("kind", "ip-adapter") if image_adapter else None
    if comfy_flux.is_flux(model):
        if kind == "ip-adapter":
            raise ValueError(f"{image_adapter['name']} is an IP-Adapter for SD1.x/SDXL; FLUX's image branch is "
                             "Redux: load flux1-redux-dev.safetensors in Load Image Adapter")
        return comfy_flux.ComfyFluxBackbone(model, clip, vae, clip_vision, tensors, resolution)
    if kind == "redux":
        raise ValueError(f"{image_adapter['name']} is a FLUX Redux file; this MODEL is a UNet: load an IP-Adapter "
                         "(ip-adapter_sd15, ip-adapter_sdxl_vit-h) in Load Image Adapter")
    return ComfyBackbone(model, clip, vae, clip_vision, tensors, image_adapter["scale"] if image_adapter else 1.0,
                         resolution)


def lora_keys_for(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Erasure tensors under the keys ComfyUI maps for ``model``: FLUX reads the ``peft`` layout, so
    kohya-form tensors of a FLUX erasure are renamed (a file's tensors pass as they are)."""
    from bierasing.erase.export import PREFIX, peft_tensors

    from . import comfy_flux

    if tensors and all(k.startswith(PREFIX) for k in tensors) and comfy_flux.is_flux(model):
        return peft_tensors(tensors, comfy_flux.diffusers_slices(model))
    return tensors


def apply_lora(model, tensors: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` with the erasure applied the way the stock LoraLoader does."""
    new_model, _ = comfy.sd.load_lora_for_models(model, None, lora_keys_for(model, tensors), strength, 0.0)
    return new_model


#: model_options key: the erasure files (Load Erasure) a MODEL carries, in the order applied
CARRIED = "bierasing_erasures"


def carry(model, path: str, strength: float) -> None:
    """Record on ``model`` (a clone of ours) that it carries the erasure file ``path``; a clone
    copies its model_options, so the record follows the MODEL downstream."""
    model.model_options[CARRIED] = [*model.model_options.get(CARRIED, []), {"file": path, "strength": strength}]


def carried(model) -> list[dict]:
    """The erasure files ``model`` carries ({"file", "strength"}, oldest first)."""
    return list(model.model_options.get(CARRIED, []))


def sample(model, clip, vae, prompts: Sequence[str], negative: str, seeds: Sequence[int], steps: int,
           cfg: float, resolution: int) -> torch.Tensor:
    """One image per (prompt, seed) with ComfyUI's own sampler (euler, normal) -> IMAGE [B, H, W, 3].
    FLUX.1-dev is conditioned on guidance 3.5 as FluxGuidance's default (give it cfg 1)."""
    import comfy.sample

    from . import comfy_flux

    guidance = comfy_flux.guidance_of(model) if comfy_flux.is_flux(model) else None
    extra = {} if guidance is None else {"guidance": guidance}  # as FluxGuidance sets it

    def encode(text: str) -> list:
        return [[c, {**d, **extra}] for c, d in clip.encode_from_tokens_scheduled(clip.tokenize(text))]

    neg = encode(negative)
    channels = model.get_model_object("latent_format").latent_channels
    latent = torch.zeros(1, channels, resolution // 8, resolution // 8)
    out = []
    pbar = comfy.utils.ProgressBar(len(prompts))
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        pos = encode(p)
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


def files(folders: str) -> list[str]:
    """Files of one ComfyUI model folder, or of several ("ipadapter,style_models")."""
    import folder_paths

    out = []
    for folder in folders.split(","):
        out += [f for f in folder_paths.get_filename_list(folder) if f not in out]
    return out


def file_path(folders: str, name: str) -> str:
    import folder_paths

    for folder in folders.split(","):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    where = " or ".join(f"models/{f}" for f in folders.split(","))
    raise ValueError(f"{name!r} is not in ComfyUI's {where} folder")


def output_folder(folder: str) -> str:
    import folder_paths

    return folder_paths.get_folder_paths(folder)[0]


def input_folder() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


EXEMPLAR_ROOTS_ENV = "BIERASING_EXEMPLAR_ROOTS"


def exemplar_roots() -> list[str]:
    """Folders outside the input folder that the server's owner opened to Load Exemplars
    (``BIERASING_EXEMPLAR_ROOTS``, separated like PATH); none by default."""
    return [r for r in os.environ.get(EXEMPLAR_ROOTS_ENV, "").split(os.pathsep) if r.strip()]


def exemplar_folders() -> list[str]:
    """Load Exemplars' dropdown: image folders under the input folder, then under the opened roots."""
    from bierasing.erase.exemplars import image_folders

    found = image_folders(input_folder())
    for root in exemplar_roots():
        if os.path.isdir(root):
            found += [os.path.join(os.path.abspath(root), f) for f in image_folders(root)]
    return found
