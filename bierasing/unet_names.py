"""Module names of an SD1.x / SD2 / SDXL-style UNet in two conventions, without ComfyUI.

The same network is ``UNetModel`` in the original LDM code (and in ComfyUI, which loads checkpoints
with those names) and ``UNet2DConditionModel`` in diffusers::

    LDM (ComfyUI)                                  diffusers
    time_embed.0 / .2                              time_embedding.linear_1 / linear_2
    label_emb.0.0 / .0.2  (SDXL, SD2 unCLIP)       add_embedding.linear_1 / linear_2 (or class_embedding.*)
    input_blocks.0.0                               conv_in
    input_blocks.{n}.0.in_layers.2 ...             down_blocks.{level}.resnets.{i}.conv1 ...
    input_blocks.{n}.1.transformer_blocks.{t}...   down_blocks.{level}.attentions.{i}.transformer_blocks...
    input_blocks.{n}.0.op                          down_blocks.{level}.downsamplers.0.conv
    middle_block.0 / .1 / .2                       mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{n}.0 / .1 / .{1|2}.conv         up_blocks.{j}.resnets.{i} / attentions.{i} / upsamplers.0
    out.0 / out.2                                  conv_norm_out / conv_out

Input blocks are numbered through all levels (one per resnet, one per downsampler, after the
``conv_in`` block 0); output blocks through the up levels, deepest first, ``num_res + 1`` per level,
the last of each level (but the shallowest) also holding the upsampler.

:func:`ldm_to_diffusers` lists every module that owns weights (Linear, Conv2d, GroupNorm, LayerNorm,
the class Embedding) and nothing else, in the order of the LDM ``UNetModel.named_modules()``, so it
doubles as the inventory of such a UNet's layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

# diffusers' UNet2DConditionModel defaults (the SD1.x UNet), for configs that leave a key out
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "transformer_layers_per_block": 1,
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = {"UNetMidBlock2DCrossAttn": "attn", "UNetMidBlock2D": "resnet", None: None}


class _Layout(NamedTuple):
    """A UNet's structure, independent of either naming convention."""

    channels: list[int]            # output channels of each level
    base: int                      # channels of conv_in's output
    down: list[list[int]]          # per level, per resnet: transformer depth (0 = no attention)
    up: list[list[int]]            # per up block (deepest level first), per resnet: transformer depth
    mid: int | None                # middle transformer depth; -1 = one resnet only; None = no middle block
    resample: bool                 # learned down/upsampling convolutions
    label: str | None              # diffusers name of the LDM label_emb ("add_embedding", ...), if any
    label_linear: bool             # label_emb is Linear-SiLU-Linear (else a class Embedding)


def ldm_to_diffusers(config: Mapping[str, Any]) -> dict[str, str]:
    """LDM (ComfyUI) module name -> diffusers module name for every weighted module of a UNet.

    ``config`` is either an LDM/ComfyUI ``unet_config`` (``model.model.model_config.unet_config``:
    ``num_res_blocks``, ``channel_mult``, ``transformer_depth``, ``transformer_depth_output``,
    ``transformer_depth_middle``, ...) or a diffusers ``UNet2DConditionModel.config``
    (``block_out_channels``, ``layers_per_block``, ``down_block_types``, ``up_block_types``,
    ``transformer_layers_per_block``, ...). Names carry no ``.weight``/``.bias`` suffix; the map
    holds exactly the modules the UNet has (a resnet's ``skip_connection`` only where its channels
    change, no downsampler on the deepest level). LDM's ``label_emb`` is diffusers' ``add_embedding``
    (SDXL) for an LDM config with ``adm_in_channels``; a diffusers config says which it is.

    Raises ValueError for UNets the two conventions do not share (video UNets, resnet up/downsampling,
    other diffusers block types).
    """
    if hasattr(config, "config") and not isinstance(config, Mapping):  # a diffusers model itself
        config = config.config
    if "num_res_blocks" in config:
        lay = _ldm_layout(config)
    elif "block_out_channels" in config or "down_block_types" in config:
        lay = _diffusers_layout(config)
    else:
        raise ValueError("not a UNet config: expected an LDM/ComfyUI unet_config (num_res_blocks, "
                         "channel_mult, ...) or a diffusers UNet2DConditionModel config "
                         "(block_out_channels, ...)")
    return _names(lay)


def diffusers_to_ldm(config: Mapping[str, Any]) -> dict[str, str]:
    """The inverse map of :func:`ldm_to_diffusers`: diffusers module name -> LDM module name."""
    return {dif: ldm for ldm, dif in ldm_to_diffusers(config).items()}


