"""Trainable weight adapters on one UNet: the frozen teacher is the same network with them off.

Two kinds, both exact no-ops at step 0:
  * LoRA  (rank r): W x + (alpha / r) * up(down(x)), ``up`` initialised to zero;
  * delta (rank 0): (W + D) x with D initialised to zero - a full fine-tune of the chosen weights
    that still needs no second copy of the UNet.

Trainable sets select modules by diffusers' own names and fail loudly when nothing matches; a UNet
with other module names (ComfyUI's LDM ``UNetModel``) is selected through a name map to diffusers
names (:func:`bierasing.unet_names.ldm_to_diffusers`), so each set means the same layers in both.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# module-name rules for each trainable set (diffusers UNet2DConditionModel names)
TRAINABLE_SETS = {
    "attn2": "cross-attention projections to_q/to_k/to_v/to_out.0 of every attn2 (ESD-x)",
    "attn2_kv": "only attn2.to_k and attn2.to_v (what UCE edits)",
    "attn": "every attention projection: attn1 and attn2 (a transformer: the joint attention of every block)",
    "no_attn2": "every Linear/Conv2d except attn2, the time embeddings and conv_out (ESD-u)",
    "full": "every Linear/Conv2d of the UNet but SDXL's added-condition embedding",
}
_ADDED_COND = ("add_embedding", "class_embedding")
_ATTN2 = re.compile(r"attn2\.(to_q|to_k|to_v|to_out\.0)$")
_ATTN2_KV = re.compile(r"attn2\.(to_k|to_v)$")
_ATTN = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def select_modules(unet: nn.Module, trainable: str, names: Mapping[str, str] | None = None,
                   rules: Mapping[str, re.Pattern] | None = None) -> dict[str, nn.Module]:
    """Linear/Conv2d modules of ``unet`` in a trainable set, keyed by ``unet``'s own module names in
    ``unet.named_modules()`` order; the image branch is never included.

    The rules are written in diffusers UNet2DConditionModel names. ``names`` maps the unet's own
    module names to diffusers module names (no ``.weight`` suffix), e.g. ComfyUI's LDM
    ``time_embed.0`` -> ``time_embedding.linear_1``; each rule is applied to the mapped name. A
    module the map does not name (no diffusers counterpart) is judged by its own name. Without
    ``names`` the own names are taken to be diffusers names. ``rules`` (set name -> regex searched in
    the name) replaces the UNet rules for another denoiser, e.g. a FLUX transformer.
    """
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"unknown trainable set {trainable!r}; choose one of {', '.join(TRAINABLE_SETS)}")
    out = {}
    for own, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, AdaptedLayer) or "processor" in own:
            continue
        if ".base" in own:
            continue
        name = names.get(own, own) if names else own
        if name.startswith(_ADDED_COND):
            continue  # SDXL's label_emb: ComfyUI and diffusers name it differently, so no LoRA key fits both
        if rules is not None:
            keep = bool(rules[trainable].search(name))
        elif trainable == "attn2":
            keep = bool(_ATTN2.search(name))
        elif trainable == "attn2_kv":
            keep = bool(_ATTN2_KV.search(name))
        elif trainable == "attn":
            keep = bool(_ATTN.search(name))
        elif trainable == "no_attn2":
            keep = "attn2" not in name and not name.startswith(("time_embedding", "conv_out"))
        else:
            keep = True
        if keep:
            out[own] = m
    if not out:
        raise ValueError(f"trainable set {trainable!r} matched no module of this UNet; is it a "
                         "diffusers UNet2DConditionModel with cross-attention (or a UNet given with a "
                         "name map to diffusers names)?")
    return out


class AdaptedLayer(nn.Module):
    """A Linear or Conv2d with a switchable trainable adapter (LoRA if rank > 0, else a full delta)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, rows: tuple[int, int] | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.enabled = True
        self.multiplier = 1.0
        #: (offset, size): only these output rows change - one projection inside a fused weight
        #: (ComfyUI's FLUX keeps q, k and v in one ``qkv`` Linear; diffusers splits them)
        self.rows = rows
        if rows is not None and not (isinstance(base, nn.Linear) and 0 <= rows[0] < rows[0] + rows[1]
                                     <= base.out_features):
            raise ValueError(f"rows {rows} do not lie inside this layer's {getattr(base, 'out_features', '?')} outputs")
        w = base.weight
        dev = w.device if device is None else torch.device(device)  # ComfyUI: where the model computes
        f32 = torch.float32  # adapters and their optimiser state stay fp32 whatever the model's dtype
        if rank > 0:
            self.alpha = float(alpha)
            if isinstance(base, nn.Linear):
                down = torch.empty(rank, base.in_features, dtype=f32)
                out = rows[1] if rows else base.out_features
                self.up = nn.Parameter(torch.zeros(out, rank, dtype=f32, device=dev))
            else:
                down = torch.empty(rank, base.in_channels, *base.kernel_size, dtype=f32)
                self.up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, dtype=f32, device=dev))
            bound = 1 / math.sqrt(down[0].numel())  # kaiming-uniform(a=sqrt(5)) bound, seeded
            down.uniform_(-bound, bound, generator=generator)
            self.down = nn.Parameter(down.to(dev))
        else:
            self.alpha = 0.0
            shape = (rows[1], *w.shape[1:]) if rows else w.shape
            self.delta = nn.Parameter(torch.zeros(shape, dtype=f32, device=dev))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 1.0

    def delta_weight(self) -> torch.Tensor:
        """The weight change this adapter applies, shaped like ``base.weight``."""
        if self.rank == 0:
            return self.delta
        if self.up.ndim == 2:
            return self.scale * self.up @ self.down
        return self.scale * torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0], self.down)

    def patch_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` + this adapter's change, in ``w``'s dtype and device: the form ComfyUI's weight
        wrappers take (they run on the weight each forward casts, also with offloaded weights)."""
        if not self.enabled or self.multiplier == 0:
            return w
        d = (self.multiplier * self.delta_weight()).to(device=w.device, dtype=w.dtype)
        if self.rows is None:
            return w + d
        a, n = self.rows
        return torch.cat([w[:a], w[a:a + n] + d, w[a + n:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0:
            return self.base(x)
        b = self.base
        if self.rows is not None:
            return F.linear(x, self.patch_weight(b.weight), b.bias)
        if self.rank == 0:  # fp32 adapters, cast to the model's dtype for its forward (no-op in fp32)
            w = b.weight + self.multiplier * self.delta.to(b.weight.dtype)
            if isinstance(b, nn.Linear):
                return F.linear(x, w, b.bias)
            return b._conv_forward(x, w, b.bias)
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if isinstance(b, nn.Linear):
            low = F.linear(F.linear(x, down), up)
        else:
            low = F.conv2d(F.conv2d(x, down, None, b.stride, b.padding, b.dilation), up)
        return b(x) + (self.multiplier * self.scale) * low


class AdapterSet:
    """All adapters attached to one UNet, by module name, with a teacher switch."""

    def __init__(self, layers: dict[str, AdaptedLayer], in_place: bool = True):
        self.layers = layers
        #: the layers replace the UNet's modules (``attach``); False: they act from outside the
        #: module tree (ComfyUI's weight wrappers), so ``remove`` has nothing to put back
        self.in_place = in_place

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (
            [layer.delta] if layer.rank == 0 else [layer.down, layer.up])]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def disabled(self):
        """Inside this block the UNet is the frozen original (the teacher)."""
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enabled = True

    def set_multiplier(self, m: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = m

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            if layer.rank == 0:
                out[f"{name}.delta"] = layer.delta.detach()
            else:
                out[f"{name}.down"] = layer.down.detach()
                out[f"{name}.up"] = layer.up.detach()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                if layer.rank == 0:
                    layer.delta.copy_(tensors[f"{name}.delta"])
                else:
                    layer.down.copy_(tensors[f"{name}.down"])
                    layer.up.copy_(tensors[f"{name}.up"])

    def remove(self, unet: nn.Module) -> None:
        """Put the original modules back (the UNet is unchanged afterwards)."""
        if self.in_place:
            for name, layer in self.layers.items():
                _set_submodule(unet, name, layer.base)
        self.layers = {}


def attach(unet: nn.Module, trainable: str = "attn2", rank: int = 4, alpha: float | None = None,
           generator: torch.Generator | None = None, names: Mapping[str, str] | None = None,
           rules: Mapping[str, re.Pattern] | None = None) -> AdapterSet:
    """Wrap the modules of a trainable set in adapters; the UNet's own weights stay frozen.

    ``names``: the unet's module names -> diffusers names, as in :func:`select_modules`; the
    adapters are keyed by the unet's own names either way."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0 (0 = full weight delta), got {rank}")
    unet.requires_grad_(False)
    layers = {}
    for name, m in select_modules(unet, trainable, names, rules).items():
        layer = AdaptedLayer(m, rank, alpha if alpha is not None else float(rank), generator)
        _set_submodule(unet, name, layer)
        layers[name] = layer
    return AdapterSet(layers)


def attach_from_tensors(unet: nn.Module, tensors: dict[str, torch.Tensor], alphas: dict[str, float]) -> AdapterSet:
    """Re-create adapters saved by :meth:`AdapterSet.state_tensors` (exact same forward)."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    modules = dict(unet.named_modules())
    layers = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"the erasure names module {name!r}, which this UNet does not have")
        base = modules[name]
        rank = tensors[f"{name}.down"].shape[0] if f"{name}.down" in tensors else 0
        layer = AdaptedLayer(base, rank, alphas.get(name, float(rank)))
        _set_submodule(unet, name, layer)
        layers[name] = layer
    s = AdapterSet(layers)
    s.load_state_tensors(tensors)
    return s


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
