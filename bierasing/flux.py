"""Rectified-flow transformers in the FLUX layout (diffusers ``FluxTransformer2DModel``).

What every flow backbone shares: packing images into patch tokens, position ids for RoPE, the
sigma schedule and the trainable sets in transformer module names.

The engine is written in DDPM terms (``alphas_cumprod``, epsilon, DDIM). A flow model fits it
exactly: its state ``x_s = (1 - s) x0 + s n`` is a variance-preserving state rescaled,

    x_vp = x_s / c,  c = sqrt((1 - s)^2 + s^2),  alpha_bar = (1 - s)^2 / c^2,

so ``x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) n``, the noise is the same n, and the velocity
``v = n - x0`` gives ``eps = x_s + (1 - s) v``. A DDIM step on x_vp is exactly an Euler step of the
flow ODE on x_s, so the engine's sampler, x_t sources and guidance targets (affine combinations of
predictions at one x_t) mean the same in both spaces; docs/flow.md has the algebra.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

#: trainable sets (adapters.TRAINABLE_SETS names) in diffusers FluxTransformer2DModel module names.
#: "attn2" is what reads the text: in a double-stream block the text side of the joint attention
#: (image queries attend to keys and values from add_k_proj / add_v_proj, as attn2's to_k / to_v),
#: and the projection of the pooled text vector into every block's modulation (BFL: vector_in).
#: The pooled path matters: on ShapesWorld-Flow, with the joint attention alone, every method left
#: "red" drawn in 0.95-1.00 of samples (the colour reaches the image through the modulation).
_TEXT_SIDE = r"transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_POOLED = r"time_text_embed\.text_embedder\.linear_[12]$"
TRAINABLE_RULES = {
    "attn2": re.compile(rf"^({_TEXT_SIDE}|{_POOLED})"),
    "attn2_kv": re.compile(r"^transformer_blocks\.\d+\.attn\.(add_k_proj|add_v_proj)$"),
    "attn": re.compile(r"^(single_)?transformer_blocks\.\d+\.attn\."),
    "no_attn2": re.compile(rf"^(?!{_TEXT_SIDE})(single_)?transformer_blocks\."),
    "full": re.compile(r"^(?!time_text_embed\.timestep_embedder\.)"),
}


def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], FLUX's ``b c (h ph) (w pw) -> b (h w) (c ph pw)``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b = tokens.shape[0]
    x = tokens.view(b, height // patch, width // patch, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """RoPE position ids of the image tokens, [rows * cols, 3] = (0, row, col) as in FLUX."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.view(-1, 3)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX / SD3's time shift s' = k s / (1 + (k - 1) s); k > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_train_timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """sigma of each integer timestep t: (t + 1) / (T + 1), shifted. The top one stays just below 1 so
    that alpha_bar > 0 (pure noise starts sampling, as SD's alpha_bar_T ~ 0.005 does)."""
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / (num_train_timesteps + 1)
    return shift_sigmas(s, shift).float()


def alphas_cumprod_of(sigmas: torch.Tensor) -> torch.Tensor:
    """The variance-preserving alpha_bar equal to each flow sigma (module docstring)."""
    s = sigmas.double()
    return ((1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)).float()


def vp_to_flow_scale(sigmas: torch.Tensor) -> torch.Tensor:
    """c = sqrt((1 - s)^2 + s^2): x_s = c x_vp."""
    s = sigmas.double()
    return ((1 - s) ** 2 + s ** 2).sqrt().float()


def velocity_to_eps(v: torch.Tensor, x_flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = x_s + (1 - s) v (module docstring)."""
    return x_flow + (1 - sigma) * v


def install_attention_recorders(transformer) -> list:
    """A recording processor on every double-stream block's joint attention (no weights; the forward
    is unchanged); returned in block order. Set ``attention_store`` to a list to record."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class FluxAttentionRecorder(FluxAttnProcessor):
        """FluxAttnProcessor that can also record the image tokens' attention to the text tokens."""

        def __init__(self):
            super().__init__()
            self.attention_store: list | None = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if self.attention_store is not None and encoder_hidden_states is not None:
                self.attention_store.append(_text_attention(attn, hidden_states, encoder_hidden_states,
                                                            image_rotary_emb))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    recorders = []
    for block in transformer.transformer_blocks:
        rec = FluxAttentionRecorder()
        block.attn.set_processor(rec)
        recorders.append(rec)
    return recorders


def _text_attention(attn, hidden_states, encoder_hidden_states, rotary) -> torch.Tensor:
    """[B, image tokens, text tokens]: softmax attention of each image query over the joint sequence,
    its text columns, averaged over heads (what attn2 maps are for a UNet)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x, norm):
        return norm(x.unflatten(-1, (-1, attn.head_dim)))

    q = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                   heads(attn.to_q(hidden_states), attn.norm_q)], 1)
    k = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                   heads(attn.to_k(hidden_states), attn.norm_k)], 1)
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    n_txt = encoder_hidden_states.shape[1]
    q, k = q.transpose(1, 2)[:, :, n_txt:], k.transpose(1, 2)  # B, heads, tokens, d
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return probs[..., :n_txt].mean(1).detach()


class ReduxProjector(nn.Module):
    """FLUX Redux's image embedder (``flux1-redux-dev`` keys): image-encoder states -> text-space tokens."""

    def __init__(self, vision_width: int, hidden: int, text_width: int):
        super().__init__()
        self.redux_up = nn.Linear(vision_width, hidden)
        self.redux_down = nn.Linear(hidden, text_width)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(states)))


