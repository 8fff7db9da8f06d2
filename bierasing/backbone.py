"""The small interface the erasure engine needs from a text-to-image diffusion model.

Designed for Stable Diffusion 1.5 (diffusers UNet2DConditionModel + CLIP text encoder + an
IP-Adapter image branch); ShapesWorld is its smallest implementation and ComfyUI's MODEL another.

Conventions:
  * images are float BCHW RGB in [0, 1];
  * ``x`` is the diffusion variable (VAE latents for SD, pixels in [-1, 1] for ShapesWorld);
  * ``t`` is a LongTensor of DDPM timesteps in [0, num_train_timesteps);
  * predictions are always returned as noise (epsilon), whatever the model was trained to predict
    (epsilon, v or flow velocity), so guidance targets (ESD, CFG) are written once for every model;
  * a rectified-flow model is seen through its equivalent variance-preserving schedule
    (:mod:`bierasing.flux`), where a DDIM step is its own Euler step.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import nn

#: words that make a concept phrase a whole-image concept (see ``Backbone.is_whole_image``)
WHOLE_IMAGE_WORDS = ("style", "background")


def pack_pooled(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B, L, D] context and [B, P] pooled (P <= D) -> [B, L + 1, D]: the pooled vector as a last token."""
    if pooled.shape[-1] > context.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the context width {context.shape[-1]}")
    last = torch.nn.functional.pad(pooled, (0, context.shape[-1] - pooled.shape[-1]))
    return torch.cat([context, last[:, None].to(context.dtype)], dim=1)


