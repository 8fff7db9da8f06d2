"""Decoupled image cross-attention (IP-Adapter, Ye et al. 2023) for diffusers UNets.

In every cross-attention layer (attn2) the text attention gets a parallel image channel:

    Z = softmax(Q K_t^T / sqrt(d)) V_t + scale * softmax(Q K_i^T / sqrt(d)) V_i

with K_i = c_i W'_k, V_i = c_i W'_v (``to_k_ip`` / ``to_v_ip``) and image tokens
c_i = LayerNorm(Linear(image_embeds)) reshaped to N tokens (``ImageProjModel``).

Image tokens travel to the processors as ``cross_attention_kwargs={"ip_hidden_states": tokens}``,
a name diffusers forwards to processors that accept it and silently drops for the rest (attn1).
The key names match ``ip-adapter_sd15`` (``image_proj.proj``, ``image_proj.norm``,
``ip_adapter.<k>.to_k_ip``), so the official SD1.5 weights load into the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageProjModel(nn.Module):
    """image_embeds [B, E] -> image tokens [B, N, D] (IP-Adapter's projector)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)


class DecoupledCrossAttnProcessor(nn.Module):
    """attn2 processor with a parallel image channel; text-only when no image tokens are given."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.attention_store: list | None = None  # set to a list to record text attention maps
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # B,C,H,W -> B,HW,C
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(encoder_hidden_states))
        value = _heads(attn, attn.to_v(encoder_hidden_states))
        out = F.scaled_dot_product_attention(query, key, value)  # B,heads,L,d
        if self.attention_store is not None:  # [B, HW, tokens], averaged over heads
            probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
            self.attention_store.append(probs.mean(1).detach())
        if ip_hidden_states is not None and self.scale != 0:
            ip_key = _heads(attn, self.to_k_ip(ip_hidden_states))
            ip_value = _heads(attn, self.to_v_ip(ip_hidden_states))
            out = out + self.scale * F.scaled_dot_product_attention(query, ip_key, ip_value)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # B,L,h*d -> B,h,L,d


def attn2_names(unet: nn.Module) -> list[str]:
    """Processor names (diffusers ``attn_processors`` keys) of the cross-attention layers."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def install_decoupled_attention(unet: nn.Module, scale: float = 1.0) -> dict[str, DecoupledCrossAttnProcessor]:
    """Give every attn2 layer of ``unet`` a decoupled image channel; returns the new processors.

    attn1 layers keep diffusers' default processor.  Raises if the UNet has no cross-attention.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors, created = {}, {}
    for name, attn in _attention_modules(unet).items():
        key = f"{name}.processor"
        if name.endswith("attn2"):
            proc = DecoupledCrossAttnProcessor(attn.to_q.out_features, attn.to_k.in_features, scale)
            proc.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)
            processors[key] = created[key] = proc
        else:
            processors[key] = AttnProcessor2_0()
    if not created:
        raise ValueError("this UNet has no cross-attention (attn2) layers to attach an image branch to")
    unet.set_attn_processor(processors)
    return created


def _attention_modules(unet: nn.Module) -> dict:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def ip_adapter_state_dict(image_proj: ImageProjModel, unet: nn.Module) -> dict[str, torch.Tensor]:
    """State dict in the ``ip-adapter_sd15`` layout: image_proj.* and ip_adapter.<k>.to_{k,v}_ip.*.

    <k> numbers every attention processor in ``unet.attn_processors`` order (attn1 and attn2), as
    the official IP-Adapter does, so attn2 layers get odd numbers in SD1.5.
    """
    sd = {f"image_proj.{k}": v for k, v in image_proj.state_dict().items()}
    for k, (name, proc) in enumerate(unet.attn_processors.items()):
        if isinstance(proc, DecoupledCrossAttnProcessor):
            sd[f"ip_adapter.{k}.to_k_ip.weight"] = proc.to_k_ip.weight
            sd[f"ip_adapter.{k}.to_v_ip.weight"] = proc.to_v_ip.weight
    return sd


def load_ip_adapter_state_dict(sd: dict[str, torch.Tensor], image_proj: ImageProjModel,
                               unet: nn.Module) -> None:
    """Inverse of :func:`ip_adapter_state_dict`; names any missing or mis-shaped tensor."""
    proj_sd = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    missing = set(image_proj.state_dict()) - set(proj_sd)
    if missing:
        raise ValueError(f"adapter weights lack image projector tensors: {sorted(missing)}")
    image_proj.load_state_dict(proj_sd)
    for k, (name, proc) in enumerate(unet.attn_processors.items()):
        if not isinstance(proc, DecoupledCrossAttnProcessor):
            continue
        for part in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{k}.{part}.weight"
            if key not in sd:
                raise ValueError(f"adapter weights lack {key} (for {name}); is this an IP-Adapter "
                                 "file for this UNet architecture?")
            layer = getattr(proc, part)
            if tuple(sd[key].shape) != tuple(layer.weight.shape):
                raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, this UNet needs "
                                 f"{tuple(layer.weight.shape)}")
            with torch.no_grad():
                layer.weight.copy_(sd[key])