class FlowPredictions:
    """The Backbone methods every flow transformer shares, in the engine's variance-preserving terms
    (module docstring). A subclass sets ``sigmas`` and ``flow_scale`` (per integer timestep),
    ``unet`` (the transformer) and ``_recorders``, and implements ``velocity``."""

    prediction_type = "flow"
    clip_sample = False  # latents are not bounded
    sigmas: torch.Tensor
    flow_scale: torch.Tensor

    def velocity(self, x_flow: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                 image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """Euler from pure noise: the grid starts at the top timestep ("trailing" spacing)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"sampling steps must be in 1..{T}, got {steps}")
        return torch.linspace(T - 1, 0, steps + 1)[:-1].round().long()

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                     image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity at the flow state of ``x_t``. Rows whose image tokens are all zero run without
        image tokens: appended Redux tokens are never a no-op (zeros still take attention), and the
        engine marks an image-less row in a mixed batch with zeros."""
        sigma = self.sigmas.to(x_t.device)[t]
        x_flow = x_t * self.flow_scale.to(x_t.device)[t].view(-1, 1, 1, 1)
        if image_tokens is None:
            return self.velocity(x_flow, sigma, text)
        has = image_tokens.flatten(1).abs().amax(1) > 0
        if has.all():
            return self.velocity(x_flow, sigma, text, image_tokens)
        if not has.any():
            return self.velocity(x_flow, sigma, text)
        a, b = has.nonzero().flatten(), (~has).nonzero().flatten()
        out = torch.cat([self.velocity(x_flow[a], sigma[a], text[a], image_tokens[a]),
                         self.velocity(x_flow[b], sigma[b], text[b])])
        return out[torch.cat([a, b]).argsort()]

    def output_to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        view = (-1, 1, 1, 1)
        sigma = self.sigmas.to(x_t.device)[t].view(view).to(x_t.dtype)
        c = self.flow_scale.to(x_t.device)[t].view(view).to(x_t.dtype)
        return velocity_to_eps(out, c * x_t, sigma)

    def trainable_rules(self):
        return TRAINABLE_RULES

    def attn2_modules(self) -> dict[str, nn.Module]:
        """The joint attention of the double-stream blocks: where image tokens read the text."""
        return {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(self.unet.transformer_blocks)}

    def attention_recorders(self) -> list:
        return self._recorders
