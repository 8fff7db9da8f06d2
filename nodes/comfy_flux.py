"""ComfyUI's FLUX.1 MODEL (dev, schnell) behind the library's Backbone: the FLUX half of the glue.

* velocity through ``BaseModel.apply_model`` (x0 out, v = (x - x0) / sigma) at the flow sigmas of the
  model's own time shift (ModelSamplingFlux's e^1.15 unless a node changed it; schnell 1), dev
  conditioned on guidance 3.5 (FluxGuidance's default) for every prediction;
* conditioning from DualCLIPLoader's CLIP (type flux): T5 (256 tokens) + CLIP-L's pooled vector
  packed as one more token; Redux tokens from a CLIP_VISION (SigLIP) and a ``flux1-redux-dev`` file
  appended after the text, as StyleModelApply does;
* adapters keyed by diffusers names, one per projection: a projection inside a fused ComfyUI weight
  (``img_attn.qkv``, ``linear1``) gets a row-sliced adapter (``AdaptedLayer(rows=...)``), so a file
  made here is the diffusers path's file (``transformer.*`` keys, ``lora_layout`` "peft");
* automatic masks from a ``dit`` double_block replace patch that records each image token's
  attention to the text tokens and then runs the block unchanged.
"""

from __future__ import annotations

import math

import torch

import comfy.utils

from bierasing import flux
from bierasing.backbone import Backbone, pack_pooled, unpack_pooled
from bierasing.flux1 import DEV_GUIDANCE, flux_scorer

from .comfy_glue import ComfyBackbone, plain

POOLED_DIM = 768  # CLIP-L's unprojected pooled output
T5_TOKENS = 256  # ComfyUI pads T5 to 256 tokens for FLUX


def is_flux(model) -> bool:
    """FLUX.1 dev or schnell (16 latent channels; not Fill, Kontext or FLUX.2)."""
    import comfy.model_base

    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return (type(model.model) is comfy.model_base.Flux and cfg.get("image_model") == "flux"
            and cfg.get("in_channels") == 16)


def guidance_of(model) -> float | None:
    """FluxGuidance's default for dev (a guidance embedding); None for schnell."""
    return DEV_GUIDANCE if model.model.model_config.unet_config.get("guidance_embed") else None


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
        if ldm.endswith(".weight"):  # not the QK-norm scales (``.scale``): no Linear to adapt
            out[dif[:-len(".weight")]] = (ldm[:-len(".weight")], rows)
    return out


class OutOfPlace(torch.Tensor):
    """A block's input whose ``+=`` makes a new tensor. ComfyUI's FLUX blocks add their residuals in
    place (``txt += ...``, ``x += ...``) onto tensors their norms saved for the backward, which autograd
    refuses; with this type the block runs unchanged and the saved tensors stay intact."""

    def __iadd__(self, other):
        return self + other


