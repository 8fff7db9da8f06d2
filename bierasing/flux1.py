"""FLUX.1 (dev and schnell) through diffusers, with a Redux image branch: the real flow backbone.

    bb = FluxBackbone.from_pretrained("path/to/FLUX.1-dev",
                                      ip_adapter="path/to/flux1-redux-dev.safetensors",
                                      image_encoder="path/to/siglip-so400m-patch14-384")

The folder is a diffusers FLUX.1 pipeline folder (transformer/, text_encoder/ = CLIP-L,
text_encoder_2/ = T5-XXL, tokenizer/, tokenizer_2/, vae/, scheduler/). The image branch is Redux:
a SigLIP vision encoder's last hidden states (post-layernorm, 729 for 384-px images) through
``redux_down(silu(redux_up(h)))``, appended after the T5 tokens (as ComfyUI's StyleModelApply and
BFL's sampler do). Only safetensors weights are read and nothing is downloaded.

Conditioning, as the engine sees it: the T5 token states [B, L, 4096] with CLIP-L's unprojected
``pooler_output`` (768-d, zero-padded) appended as one more token (:func:`bierasing.backbone.pack_pooled`).
L defaults to 256 tokens, as ComfyUI pads T5 and EraseAnything trains (diffusers' pipeline pads to 512).
Each prompt is encoded once and kept; on a GPU the text encoders wait on the CPU and visit the GPU only
to encode new prompts, so training holds the transformer, not T5-XXL's 9.5 GB.

Every prediction - the student's and the frozen teachers' - runs at one embedded guidance value
(FLUX.1-dev's distilled guidance, default 3.5 as ComfyUI's FluxGuidance), so the guidance targets
compare predictions made alike (EraseAnything trains at 3). FLUX.1-schnell has no guidance input.
The sigma schedule is FLUX's resolution-dependent time shift at the erasure resolution (diffusers'
``calculate_shift``; ComfyUI's default is the 1024-px value at every size); schnell is unshifted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from . import flux
from .backbone import Backbone, pack_pooled, unpack_pooled
from .imageprep import vision_pixels
from .io import load_safetensors

#: diffusers' FLUX.1-dev scheduler: mu = base_shift at 256 image tokens, max_shift at 4096, linear between
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
DEV_GUIDANCE = 3.5
SIGLIP_MEAN_STD = ((0.5,) * 3, (0.5,) * 3)


def flux_shift(image_tokens: int, scheduler_config: dict | None = None) -> float:
    """The time shift k = exp(mu) FLUX samples ``image_tokens`` packed tokens with (k s / (1 + (k - 1) s)
    is the exponential shift at mu); 1.0 where the scheduler does not shift (schnell)."""
    cfg = {**SHIFT_DEFAULTS, "use_dynamic_shifting": True, **(scheduler_config or {})}
    if not cfg["use_dynamic_shifting"]:
        return float(cfg.get("shift", 1.0))
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    mu = cfg["base_shift"] + slope * (image_tokens - cfg["base_image_seq_len"])
    return math.exp(mu)


def flux_scorer(guidance: float | None):
    """Before/after samples as FLUX users draw them: no true CFG (dev's embedded guidance does it),
    schnell (no guidance embedding) in 4 steps."""
    from .erase.scoring import ErasureScorer

    scorer = ErasureScorer()
    scorer.guidance = 1.0
    if guidance is None:
        scorer.steps = 4
    return scorer


class FluxBackbone(flux.FlowPredictions, Backbone):
    num_steps = 1000  # integer timesteps the engine draws from (sigma = (t + 1) / 1001, shifted)
    lora_layout = "peft"  # the one LoRA layout ComfyUI and diffusers both load for FLUX (export module)

    def __init__(self, tokenizers, text_encoders, transformer, vae, image_encoder=None, redux=None,
                 resolution: int = 512, guidance: float | None = None, shift: float | None = None,
                 max_text_tokens: int = 256, offload_text_encoders: bool = False):
        if resolution % 16:
            raise ValueError(f"FLUX resolution must be a multiple of 16 (8x VAE, 2x2 packing); got {resolution}")
        self.clip_tokenizer, self.tokenizer = tokenizers  # self.tokenizer: T5's, whose tokens attention reads
        self.clip, self.t5 = text_encoders
        self.unet, self.vae = transformer, vae
        self.image_encoder, self.image_proj = image_encoder, redux
        self.guidance = self._check_guidance(transformer, guidance)
        self.max_text_tokens = max_text_tokens
        self.offload_text_encoders = offload_text_encoders
        self._text_memo: dict[str, torch.Tensor] = {}
        self.pooled_dim = int(transformer.config.pooled_projection_dim)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        side = resolution // f
        self.sample_shape = (int(transformer.config.in_channels) // 4, side, side)
        self._img_ids = flux.image_ids(side // 2, side // 2)
        self.shift = flux_shift((side // 2) ** 2) if shift is None else float(shift)
        self.sigmas = flux.flow_sigmas(self.num_steps, self.shift)
        self.alphas_cumprod = flux.alphas_cumprod_of(self.sigmas)
        self.flow_scale = flux.vp_to_flow_scale(self.sigmas)
        self._recorders = flux.install_attention_recorders(transformer)

    @staticmethod
    def _check_guidance(transformer, guidance: float | None) -> float | None:
        if transformer.config.guidance_embeds:
            return DEV_GUIDANCE if guidance is None else float(guidance)
        if guidance is not None:
            raise ValueError("this FLUX transformer has no guidance embedding (FLUX.1-schnell); leave guidance unset")
        return None

    # ---- conditioning ------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each prompt is encoded once (no gradients) and kept; with ``offload_text_encoders`` the
        encoders wait on the CPU and visit the device only to encode new prompts (T5-XXL is 9.5 GB
        in bf16, so training holds only the transformer)."""
        new = sorted({p for p in prompts if p not in self._text_memo})
        with torch.no_grad(), self._encoders_on_device():
            for i in range(0, len(new), 16):
                chunk = new[i:i + 16]
                clip_ids = self.clip_tokenizer(chunk, padding="max_length", truncation=True,
                                               max_length=self.clip_tokenizer.model_max_length,
                                               return_tensors="pt").input_ids
                pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
                t5_ids = self.tokenizer(chunk, padding="max_length", truncation=True,
                                        max_length=self.max_text_tokens, return_tensors="pt").input_ids
                tokens = self.t5(t5_ids.to(self.device)).last_hidden_state
                for p, row in zip(chunk, pack_pooled(tokens, pooled.to(tokens.dtype))):
                    self._text_memo[p] = row.cpu() if self.offload_text_encoders else row
        return torch.stack([self._text_memo[p] for p in prompts]).to(self.device)

    @contextlib.contextmanager
    def _encoders_on_device(self):
        if not self.offload_text_encoders:
            yield
            return
        for m in (self.clip, self.t5):
            m.to(self.device)
        try:
            yield
        finally:
            for m in (self.clip, self.t5):
                m.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def cross_attention_tokens(self, text: torch.Tensor) -> torch.Tensor:
        return unpack_pooled(text, self.pooled_dim)[0]

    @property
    def can_encode_images(self) -> bool:
        return self.image_encoder is not None and self.image_proj is not None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Redux tokens [B, 729, 4096] for 384-px SigLIP (one per patch)."""
        if not self.can_encode_images:
            raise ValueError("this FLUX model has no image branch: load it with a Redux file (ip_adapter=...) "
                             "and its SigLIP image encoder (image_encoder=...)")
        x = vision_pixels(images.to(self.device), self.image_encoder.config.image_size, *SIGLIP_MEAN_STD)
        states = self.image_encoder(pixel_values=x.to(next(self.image_encoder.parameters()).dtype)).last_hidden_state
        return self.image_proj(states.to(next(self.image_proj.parameters()).dtype))

    def word_positions(self, prompt: str, word: str) -> list[int]:
        """Token positions of ``word`` in ``prompt``: T5 has no BOS, its first token is position 0."""
        return [p - 1 for p in super().word_positions(prompt, word)]

    # ---- latents -----------------------------------------------------------------------------
    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        z = self.vae.encode(images.to(self.device, next(self.vae.parameters()).dtype) * 2 - 1).latent_dist.mean
        return ((z.float() - c.shift_factor) * c.scaling_factor)

    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        z = (x0 / c.scaling_factor + c.shift_factor).to(next(self.vae.parameters()).dtype)
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    # ---- the transformer ---------------------------------------------------------------------
    def velocity(self, x_flow: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        dt = next(self.unet.parameters()).dtype
        tokens, pooled = unpack_pooled(text, self.pooled_dim)
        if image_tokens is not None:
            tokens = torch.cat([tokens, image_tokens.to(tokens.dtype)], 1)
        b, device = x_flow.shape[0], x_flow.device
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=device, dtype=dt)
        out = self.unet(hidden_states=flux.pack(x_flow, 2).to(dt), encoder_hidden_states=tokens.to(dt),
                        pooled_projections=pooled.to(dt), timestep=sigma.to(dt), guidance=guidance,
                        img_ids=self._img_ids.to(device), txt_ids=torch.zeros(tokens.shape[1], 3, device=device)).sample
        c, h, w = x_flow.shape[1:]
        return flux.unpack(out, 2, c, h, w).to(x_flow.dtype)

    def erasure_scorer(self):
        return flux_scorer(self.guidance)

    def networks(self) -> tuple:
        return self.clip, self.t5, self.unet, self.vae, self.image_encoder, self.image_proj

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, ip_adapter: str | os.PathLike | None = None,
                        image_encoder: str | os.PathLike | None = None, resolution: int = 512,
                        device: str = "cpu", dtype: torch.dtype = torch.float32, guidance: float | None = None,
                        max_text_tokens: int = 256) -> FluxBackbone:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        root = Path(model_dir)
        for sub in ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root} is not a diffusers FLUX.1 folder: {sub}/ is missing")
        if (ip_adapter is None) != (image_encoder is None):
            raise ValueError("give both the Redux file (ip_adapter) and its SigLIP image encoder, or neither")
        kw = {"torch_dtype": dtype, "use_safetensors": True}
        transformer = FluxTransformer2DModel.from_pretrained(root / "transformer", **kw)
        toks = (CLIPTokenizer.from_pretrained(root / "tokenizer"), AutoTokenizer.from_pretrained(root / "tokenizer_2"))
        encs = (CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
                T5EncoderModel.from_pretrained(root / "text_encoder_2", **kw))
        vae = AutoencoderKL.from_pretrained(root / "vae", **kw)
        sched = root / "scheduler" / "scheduler_config.json"
        side = resolution // 2 ** (len(vae.config.block_out_channels) - 1) // 2
        shift = flux_shift(side * side, json.loads(sched.read_text()) if sched.is_file() else None)
        enc = redux = None
        if ip_adapter is not None:
            enc, redux = load_redux(ip_adapter, image_encoder, int(transformer.config.joint_attention_dim), dtype)
        offload = str(device).startswith("cuda")  # the text encoders wait on the CPU between prompts
        bb = cls(toks, encs, transformer, vae, enc, redux, resolution, guidance, shift, max_text_tokens, offload)
        for m in (transformer, vae, enc, redux) if offload else (*encs, transformer, vae, enc, redux):
            if m is not None:
                m.to(device)
        return bb.eval()


def load_redux(redux_file: str | os.PathLike, image_encoder: str | os.PathLike, text_width: int,
               dtype: torch.dtype = torch.float32):
    """(SigLIP vision encoder, Redux projector) from a ``flux1-redux-dev``-layout file and a
    ``SiglipVisionModel`` folder; widths are checked against each other and the transformer."""
    from transformers import SiglipVisionModel

    sd, _ = load_safetensors(redux_file)
    want = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    if set(sd) != want:
        raise ValueError(f"{Path(redux_file).name} is not a FLUX Redux file: its keys must be {sorted(want)}, "
                         f"got {sorted(sd)[:6]}")
    hidden, vision_width = sd["redux_up.weight"].shape
    if sd["redux_down.weight"].shape != (text_width, hidden):
        raise ValueError(f"{Path(redux_file).name} projects to {sd['redux_down.weight'].shape[0]}-d tokens; "
                         f"this transformer reads {text_width}-d text tokens")
    enc = SiglipVisionModel.from_pretrained(image_encoder, torch_dtype=dtype, use_safetensors=True)
    if enc.config.hidden_size != vision_width:
        raise ValueError(f"the image encoder is {enc.config.hidden_size}-d, the Redux file expects {vision_width}-d "
                         "states (SigLIP so400m: 1152)")
    redux = flux.ReduxProjector(vision_width, hidden, text_width)
    redux.load_state_dict(sd)
    return enc, redux.to(dtype)
