"""ShapesWorld-Flow: the same world as a rectified-flow transformer in the FLUX layout.

    weights_flow/
      tokenizer/, text_encoder/, image_encoder/   as the UNet world (CLIP-like, trained contrastively)
      vae/                                        AutoencoderKL: 32x32 RGB <-> 4x8x8 latents,
                                                  scaling and shift factors as FLUX's VAE has them
      transformer/                                FluxTransformer2DModel: double-stream then
                                                  single-stream blocks, RoPE, pooled text vector;
                                                  latents packed 2x2 as FLUX packs them (16 tokens)
      redux.safetensors                           redux_up / redux_down (flux1-redux-dev key layout)
      world.json, model_card.md

Text conditioning is the text encoder's token sequence (FLUX: T5) plus its pooled vector (FLUX:
CLIP-L's ``pooler_output``; here the projected ``text_embeds``, the same width). The image branch is
Redux: the image encoder's class state goes through ``redux_down(silu(redux_up(h)))`` into the
text-token space and is appended after the text tokens ``redux_tokens`` times (worlds saved before
2026-12-06 append every hidden state, ``redux_tokens`` 0). The backbone packs the pooled vector as
one extra text token (as the SDXL backbone does) so the engine keeps one tensor per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import flux
from ..flux import ReduxProjector
from . import data
from .models import ShapesWorldBackbone


@dataclass
class FlowWorldConfig:
    """Sizes of the flow world (the defaults are the shipped model)."""

    max_text_len: int = field(default=16, metadata={"help": "text tokens incl. BOS/EOS/padding"})
    text_width: int = field(default=64, metadata={"help": "text encoder width = joint_attention_dim"})
    text_layers: int = 2
    vision_width: int = 64
    vision_layers: int = 2
    embed_dim: int = 64
    ae_channels: tuple[int, ...] = field(default=(32, 64, 64), metadata={
        "help": "autoencoder widths; each level after the first halves the side (32 px -> 8)"})
    latent_channels: int = 4
    patch: int = field(default=2, metadata={"help": "latent pixels per side of one image token (FLUX: 2)"})
    heads: int = 4
    head_dim: int = 32
    double_blocks: int = field(default=4, metadata={
        "help": "double-stream blocks: the caption's tokens get their own layers (2 + 4 single read shape "
                "from the pooled vector only: shape 0.855; 4 + 2: 0.94, docs/shapesworld.md)"})
    single_blocks: int = 2
    redux_hidden: int = field(default=256, metadata={"help": "width of Redux's up projection"})
    redux_tokens: int = field(default=16, metadata={
        "help": "Redux appends the image encoder's class state this many times. n copies of a token are "
                "one token with log(n) added to its attention logits (ComfyUI's Redux 'attn_bias' "
                "strength): one copy is outweighed by the empty prompt's 16 tokens. 0 = every hidden "
                "state once (worlds saved before 2026-12-06)"})
    num_train_timesteps: int = 1000
    shift: float = field(default=3.0, metadata={
        "help": "time shift of the sigma schedule, for training and sampling (SD3: 3; FLUX: 1.15-3 by "
                "resolution); > 1 spends more of both at high noise, where a shape is decided"})

    def __post_init__(self):
        if self.embed_dim != self.text_width:
            raise ValueError("the pooled text vector travels as one more text token: embed_dim must equal "
                             f"text_width, got {self.embed_dim} and {self.text_width}")
        if self.latent_side % self.patch:
            raise ValueError(f"patch must divide the {self.latent_side}-px latent (got {self.patch})")

    @property
    def latent_side(self) -> int:
        return data.IMAGE_SIZE // 2 ** (len(self.ae_channels) - 1)

    @classmethod
    def from_json(cls, d: dict) -> "FlowWorldConfig":
        return cls(**{"redux_tokens": 0, **d, "ae_channels": tuple(d["ae_channels"])})


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head (FLUX: 16/56/56 of 128): a quarter-ish for the text axis, rest by row/col."""
    a = (head_dim // 8) * 2
    b = ((head_dim - a) // 4) * 2
    return a, b, head_dim - a - b


def build_flow_models(cfg: FlowWorldConfig, tokenizer) -> dict:
    """Fresh (random) encoders, autoencoder, transformer and Redux projector."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from .models import build_encoders

    enc = build_encoders(cfg, tokenizer)
    n = len(cfg.ae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.ae_channels,
                        layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8,
                        sample_size=data.IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0,
                        mid_block_add_attention=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.latent_channels * cfg.patch ** 2, num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width, pooled_projection_dim=cfg.embed_dim, guidance_embeds=False,
        axes_dims_rope=rope_axes(cfg.head_dim))
    redux = ReduxProjector(cfg.vision_width, cfg.redux_hidden, cfg.text_width)
    return {**enc, "vae": vae, "transformer": transformer, "redux": redux}


class FlowWorldBackbone(flux.FlowPredictions, ShapesWorldBackbone):
    """The flow world behind the Backbone interface, in the engine's variance-preserving terms
    (``bierasing.flux``: x_t here is x_s / c, predictions convert from velocity to epsilon)."""

    arch = "flow"

    def __init__(self, tokenizer, text_encoder, image_encoder, vae, transformer, redux, config: FlowWorldConfig):
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.unet = transformer  # the denoiser, under the name the engine uses for every model
        self.image_proj = redux
        self.scheduler = None
        self.config = config
        self.sigmas = flux.flow_sigmas(config.num_train_timesteps, config.shift)
        self.alphas_cumprod = flux.alphas_cumprod_of(self.sigmas)
        self.flow_scale = flux.vp_to_flow_scale(self.sigmas)  # c per timestep: x_s = c x_t
        side = config.latent_side
        self.sample_shape = (config.latent_channels, side, side)
        side //= config.patch
        self._img_ids = flux.image_ids(side, side)
        self._recorders = flux.install_attention_recorders(transformer)

    def networks(self) -> tuple:
        return self.text_encoder, self.image_encoder, self.vae, self.unet, self.image_proj

    # ---- latents -----------------------------------------------------------------------------
    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> latents, normalised by the VAE's shift and scaling factors (as FLUX does)."""
        c = self.vae.config
        z = self.vae.encode(images.to(self.device) * 2 - 1).latent_dist.mean
        return (z - c.shift_factor) * c.scaling_factor

    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        return ((self.vae.decode(x0 / c.scaling_factor + c.shift_factor).sample + 1) / 2).clamp(0, 1)

    # ---- conditioning ------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states [B, L, D] with the pooled vector appended as token L+1."""
        out = self.text_encoder(input_ids=self.tokenize(prompts))
        return torch.cat([out.last_hidden_state, out.text_embeds[:, None]], 1)

    def hidden_states_of_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.device) * 2 - 1
        return self.image_encoder(pixel_values=pixels).last_hidden_state

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Redux tokens [B, redux_tokens, D] (or one per hidden state, see FlowWorldConfig)."""
        return self.redux_tokens_of(self.hidden_states_of_images(images))

    def redux_tokens_of(self, states: torch.Tensor) -> torch.Tensor:
        n = self.config.redux_tokens
        if not n:
            return self.image_proj(states)
        return self.image_proj(states[:, :1]).repeat(1, n, 1)

    # ---- the denoiser ------------------------------------------------------------------------
    def velocity(self, x_flow: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's velocity prediction on the flow state x_s (images of x's shape)."""
        p = self.config.patch
        dt = next(self.unet.parameters()).dtype
        tokens, pooled = text[:, :-1], text[:, -1]
        if image_tokens is not None:
            tokens = torch.cat([tokens, image_tokens.to(tokens.dtype)], 1)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=x_flow.device)
        out = self.unet(hidden_states=flux.pack(x_flow, p).to(dt), encoder_hidden_states=tokens.to(dt),
                        pooled_projections=pooled.to(dt), timestep=sigma.to(dt),
                        img_ids=self._img_ids.to(x_flow.device), txt_ids=txt_ids).sample
        c, h, w = x_flow.shape[1:]
        return flux.unpack(out, p, c, h, w).to(x_flow.dtype)

    # ---- persistence -------------------------------------------------------------------------
    def _save_denoiser(self, folder: Path) -> None:
        from safetensors.torch import save_file

        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.unet.save_pretrained(folder / "transformer", safe_serialization=True)
        save_file({k: v.detach().contiguous() for k, v in self.image_proj.state_dict().items()},
                  str(folder / "redux.safetensors"))

    @classmethod
    def _load_denoiser(cls, path: Path, config: dict, tokenizer, text, vision) -> "FlowWorldBackbone":
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from safetensors.torch import load_file

        cfg = FlowWorldConfig.from_json(config)
        vae = AutoencoderKL.from_pretrained(path / "vae")
        transformer = FluxTransformer2DModel.from_pretrained(path / "transformer")
        redux = ReduxProjector(cfg.vision_width, cfg.redux_hidden, cfg.text_width)
        redux.load_state_dict(load_file(str(path / "redux.safetensors")))
        return cls(tokenizer, text, vision, vae, transformer, redux, cfg)