def _run_block(args: dict, extra: dict) -> dict:
    if not torch.is_grad_enabled():
        return extra["original_block"](args)
    wrapped = {k: v.as_subclass(OutOfPlace) if k in ("img", "txt") else v for k, v in args.items()}
    out = extra["original_block"](wrapped)
    return {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class TextAttentionRecorder:
    """A ``dit`` double_block replace patch: with ``attention_store`` set, records [B, image tokens,
    text tokens] (softmax over the joint sequence, text columns, mean over heads), then runs the
    block as ComfyUI would (out of place when training, see :class:`OutOfPlace`)."""

    def __init__(self, block):
        self.block = block
        self.attention_store: list | None = None

    def __call__(self, args: dict, extra: dict) -> dict:
        if self.attention_store is not None:
            with torch.no_grad():
                self.attention_store.append(self._text_attention(args))
        return _run_block(args, extra)

    def _text_attention(self, args: dict) -> torch.Tensor:
        from comfy.ldm.flux.math import apply_rope

        b, img, txt = self.block, args["img"], args["txt"]

        def qk(stream, mod, norm, attn):
            m = mod(args["vec"])[0]
            x = norm(stream) * (1 + m.scale) + m.shift
            q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, b.num_heads, -1).permute(2, 0, 3, 1, 4)
            return attn.norm(q, k, v)

        tq, tk = qk(txt, b.txt_mod, b.txt_norm1, b.txt_attn)
        iq, ik = qk(img, b.img_mod, b.img_norm1, b.img_attn)
        q, k = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)
        if args.get("pe") is not None:
            q, k = apply_rope(q, k, args["pe"])
        n_txt = txt.shape[1]
        probs = (q[:, :, n_txt:].float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return probs[..., :n_txt].mean(1)


class ComfyFluxBackbone(flux.FlowPredictions, ComfyBackbone):
    lora_layout = "peft"

    def __init__(self, model, clip, vae=None, clip_vision=None, redux_weights: dict | None = None,
                 resolution: int = 512):
        if not is_flux(model):
            raise ValueError("not a FLUX.1 dev or schnell MODEL")
        if clip is None:
            raise ValueError("no CLIP connected: load FLUX's text encoders with DualCLIPLoader (clip_l + t5xxl, type flux)")
        if resolution % 16:
            raise ValueError(f"FLUX resolution must be a multiple of 16 (8x VAE, 2x2 packing); got {resolution}")
        self.family = "flux"
        self._attach(model, clip, vae, clip_vision)
        self.guidance = guidance_of(model)
        import comfy.model_sampling

        ms = model.model.model_sampling
        flux_shift = isinstance(ms, comfy.model_sampling.ModelSamplingFlux)  # its shift is mu: k = e^mu
        self.shift = math.exp(ms.shift) if flux_shift else float(getattr(ms, "shift", 1.0))
        self.sigmas = flux.flow_sigmas(1000, self.shift)
        self.alphas_cumprod = flux.alphas_cumprod_of(self.sigmas)
        self.flow_scale = flux.vp_to_flow_scale(self.sigmas)
        self.sample_shape = (16, resolution // 8, resolution // 8)
        self.image_proj = None
        if redux_weights is not None:
            up, down = redux_weights["redux_up.weight"], redux_weights["redux_down.weight"]
            context = model.model.model_config.unet_config.get("context_in_dim", 4096)
            if down.shape[0] != context:
                raise ValueError(f"the Redux file makes {down.shape[0]}-d tokens but this FLUX reads {context}-d text "
                                 "tokens; use flux1-redux-dev with FLUX.1")
            self.image_proj = flux.ReduxProjector(up.shape[1], up.shape[0], down.shape[0])
            self.image_proj.load_state_dict({k: v.float() for k, v in redux_weights.items()})
            self.image_proj.eval().requires_grad_(False)
        self._recorders: list[TextAttentionRecorder] = []

    # ---- conditioning ----------------------------------------------------------------------------
    def _text_tensor(self, prompt: str, cond: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """[1, 257, 4096]: T5's 256 tokens, then CLIP-L's pooled vector packed as one more."""
        if cond.shape[1] != T5_TOKENS:
            raise ValueError(f"the prompt {prompt[:60]!r} is longer than T5's {T5_TOKENS - 1} tokens; shorten it")
        if pooled is None or pooled.shape[-1] != POOLED_DIM:
            raise ValueError("this CLIP gives no 768-d pooled vector: load clip_l and t5xxl with "
                             "DualCLIPLoader, type flux")
        return pack_pooled(cond[:1], pooled[:1].to(cond.dtype))

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
                raise ValueError("image exemplars on FLUX need a CLIP_VISION (SigLIP, sigclip_vision_patch14_384) and "
                                 "the Redux file (flux1-redux-dev) in Load Image Adapter")
            states = self.clip_vision.encode_image(images.permute(0, 2, 3, 1).cpu())["last_hidden_state"]
            width = self.image_proj.redux_up.in_features
            if states.shape[-1] != width:
                raise ValueError(f"the CLIP vision model gives {states.shape[-1]}-d states but Redux reads {width}-d: "
                                 "load SigLIP (sigclip_vision_patch14_384) with Load CLIP Vision")
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

    def erasure_scorer(self):
        return flux_scorer(self.guidance)

    def module_name_map(self):
        return None  # adapters are keyed by diffusers names already

    def attn2_modules(self) -> dict:
        return {f"double_blocks.{i}": b for i, b in enumerate(self.unet.double_blocks)}

    def install_image_branch(self) -> None:
        """Redux tokens travel with the text (nothing to patch); the double blocks get attention
        recorders for automatic masks (idle unless a mask is being made)."""
        if self._recorders:
            return
        for i, block in enumerate(self.unet.double_blocks):
            rec = TextAttentionRecorder(block)
            self.patcher.set_model_patch_replace(rec, "dit", "double_block", i)
            self._recorders.append(rec)
        for i in range(len(self.unet.single_blocks)):
            self.patcher.set_model_patch_replace(_run_block, "dit", "single_block", i)

    def make_trainable(self) -> None:
        """As for UNets, plus the parameters ComfyUI applies no wrapper to (the QK-norm scales): loaded in
        inference mode, they are swapped for ordinary copies by object patches, which the clone puts in
        place when it loads and takes out again when it unloads."""
        super().make_trainable()
        added = False
        for name, m in self.unet.named_modules():
            if hasattr(m, "weight_function"):
                continue
            for pname, p in m.named_parameters(recurse=False):
                key = f"diffusion_model.{name}.{pname}"
                if p.is_inference() and key not in self.patcher.object_patches:
                    self.patcher.add_object_patch(key, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                    added = True
        if added and self._loaded_uuid is not None:  # applied at the next load
            self.patcher.detach()
            self._loaded_uuid = None

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
            # slices of one fused weight chain their wrappers: the first copies the loaded weight, the
            # next ones patch that copy (it already requires grad)
            self._add_wrapper(f"{ldm}.weight", lambda w, layer=layer: layer.patch_weight(
                w if w.requires_grad else w.detach().clone()))
            layers[dif] = layer
        return AdapterSet(layers, in_place=False)

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from bierasing.erase.export import peft_tensors

        return peft_tensors(tensors, diffusers_slices(self.patcher))