# ---- configs -> layout ------------------------------------------------------------------------
def _ldm_layout(cfg: Mapping[str, Any]) -> _Layout:
    if cfg.get("use_temporal_resblock") or cfg.get("use_temporal_attention"):
        raise ValueError("video (temporal) UNets have no diffusers UNet2DConditionModel names")
    if cfg.get("resblock_updown"):
        raise ValueError("UNets that up/downsample with resnets have no diffusers UNet2DConditionModel names")
    if cfg.get("dims", 2) != 2:
        raise ValueError(f"only 2-D UNets are supported, this one has dims={cfg.get('dims')}")
    mult = list(cfg["channel_mult"])
    levels = len(mult)
    num_res = _per_level(cfg["num_res_blocks"], levels, "num_res_blocks")
    depth = _flat(cfg.get("transformer_depth", 1), sum(num_res), "transformer_depth")
    if "transformer_depth_output" not in cfg:
        raise ValueError("the unet_config has no transformer_depth_output (ComfyUI always sets it)")
    depth_out = _flat(cfg["transformer_depth_output"], sum(num_res) + levels, "transformer_depth_output")
    blocks = cfg.get("num_attention_blocks")  # attention only on the first blocks[level] resnets

    down = []
    for level in range(levels):
        ds = [depth.pop(0) for _ in range(num_res[level])]
        if blocks is not None:
            ds = [d if i < blocks[level] else 0 for i, d in enumerate(ds)]
        down.append(ds)
    up = []
    for level in reversed(range(levels)):  # output blocks pop transformer_depth_output from its end
        us = [depth_out.pop() for _ in range(num_res[level] + 1)]
        if blocks is not None:
            us = [d if i < blocks[level] else 0 for i, d in enumerate(us)]
        up.append(us)

    mid = cfg.get("transformer_depth_middle")
    if mid is None:
        raise ValueError("the unet_config has no transformer_depth_middle (ComfyUI always sets it)")
    mid = None if mid < -1 else int(mid)  # >= 0: transformer (even of depth 0); -1: one resnet; < -1: none

    num_classes = cfg.get("num_classes")
    if num_classes is None and cfg.get("adm_in_channels") is not None:
        num_classes = "sequential"
    if num_classes == "sequential":
        label, label_linear = "add_embedding", True
    elif isinstance(num_classes, int) and not isinstance(num_classes, bool):
        label, label_linear = "class_embedding", False
    else:  # none, or "continuous" (a bare Linear diffusers has no name for)
        label, label_linear = None, False
    model_channels = int(cfg["model_channels"])
    return _Layout([model_channels * m for m in mult], model_channels, down, up, mid,
                   bool(cfg.get("conv_resample", True)), label, label_linear)


def _diffusers_layout(cfg: Mapping[str, Any]) -> _Layout:
    def get(key):
        v = cfg.get(key)
        return _DIFFUSERS_DEFAULTS[key] if v is None else v

    channels = [int(c) for c in get("block_out_channels")]
    levels = len(channels)
    down_types, up_types = list(get("down_block_types")), list(get("up_block_types"))
    if len(down_types) != levels or len(up_types) != levels:
        raise ValueError("down_block_types and up_block_types need one entry per block_out_channels entry")
    for t in down_types + up_types:
        if t not in _DOWN_TYPES and t not in _UP_TYPES:
            raise ValueError(f"block type {t!r} has no LDM counterpart (supported: "
                             f"{', '.join([*_DOWN_TYPES, *_UP_TYPES])})")
    mid_type = cfg.get("mid_block_type", _DIFFUSERS_DEFAULTS["mid_block_type"])
    if mid_type not in _MID_TYPES:
        raise ValueError(f"mid_block_type {mid_type!r} has no LDM counterpart")
    if cfg.get("dual_cross_attention"):
        raise ValueError("dual cross-attention UNets have no LDM counterpart")

    num_res = _per_level(get("layers_per_block"), levels, "layers_per_block")
    tl = get("transformer_layers_per_block")
    tl = [tl] * levels if isinstance(tl, int) else list(tl)
    if len(tl) != levels:
        raise ValueError("transformer_layers_per_block needs one entry per block_out_channels entry")
    down = [_depths(tl[x], num_res[x]) if _DOWN_TYPES.get(down_types[x]) else [0] * num_res[x]
            for x in range(levels)]
    rev = cfg.get("reverse_transformer_layers_per_block") or list(reversed(tl))
    up = []
    for j in range(levels):
        n = num_res[levels - 1 - j] + 1
        up.append(_depths(rev[j], n) if _UP_TYPES.get(up_types[j]) else [0] * n)

    if _MID_TYPES[mid_type] == "attn":
        last = tl[-1]
        mid = int(last if isinstance(last, int) else last[0])
    else:
        mid = -1 if _MID_TYPES[mid_type] == "resnet" else None

    label, label_linear = None, False
    if cfg.get("addition_embed_type") == "text_time":
        label, label_linear = "add_embedding", True
    elif cfg.get("class_embed_type") == "projection":
        label, label_linear = "class_embedding", True
    elif cfg.get("class_embed_type") is None and cfg.get("num_class_embeds") is not None:
        label = "class_embedding"
    return _Layout(channels, channels[0], down, up, mid, True, label, label_linear)


