"""ComfyUI's FLUX.1 MODEL (dev, schnell) behind the library's Backbone: the FLUX half of the glue.

UNTESTED DRAFT (2026-12-06): written from ComfyUI 0.3.64's code (docs/flux.md, "Notes for the
ComfyUI path"); not wired into the nodes. What it does:

* velocity through ``BaseModel.apply_model`` (x0 out, v = (x - x0) / sigma) at the flow sigmas of the
  model's own time shift (dev: e^1.15, schnell: 1), guidance 3.5 as FluxGuidance's default;
* conditioning from DualCLIPLoader's CLIP: T5 (exactly 256 tokens) + CLIP-L's pooled vector packed
  as one more token; Redux tokens from a CLIP_VISION (SigLIP) and a ``flux1-redux-dev`` file appended
  after the text, as StyleModelApply does;
* adapters keyed by diffusers names, one per projection: a projection inside a fused ComfyUI weight
  (``txt_attn.qkv``, ``linear1``) gets a row-sliced adapter (``AdaptedLayer(rows=...)``), so a
  file saved here is the diffusers path's file (``transformer.*`` keys, ``lora_layout`` "peft").
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

import comfy.utils

from bierasing import flux
from bierasing.backbone import Backbone, pack_pooled, unpack_pooled

from .comfy_glue import ComfyBackbone, plain

POOLED_DIM = 768  # CLIP-L's unprojected pooled output
T5_TOKENS = 256  # ComfyUI pads T5 to at least 256 tokens


def is_flux(model) -> bool:
    """FLUX.1 dev or schnell (16 latent channels; not Fill, Kontext or FLUX.2)."""
    import comfy.model_base

    cfg = getattr(model.model.model_config, "unet_config", {}) or {}
    return (type(model.model) is comfy.model_base.Flux and cfg.get("image_model") == "flux"
            and cfg.get("in_channels") == 16)


def diffusers_slices(model) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """diffusers module name -> (ComfyUI module name, (row offset, rows) inside it or None), for every
    weight of the transformer, from ComfyUI's own map (``comfy.utils.flux_to_diffusers``)."""
    out = {}
    for dif, target in comfy.utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix="").items():
        if not dif.endswith(".weight"):
            continue
        if isinstance(target, str):
            ldm, rows = target, None
        elif len(target) == 2 and target[1] is not None and target[1][0] == 0:
            ldm, rows = target[0], (target[1][1], target[1][2])
        else:
            continue  # norm_out: scale and shift swapped, no trainable set selects it
        out[dif[:-len(".weight")]] = (ldm[:-len(".weight")], rows)
    return out


