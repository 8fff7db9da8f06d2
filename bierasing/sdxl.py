"""Stable Diffusion XL through diffusers, with an IP-Adapter SDXL image branch.

    bb = SDXLBackbone.from_pretrained("path/to/stable-diffusion-xl-base-1.0",
                                      ip_adapter="path/to/ip-adapter_sdxl_vit-h.safetensors",
                                      image_encoder="path/to/image_encoder")

SDXL conditions its UNet on two text encoders (CLIP-L and OpenCLIP bigG: their penultimate hidden
states concatenated, 768 + 1280 = 2048-d) and on "added conditions": bigG's pooled, projected text
embedding and six size numbers (original h, w, crop top, left, target h, w). The engine passes one
text tensor per prompt, so this backbone packs the pooled embedding as one extra token after the 77
context tokens (zero-padded to 2048) and unpacks it in :meth:`model_output`; the size numbers come
from the training resolution (no crop), as ComfyUI's default SDXL conditioning does.
Both public IP-Adapter SDXL layouts load: ``ip-adapter_sdxl_vit-h`` (ViT-H encoder, 1024-d) and
``ip-adapter_sdxl`` (bigG encoder, 1280-d); their keys number every attn2 as diffusers orders them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .backbone import pack_pooled, unpack_pooled
from .sd15 import SD15Backbone, install_image_branch

SDXL_CONTEXT_DIM = 2048


def size_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's six size conditions for an uncropped image: (h, w, 0, 0, h, w)."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


class SDXLBackbone(SD15Backbone):
    def __init__(self, tokenizers, text_encoders, unet, vae, scheduler, image_encoder=None, image_proj=None,
                 resolution: int = 1024, image_normalization: str = "bi-erasing"):
        super().__init__(tokenizers[0], text_encoders[0], unet, vae, scheduler, image_encoder, image_proj,
                         resolution, image_normalization)
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.pooled_dim = int(text_encoders[1].config.projection_dim)
        self.resolution = resolution

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected text embedding (bigG's)
        context = torch.cat(hidden, dim=-1)
        return pack_pooled(context, pooled.to(context.dtype))

    def cross_attention_tokens(self, text: torch.Tensor) -> torch.Tensor:
        return unpack_pooled(text, self.pooled_dim)[0]

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                     image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        dt = next(self.unet.parameters()).dtype
        context, pooled = unpack_pooled(text.to(dt), self.pooled_dim)
        h, w = (s * 8 for s in x_t.shape[-2:])
        added = {"text_embeds": pooled, "time_ids": size_ids(h, w).to(x_t.device, dt).expand(x_t.shape[0], -1)}
        kwargs = {"ip_hidden_states": image_tokens.to(dt)} if image_tokens is not None else None
        out = self.unet(x_t.to(dt), t, encoder_hidden_states=context, added_cond_kwargs=added,
                        cross_attention_kwargs=kwargs).sample
        return out.to(x_t.dtype)

    def networks(self) -> tuple:
        return (*super().networks(), *self.text_encoders)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, ip_adapter: str | os.PathLike | None = None,
                        image_encoder: str | os.PathLike | None = None, resolution: int = 1024,
                        device: str = "cpu", dtype: torch.dtype = torch.float32,
                        image_normalization: str = "bi-erasing") -> "SDXLBackbone":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = Path(model_dir)
        for sub in ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root} is not a diffusers SDXL folder: {sub}/ is missing")
        kw = {"torch_dtype": dtype, "use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(root / "unet", **kw)
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"{root}/unet has no SDXL added conditions (addition_embed_type "
                             f"{unet.config.addition_embed_type!r}); is this an SD1.x/2.x folder?")
        toks = [CLIPTokenizer.from_pretrained(root / s) for s in ("tokenizer", "tokenizer_2")]
        encs = [CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
                CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw)]
        vae = AutoencoderKL.from_pretrained(root / "vae", **kw)
        sched = DDPMScheduler.from_pretrained(root / "scheduler")
        return cls.assemble_xl(toks, encs, unet, vae, sched, ip_adapter, image_encoder, resolution, device,
                               dtype, image_normalization)

    @classmethod
    def assemble_xl(cls, tokenizers, text_encoders, unet, vae, scheduler, ip_adapter=None, image_encoder=None,
                    resolution: int = 1024, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    image_normalization: str = "bi-erasing") -> "SDXLBackbone":
        """The backbone of loaded components (image branch from ``ip_adapter`` + ``image_encoder``, both
        or neither), on ``device``, frozen."""
        if (ip_adapter is None) != (image_encoder is None):
            raise ValueError("give both ip_adapter and image_encoder for the image branch, or neither")
        enc = proj = None
        if ip_adapter is not None:
            enc, proj = install_image_branch(unet, ip_adapter, image_encoder, dtype)
        bb = cls(tokenizers, text_encoders, unet, vae, scheduler, enc, proj, resolution, image_normalization)
        for m in (*text_encoders, unet, vae, enc, proj):
            if m is not None:
                m.to(device)
        return bb.eval()