def _per_level(v, levels: int, what: str) -> list[int]:
    out = [int(v)] * levels if isinstance(v, int) else [int(x) for x in v]
    if len(out) != levels:
        raise ValueError(f"{what} has {len(out)} entries for {levels} levels")
    return out


def _flat(v, n: int, what: str) -> list[int]:
    out = [int(v)] * n if isinstance(v, int) else [int(x) for x in v]
    if len(out) != n:
        raise ValueError(f"{what} has {len(out)} entries, this UNet has {n} such blocks")
    return out


def _depths(v, n: int) -> list[int]:
    """Transformer depth of each of a block's ``n`` layers (diffusers: an int or one per layer)."""
    if isinstance(v, int):
        return [v] * n
    v = [int(x) for x in v]
    if len(v) != n:
        raise ValueError(f"a block with {n} layers was given {len(v)} transformer depths")
    return v


# ---- layout -> names --------------------------------------------------------------------------
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_TRANSFORMER_BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "norm2", "norm1", "norm3")


def _resnet(out: dict[str, str], ldm: str, dif: str, skip: bool) -> None:
    for a, b in _RESNET:
        out[f"{ldm}.{a}"] = f"{dif}.{b}"
    if skip:
        out[f"{ldm}.skip_connection"] = f"{dif}.conv_shortcut"


def _transformer(out: dict[str, str], ldm: str, dif: str, depth: int) -> None:
    out[f"{ldm}.norm"] = f"{dif}.norm"
    out[f"{ldm}.proj_in"] = f"{dif}.proj_in"
    for t in range(depth):  # the inner names are the same in both conventions
        for part in _TRANSFORMER_BLOCK:
            out[f"{ldm}.transformer_blocks.{t}.{part}"] = f"{dif}.transformer_blocks.{t}.{part}"
    out[f"{ldm}.proj_out"] = f"{dif}.proj_out"


def _names(lay: _Layout) -> dict[str, str]:
    out = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    if lay.label is not None and lay.label_linear:
        out["label_emb.0.0"] = f"{lay.label}.linear_1"
        out["label_emb.0.2"] = f"{lay.label}.linear_2"
    elif lay.label is not None:
        out["label_emb"] = lay.label
    out["input_blocks.0.0"] = "conv_in"

    levels = len(lay.channels)
    n, ch = 1, lay.base
    skips = [ch]  # channels each input block hands to the output blocks
    for x in range(levels):
        for i, depth in enumerate(lay.down[x]):
            _resnet(out, f"input_blocks.{n}.0", f"down_blocks.{x}.resnets.{i}", ch != lay.channels[x])
            ch = lay.channels[x]
            if depth > 0:
                _transformer(out, f"input_blocks.{n}.1", f"down_blocks.{x}.attentions.{i}", depth)
            skips.append(ch)
            n += 1
        if x != levels - 1:
            if lay.resample:
                out[f"input_blocks.{n}.0.op"] = f"down_blocks.{x}.downsamplers.0.conv"
            skips.append(ch)
            n += 1

    if lay.mid is not None:
        _resnet(out, "middle_block.0", "mid_block.resnets.0", False)
        if lay.mid >= 0:
            _transformer(out, "middle_block.1", "mid_block.attentions.0", lay.mid)
            _resnet(out, "middle_block.2", "mid_block.resnets.1", False)

    n = 0
    for j, depths in enumerate(lay.up):
        width = lay.channels[levels - 1 - j]
        for i, depth in enumerate(depths):  # input: the previous block's output + a skip
            _resnet(out, f"output_blocks.{n}.0", f"up_blocks.{j}.resnets.{i}", ch + skips.pop() != width)
            ch = width
            c = 1
            if depth > 0:
                _transformer(out, f"output_blocks.{n}.1", f"up_blocks.{j}.attentions.{i}", depth)
                c = 2
            if j != levels - 1 and i == len(depths) - 1 and lay.resample:
                out[f"output_blocks.{n}.{c}.conv"] = f"up_blocks.{j}.upsamplers.0.conv"
            n += 1

    out["out.0"] = "conv_norm_out"
    out["out.2"] = "conv_out"
    return out