class ComfyFluxBackbone(flux.FlowPredictions, ComfyBackbone):
    lora_layout = "peft"

    def __init__(self, model, clip, vae=None, clip_vision=None, redux_weights: dict | None = None,
                 resolution: int = 512):
        if not is_flux(model):
            raise ValueError("not a FLUX.1 dev or schnell MODEL")
        if clip is None:
            raise ValueError("no CLIP connected: load FLUX's text encoders with DualCLIPLoader (type flux)")
        self.family = "flux"
        self.patcher, self.clip, self.vae, self.clip_vision = model.clone(), clip, vae, clip_vision
        self.base_model = model.model
        self.unet = model.model.diffusion_model
        self._ours: set[int] = set()
        self._loaded_uuid = None
        self._channels: dict = {}
        self._text_memo: dict[str, torch.Tensor] = {}
        self._image_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._latent_memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cfg = model.model.model_config.unet_config
        self.guidance = 3.5 if cfg.get("guidance_embed") else None
        ms = model.model.model_sampling
        self.shift = math.exp(ms.shift) if type(ms).__name__ == "ModelSamplingFlux" else float(getattr(ms, "shift", 1.0))
        self.sigmas = flux.flow_sigmas(1000, self.shift)
        self.alphas_cumprod = flux.alphas_cumprod_of(self.sigmas)
        self.flow_scale = flux.vp_to_flow_scale(self.sigmas)
        self.sample_shape = (16, resolution // 8, resolution // 8)
        self.image_proj = None
        if redux_weights is not None:
            w = redux_weights
            self.image_proj = flux.ReduxProjector(w["redux_up.weight"].shape[1], w["redux_up.weight"].shape[0],
                                                  w["redux_down.weight"].shape[0])
            self.image_proj.load_state_dict({k: v.float() for k, v in w.items()})
            self.image_proj.eval().requires_grad_(False)
        self._recorders: list = []  # automatic masks: not yet (needs a recording double_block patch)

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            if p not in self._text_memo:
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)
                if cond.shape[1] != T5_TOKENS:
                    raise ValueError(f"the prompt {p[:60]!r} is longer than T5's {T5_TOKENS - 1} tokens; shorten it")
                self._text_memo[p] = plain(pack_pooled(cond[:1], pooled[:1].to(cond.dtype)))
            out.append(self._text_memo[p])
        return torch.cat(out).to(self.device)

    @torch.no_grad()
    def conditioning(self, text: torch.Tensor, prompt: str) -> list:
        tokens, pooled = unpack_pooled(text, POOLED_DIM)
        extra = {"pooled_output": plain(pooled)}
        if self.guidance is not None:
            extra["guidance"] = self.guidance
        return [[plain(tokens), extra]]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        key = id(images)
        if key not in self._image_memo:
            if self.clip_vision is None or self.image_proj is None:
                raise ValueError("image exemplars need a CLIP_VISION (SigLIP, sigclip_vision_patch14_384) and the "
                                 "Redux file (flux1-redux-dev) in Load Image Adapter")
            states = self.clip_vision.encode_image(images.permute(0, 2, 3, 1).cpu())["last_hidden_state"]
            self._image_memo[key] = (images, plain(self.image_proj(states.float().cpu())))
        return self._image_memo[key][1].to(self.device)

    def cross_attention_tokens(self, text: torch.Tensor) -> torch.Tensor:
        return unpack_pooled(text, POOLED_DIM)[0]

    def _token_ids(self, text: str) -> list[int]:
        """T5 token ids as ComfyUI tokenizes them (no BOS; EOS 1; padding 0)."""
        return [int(t[0]) for t in self.clip.tokenize(text)["t5xxl"][0]]

    def content_token_count(self, prompt: str) -> int:
        return self._token_ids(prompt).index(1)

    def word_positions(self, prompt: str, word: str) -> list[int]:
        p, w = self._token_ids(prompt), self._token_ids(word)
        w = w[:w.index(1)]
        for i in range(len(p) - len(w) + 1):
            if p[i:i + len(w)] == w:
                return list(range(i, i + len(w)))
        raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}")

    # ---- the transformer ---------------------------------------------------------------------------
    def velocity(self, x_flow, sigma, text, image_tokens=None):
        tokens, pooled = unpack_pooled(text, POOLED_DIM)
        if image_tokens is not None:
            tokens = torch.cat([tokens, image_tokens.to(tokens.dtype)], 1)
        extra = {}
        if self.guidance is not None:
            extra["guidance"] = torch.full((x_flow.shape[0],), self.guidance, device=x_flow.device)
        self.ensure_loaded()
        den = self.base_model.apply_model(x_flow, sigma, c_crossattn=tokens, y=pooled, **extra,
                                          transformer_options=self.patcher.model_options["transformer_options"])
        return ((x_flow - den) / sigma.view(-1, 1, 1, 1)).to(x_flow.dtype)

    def predict_noise(self, x_t, t, text, image_tokens=None):
        return Backbone.predict_noise(self, x_t, t, text, image_tokens)

    def module_name_map(self):
        return None  # adapters are keyed by diffusers names already

    def attn2_modules(self) -> dict:
        return {f"double_blocks.{i}": b for i, b in enumerate(self.unet.double_blocks)}

    def install_image_branch(self) -> None:
        pass  # Redux tokens travel with the text; nothing to patch

    def attach_adapters(self, trainable: str, rank: int, generator: torch.Generator | None = None):
        from bierasing.erase.adapters import TRAINABLE_SETS, AdaptedLayer, AdapterSet

        if trainable not in TRAINABLE_SETS:
            raise ValueError(f"unknown trainable set {trainable!r}; choose one of {', '.join(TRAINABLE_SETS)}")
        rule = flux.TRAINABLE_RULES[trainable]
        layers = {}
        for dif, (ldm, rows) in diffusers_slices(self.patcher).items():
            if not rule.search(dif):
                continue
            layer = AdaptedLayer(self.unet.get_submodule(ldm), rank, float(rank), generator, device=self.device,
                                 rows=rows)
            # several slices of one fused weight chain their wrappers: only the first gets the loaded tensor
            self._add_wrapper(f"{ldm}.weight", lambda w, layer=layer: layer.patch_weight(
                w if w.requires_grad else w.detach().clone()))
            layers[dif] = layer
        return AdapterSet(layers, in_place=False)

    def apply_erasure(self, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> None:
        from bierasing.erase.export import peft_tensors

        from .comfy_glue import apply_lora

        self.release()
        self.patcher = apply_lora(self.patcher, peft_tensors(tensors, diffusers_slices(self.patcher)), strength)