def unpack_pooled(text: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_pooled`."""
    return text[:, :-1], text[:, -1, :pooled_dim]


class Backbone(abc.ABC):
    """A text-to-image diffusion model with an optional decoupled image branch."""

    unet: nn.Module
    #: alphas_cumprod of the training noise schedule, shape [num_train_timesteps]
    alphas_cumprod: torch.Tensor
    #: "epsilon", "v_prediction" or "flow" (velocity): what ``unet`` (the denoiser) itself outputs
    prediction_type: str = "epsilon"
    #: clip x0 to [-1, 1] while sampling (pixel-space models)
    clip_sample: bool = False
    #: shape of one sample of x, without batch dimension
    sample_shape: tuple[int, int, int]
    #: key layout of saved erasures (:mod:`bierasing.erase.export`): "kohya" for UNets, "peft" for FLUX
    lora_layout: str = "kohya"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def networks(self) -> tuple:
        """The model's torch modules (None where absent)."""
        return (self.unet,)

    def eval(self):
        """Every network in eval mode with gradients off: the frozen model (adapters add the trainables)."""
        for m in self.networks():
            if m is not None:
                m.eval().requires_grad_(False)
        return self

    @abc.abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text tokens [B, L, D] for cross-attention ("" is the unconditional prompt)."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> image tokens [B, N, D] for the decoupled attention."""

    @property
    def can_encode_images(self) -> bool:
        """Whether ``to_x`` works now (False where its encoder, e.g. ComfyUI's VAE input, is absent)."""
        return True

    @abc.abstractmethod
    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> clean diffusion variable x0."""

    @abc.abstractmethod
    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean diffusion variable x0 -> images [B, 3, H, W] in [0, 1]."""

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                     image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (in ``prediction_type``), computed in the UNet's own dtype and
        returned in ``x_t``'s (a bf16/fp16 model samples and trains from fp32 latents)."""
        dt = next(self.unet.parameters()).dtype
        kwargs = {"ip_hidden_states": image_tokens.to(dt)} if image_tokens is not None else None
        out = self.unet(x_t.to(dt), t, encoder_hidden_states=text.to(dt), cross_attention_kwargs=kwargs).sample
        return out.to(x_t.dtype)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """epsilon(x_t, t, text[, image]) - the noise-prediction every objective is written in."""
        out = self.model_output(x_t, t, text, image_tokens)
        return self.output_to_eps(out, x_t, t)

    def output_to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    # ---- what the erasure job asks of a model about concepts ----------------------------------
    # The defaults suit a general text-to-image model (SD1.x); a model that knows its own
    # vocabulary (ShapesWorld) overrides them. Nothing outside a backbone special-cases a model.

    #: square size exemplar images from a folder are resized to (None: as loaded)
    exemplar_size: int | None = None

    def concept_text(self, concept: str) -> str:
        """The text condition for a concept (a general model reads the phrase as given)."""
        return concept

    def is_whole_image(self, concept: str) -> bool:
        """A concept that is the whole picture (a style, a background), not a thing in it: its
        exemplars are not masked, since a mask would keep the foreground and paint over the
        concept itself. A general model recognises a phrase with the word style or background."""
        words = concept.lower().replace(",", " ").split()
        return any(w in words for w in WHOLE_IMAGE_WORDS)

    def default_safe(self, concept: str) -> str:
        """The safe alternative to use when none is given ("" = none known: the user names one)."""
        return ""

    def erasure_scorer(self):
        """What scores an erased model (:class:`bierasing.erase.scoring.ErasureScorer`)."""
        from .erase.scoring import ErasureScorer

        return ErasureScorer()

    def suggest_related(self, pairs: list[tuple[str, str]], n_contexts: int
                        ) -> tuple[list[str], list[list[tuple[str, str]]]]:
        """Prompts an erasure of the (target, safe) ``pairs`` should hold unchanged, and for each
        pair up to ``n_contexts`` (target, safe) prompt pairs naming both in one shared context:
        :func:`bierasing.related.suggest` over :meth:`related_vocabulary`, read with this model's
        own text encoder (every backbone alike)."""
        from .related import suggest

        return suggest(self, pairs, n_contexts)

    def related_vocabulary(self, concept: str):
        """The phrases and context templates :mod:`bierasing.related` ranks for ``concept`` with this
        model's text encoder (a general model: the shipped vocabulary)."""
        from .related import shipped_vocabulary

        return shipped_vocabulary()

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The descending timestep grid of a ``steps``-step sampler (DDIM "leading" spacing; a flow
        model starts at the top timestep)."""
        from .sampling import ddim_timesteps

        return ddim_timesteps(self.num_train_timesteps, steps)

    def trainable_rules(self) -> dict | None:
        """Trainable-set rules (set name -> regex on module names) for a denoiser that is not a
        diffusers UNet (None: the UNet rules of :mod:`bierasing.erase.adapters`)."""
        return None

    def attach_adapters(self, trainable: str, rank: int, generator: torch.Generator | None = None):
        """Trainable adapters on the UNet's ``trainable`` set (:class:`bierasing.erase.adapters.AdapterSet`).
        A diffusers UNet gets its modules wrapped in place (``AdapterSet.remove`` undoes it); ComfyUI's
        MODEL attaches them to a clone through weight wrappers instead."""
        from .erase.adapters import attach

        return attach(self.unet, trainable, rank, generator=generator, names=self.module_name_map(),
                      rules=self.trainable_rules())

    def module_name_map(self) -> dict[str, str] | None:
        """Module names of ``self.unet`` -> diffusers names, for trainable-set selection (None: the
        UNet already uses diffusers names)."""
        return None

    def attn2_modules(self) -> dict[str, nn.Module]:
        """Cross-attention modules by name (``down_blocks.2.attentions.0...attn2``)."""
        from diffusers.models.attention_processor import Attention

        return {n: m for n, m in self.unet.named_modules()
                if isinstance(m, Attention) and n.endswith("attn2")}

    def attention_recorders(self) -> list:
        """Objects with an ``attention_store`` list slot that record attn2 text-attention maps."""
        from .adapter import DecoupledCrossAttnProcessor

        return [m.processor for m in self.attn2_modules().values()
                if isinstance(getattr(m, "processor", None), DecoupledCrossAttnProcessor)]

    def frozen_weight(self, module: nn.Module) -> torch.Tensor:
        """``module``'s weight as the model computes with it (a closed-form edit solves against it)."""
        return module.weight

    def cross_attention_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """The tokens of :meth:`encode_text`'s output [B, L, D] that cross-attention reads as keys and
        values (a model that packs more into it, SDXL's pooled vector, drops that)."""
        return text

    def content_token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` between BOS and EOS."""
        return len(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    def word_positions(self, prompt: str, word: str) -> list[int]:
        """Token positions (BOS = 0) of ``word`` inside ``prompt``, for attention maps."""
        p = self.tokenizer(prompt, add_special_tokens=False).input_ids
        w = self.tokenizer(word, add_special_tokens=False).input_ids
        for i in range(len(p) - len(w) + 1):
            if p[i:i + len(w)] == w:
                return [1 + i + k for k in range(len(w))]
        raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}")
