"""Stable Diffusion 1.x through diffusers, with an IP-Adapter image branch: the real-model Backbone.

    bb = SD15Backbone.from_pretrained("path/to/stable-diffusion-v1-5",
                                      ip_adapter="path/to/ip-adapter_sd15.safetensors",
                                      image_encoder="path/to/image_encoder")

Folders are diffusers pipeline folders (unet/, text_encoder/, tokenizer/, vae/, scheduler/); the
image encoder is a ``CLIPVisionModelWithProjection`` folder (ViT-H/14 for ip-adapter_sd15).  Only
safetensors weights are read.  Nothing is downloaded: paths must exist locally.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .adapter import ImageProjModel, install_decoupled_attention, load_ip_adapter_state_dict
from .backbone import Backbone
from .imageprep import vision_pixels
from .io import load_safetensors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SD15Backbone(Backbone):
    clip_sample = False

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, image_encoder=None,
                 image_proj: ImageProjModel | None = None, resolution: int = 512,
                 image_normalization: str = "bi-erasing"):
        if image_normalization not in ("bi-erasing", "clip"):
            raise ValueError("image_normalization must be 'bi-erasing' (mean/std 0.5, the released code) or 'clip'")
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler, self.image_encoder, self.image_proj = scheduler, image_encoder, image_proj
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sample_shape = (unet.config.in_channels, resolution // f, resolution // f)
        self.image_normalization = image_normalization
        self.max_tokens = min(int(tokenizer.model_max_length), text_encoder.config.max_position_embeddings)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_encoder is None or self.image_proj is None:
            raise ValueError("this model has no image branch: load it with ip_adapter=... and image_encoder=...")
        mean, std = ((0.5,) * 3, (0.5,) * 3) if self.image_normalization == "bi-erasing" else (CLIP_MEAN, CLIP_STD)
        x = vision_pixels(images.to(self.device), self.image_encoder.config.image_size, mean, std)
        enc_dtype = next(self.image_encoder.parameters()).dtype
        embeds = self.image_encoder(pixel_values=x.to(enc_dtype)).image_embeds
        return self.image_proj(embeds.to(next(self.image_proj.parameters()).dtype))

    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, next(self.vae.parameters()).dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(x0.to(next(self.vae.parameters()).dtype) / self.scaling_factor).sample
        return ((img.float() + 1) / 2).clamp(0, 1)

    def networks(self) -> tuple:
        return self.text_encoder, self.unet, self.vae, self.image_encoder, self.image_proj

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, ip_adapter: str | os.PathLike | None = None,
                        image_encoder: str | os.PathLike | None = None, resolution: int = 512,
                        device: str = "cpu", dtype: torch.dtype = torch.float32,
                        image_normalization: str = "bi-erasing") -> "SD15Backbone":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(model_dir)
        for sub in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root} is not a diffusers SD1.x folder: {sub}/ is missing")
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, use_safetensors=True)
        if unet.config.cross_attention_dim != 768 or unet.config.in_channels != 4:
            raise ValueError(f"{root} is not an SD1.x UNet (cross_attention_dim "
                             f"{unet.config.cross_attention_dim}, in_channels {unet.config.in_channels}; "
                             "SD1.x has 768 and 4)")
        kw = {"torch_dtype": dtype, "use_safetensors": True}
        text = CLIPTextModel.from_pretrained(root / "text_encoder", **kw)
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
        vae = AutoencoderKL.from_pretrained(root / "vae", **kw)
        sched = DDPMScheduler.from_pretrained(root / "scheduler")
        return cls.assemble(tok, text, unet, vae, sched, ip_adapter, image_encoder, resolution, device, dtype,
                            image_normalization)

    @classmethod
    def assemble(cls, tokenizer, text_encoder, unet, vae, scheduler, ip_adapter=None, image_encoder=None,
                 resolution: int = 512, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 image_normalization: str = "bi-erasing") -> "SD15Backbone":
        """The backbone of loaded components, with the image branch from ``ip_adapter`` +
        ``image_encoder`` (both or neither), on ``device``, frozen."""
        enc = proj = None
        if (ip_adapter is None) != (image_encoder is None):
            raise ValueError("give both ip_adapter and image_encoder for the image branch, or neither")
        if ip_adapter is not None:
            enc, proj = install_image_branch(unet, ip_adapter, image_encoder, dtype)
        bb = cls(tokenizer, text_encoder, unet, vae, scheduler, enc, proj, resolution, image_normalization)
        for m in (text_encoder, unet, vae, enc, proj):
            if m is not None:
                m.to(device)
        return bb.eval()


def install_image_branch(unet, ip_adapter: str | os.PathLike, image_encoder: str | os.PathLike,
                         dtype: torch.dtype = torch.float32):
    """Decoupled image attention on ``unet`` with an ``ip-adapter_sd15``-layout file's weights, and
    its CLIP vision encoder: (image encoder, image projector)."""
    from transformers import CLIPVisionModelWithProjection

    install_decoupled_attention(unet)
    enc = CLIPVisionModelWithProjection.from_pretrained(image_encoder, torch_dtype=dtype, use_safetensors=True)
    sd, _ = load_safetensors(ip_adapter)
    n_tokens = sd["image_proj.proj.weight"].shape[0] // unet.config.cross_attention_dim
    proj = ImageProjModel(enc.config.projection_dim, unet.config.cross_attention_dim, n_tokens)
    load_ip_adapter_state_dict(sd, proj, unet)
    proj.to(dtype)
    unet.to(dtype)
    return enc, proj
