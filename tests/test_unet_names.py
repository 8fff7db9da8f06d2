"""The LDM <-> diffusers UNet name map, and trainable sets that mean the same layers in both.

ComfyUI's MODEL is an LDM ``UNetModel``; the trainable-set rules are written in diffusers names, so
they are applied through :func:`bierasing.unet_names.ldm_to_diffusers`. Without ComfyUI the LDM
UNet is stood in for by the diffusers UNet's own modules re-hung under their LDM names.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from comfy_support import comfy_available, load_comfy, pack
from torch import nn

from bierasing.comfy_standins import TINY_UNET
from bierasing.erase.adapters import TRAINABLE_SETS, attach, select_modules
from bierasing.unet_names import diffusers_to_ldm, ldm_to_diffusers

# the "tiny" UNet of bierasing.standins and a 3-level one with cross-attention on several levels
TINY = {"sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 8}
THREE = {"sample_size": 16, "block_out_channels": (16, 32, 32), "layers_per_block": (1, 2, 1),
         "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
         "transformer_layers_per_block": (1, 2, 1), "cross_attention_dim": 32, "attention_head_dim": 8,
         "norm_num_groups": 8}
SD15_DIFFUSERS = {"cross_attention_dim": 768}  # diffusers' defaults are the SD1.x UNet
SDXL_DIFFUSERS = {"block_out_channels": (320, 640, 1280),
                  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
                  "use_linear_projection": True, "addition_embed_type": "text_time",
                  "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
                  "cross_attention_dim": 2048}
# the stand-in UNet of tests/comfy_support.py (TINY_UNET) as a diffusers UNet
STANDIN_TWIN = {"sample_size": 8, "block_out_channels": (320,), "layers_per_block": 1,
                "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
                "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
# the same two UNets as LDM/ComfyUI unet_configs (what ComfyUI's model detection gives)
_LDM_COMMON = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
               "use_spatial_transformer": True, "legacy": False, "model_channels": 320,
               "use_temporal_attention": False, "use_temporal_resblock": False}
SD15_LDM = {**_LDM_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8}
SDXL_LDM = {**_LDM_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
            "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_middle": 10,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64}


def diffusers_unet(cfg: dict, meta: bool = False) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if meta:  # full-size architectures without allocating their weights
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


def weighted(unet: nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if "weight" in m._parameters]


def ldm_tree(unet: nn.Module, names: dict[str, str]) -> nn.Module:
    """An nn.Module tree whose named_modules are the LDM names, holding the diffusers UNet's own
    (same-object) Linear/Conv2d/norm modules: what ComfyUI's UNetModel looks like to selection."""
    modules = dict(unet.named_modules())
    root = nn.Module()
    for ldm, dif in names.items():
        parent = root
        *path, leaf = ldm.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, modules[dif])
    return root


@pytest.fixture(scope="module", params=["tiny", "three"])
def twins(request):
    """(diffusers UNet, the same modules under LDM names, LDM -> diffusers map)."""
    unet = diffusers_unet(TINY if request.param == "tiny" else THREE)
    names = ldm_to_diffusers(unet.config)
    return SimpleNamespace(unet=unet, ldm=ldm_tree(unet, names), names=names)


# ---- the map ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, meta", [(TINY, False), (THREE, False),
                                       (SD15_DIFFUSERS, True), (SDXL_DIFFUSERS, True)],
                         ids=["tiny", "three", "sd15", "sdxl"])
def test_map_names_every_weighted_module_of_a_diffusers_unet_once(cfg, meta):
    unet = diffusers_unet(cfg, meta)
    names = ldm_to_diffusers(unet.config)
    assert sorted(names.values()) == sorted(weighted(unet))  # every Linear/Conv2d/norm, nothing else, once
    assert ldm_to_diffusers(unet) == names  # the model itself is accepted for its config
    assert diffusers_to_ldm(unet.config) == {d: ldm for ldm, d in names.items()}


def test_map_spells_ldm_names_as_the_ldm_unet_does():
    names = ldm_to_diffusers(SD15_LDM)
    tb = "transformer_blocks.0"
    expected = {
        "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
        "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks.1.0.out_layers.3": "down_blocks.0.resnets.0.conv2",
        "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks.1.1.norm": "down_blocks.0.attentions.0.norm",
        f"input_blocks.1.1.{tb}.attn2.to_k": f"down_blocks.0.attentions.0.{tb}.attn2.to_k",
        f"input_blocks.2.1.{tb}.ff.net.0.proj": f"down_blocks.0.attentions.1.{tb}.ff.net.0.proj",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.11.0.in_layers.0": "down_blocks.3.resnets.1.norm1",
        "middle_block.0.out_layers.0": "mid_block.resnets.0.norm2",
        f"middle_block.1.{tb}.attn1.to_out.0": f"mid_block.attentions.0.{tb}.attn1.to_out.0",
        "middle_block.2.in_layers.2": "mid_block.resnets.1.conv1",
        "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",  # no attention at the deepest level
        "output_blocks.3.1.proj_out": "up_blocks.1.attentions.0.proj_out",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",  # after the attention
        f"output_blocks.11.1.{tb}.norm3": f"up_blocks.3.attentions.2.{tb}.norm3",
        "out.0": "conv_norm_out", "out.2": "conv_out",
    }
    assert {k: names.get(k) for k in expected} == expected
    for absent in ("input_blocks.1.0.skip_connection", "input_blocks.12.0.op",
                   "middle_block.0.skip_connection", "output_blocks.11.2.conv", "input_blocks.10.1.proj_in",
                   "label_emb.0.0"):
        assert absent not in names
    xl = ldm_to_diffusers(SDXL_LDM)
    assert xl["label_emb.0.0"] == "add_embedding.linear_1" and xl["label_emb.0.2"] == "add_embedding.linear_2"
    assert "input_blocks.1.1.proj_in" not in xl  # no attention on SDXL's first level
    assert xl["input_blocks.4.1.transformer_blocks.1.attn2.to_v"] == \
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"


@pytest.mark.parametrize("ldm, dif", [(SD15_LDM, SD15_DIFFUSERS), (SDXL_LDM, SDXL_DIFFUSERS)],
                         ids=["sd15", "sdxl"])
def test_ldm_and_diffusers_configs_of_one_unet_give_one_map(ldm, dif):
    from_dif = ldm_to_diffusers(diffusers_unet(dif, meta=True).config)
    assert list(ldm_to_diffusers(ldm).items()) == list(from_dif.items())


@pytest.mark.parametrize("bad", [
    {**SD15_LDM, "use_temporal_resblock": True},
    {**SD15_LDM, "resblock_updown": True},
    {**SD15_LDM, "transformer_depth": [1, 1]},
    {"block_out_channels": (32,), "down_block_types": ("AttnDownBlock2D",),
     "up_block_types": ("AttnUpBlock2D",)},
    {"hidden_size": 64},
], ids=["video", "resblock-updown", "depth-count", "self-attn-blocks", "not-a-unet"])
def test_unets_without_a_counterpart_are_refused(bad):
    with pytest.raises(ValueError):
        ldm_to_diffusers(bad)


# ---- selection through the map ----------------------------------------------------------------
@pytest.mark.parametrize("trainable", list(TRAINABLE_SETS))
def test_every_trainable_set_picks_the_same_layers_under_ldm_names(twins, trainable):
    on_dif = select_modules(twins.unet, trainable)
    on_ldm = select_modules(twins.ldm, trainable, names=twins.names)
    assert {twins.names[k]: id(m) for k, m in on_ldm.items()} == {k: id(m) for k, m in on_dif.items()}
    assert set(on_ldm) <= set(twins.names)  # keyed by the tree's own (LDM) names


def test_esd_u_leaves_the_time_embedding_and_output_conv_alone_under_ldm_names(twins):
    picked = select_modules(twins.ldm, "no_attn2", names=twins.names)
    assert not any(n.startswith("time_embed") or n == "out.2" or "attn2" in n for n in picked)
    assert "input_blocks.0.0" in picked and "out.0" not in picked  # conv_in is trained; norms never are
    # what the map fixes: the rules on LDM names alone take the time embedding and conv_out too
    unmapped = select_modules(twins.ldm, "no_attn2")
    assert {"time_embed.0", "time_embed.2", "out.2"} <= set(unmapped)


def test_without_a_map_selection_is_unchanged(twins):
    identity = {n: n for n, _ in twins.unet.named_modules()}
    order = [n for n, _ in twins.unet.named_modules()]
    for trainable in TRAINABLE_SETS:
        plain = select_modules(twins.unet, trainable)
        assert list(plain) == [n for n in order if n in plain]  # named_modules order
        for names in ({}, identity):
            again = select_modules(twins.unet, trainable, names=names)
            assert list(again.items()) == list(plain.items())


def test_modules_the_map_does_not_name_are_judged_by_their_own_names(twins):
    tree = ldm_tree(twins.unet, twins.names)
    tree.extra = nn.Module()
    tree.extra.attn2 = nn.Module()
    tree.extra.attn2.to_k = nn.Linear(4, 4)
    tree.extra.proj = nn.Linear(4, 4)
    kv = select_modules(tree, "attn2_kv", names=twins.names)
    assert kv["extra.attn2.to_k"] is tree.extra.attn2.to_k
    u = select_modules(tree, "no_attn2", names=twins.names)
    assert "extra.proj" in u and "extra.attn2.to_k" not in u


def test_attach_through_the_map_wraps_the_ldm_modules(twins):
    tree = ldm_tree(twins.unet, twins.names)
    want = select_modules(tree, "attn2", names=twins.names)
    adapters = attach(tree, "attn2", rank=2, generator=torch.Generator().manual_seed(0), names=twins.names)
    try:
        assert list(adapters.layers) == list(want)
        for name, layer in adapters.layers.items():
            assert tree.get_submodule(name) is layer and layer.base is want[name]
        assert set(adapters.state_tensors()) == {f"{n}.{p}" for n in want for p in ("down", "up")}
    finally:
        adapters.remove(tree)


# ---- against real ComfyUI (skipped without it) -------------------------------------------------
WHY = comfy_available()
needs_comfy = pytest.mark.skipif(WHY is not None, reason=WHY or "")


@pytest.fixture(scope="module")
def comfy():
    load_comfy()
    import comfy.ops
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return SimpleNamespace(utils=comfy.utils, ops=comfy.ops, supported_models=comfy.supported_models,
                           UNetModel=UNetModel, glue=pack("nodes.comfy_glue"))


def _same_pair(ldm: str, mine: str, theirs: str) -> bool:
    if ldm.startswith("label_emb."):  # ComfyUI names it both class_embedding.* and add_embedding.*
        return mine.split(".", 1)[1] == theirs.split(".", 1)[1]
    return mine == theirs


@pytest.mark.comfyui
@needs_comfy
@pytest.mark.parametrize("cfg", [SD15_LDM, SDXL_LDM, {**TINY_UNET, "num_heads": 8}],
                         ids=["sd15", "sdxl", "standin"])
def test_map_agrees_with_comfyui_unet_to_diffusers(comfy, cfg):
    """Same pairs as ComfyUI's own map on every module the UNetModel has (ComfyUI's also lists
    modules that do not exist: every resnet's skip_connection, a downsampler on the deepest level)."""
    unet = comfy.UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    theirs = {ldm[:-len(".weight")]: dif[:-len(".weight")]
              for dif, ldm in comfy.utils.unet_to_diffusers(cfg).items() if ldm.endswith(".weight")}
    mine = ldm_to_diffusers(cfg)
    assert list(mine) == weighted(unet)  # exactly the UNetModel's weighted modules, in its order
    assert [k for k, v in mine.items() if not _same_pair(k, v, theirs[k])] == []


@pytest.mark.comfyui
@needs_comfy
def test_selection_on_a_comfyui_unet_matches_the_diffusers_standin(comfy):
    """The SD1.5 stand-in's UNetModel (ComfyUI's class and config, as tests/comfy_support.py builds
    it) with the backbone's name map selects what each trainable set selects on its diffusers twin."""
    model = comfy.supported_models.SD15(dict(TINY_UNET)).get_model({})
    names = comfy.glue.ComfyBackbone.module_name_map(SimpleNamespace(patcher=SimpleNamespace(model=model)))
    mine = ldm_to_diffusers(model.model_config.unet_config)
    assert [k for k, v in mine.items() if not _same_pair(k, v, names[k])] == []
    twin = diffusers_unet(STANDIN_TWIN)
    for trainable in TRAINABLE_SETS:
        for m in (names, mine):
            on_ldm = select_modules(model.diffusion_model, trainable, names=m)
            on_dif = select_modules(twin, trainable)
            assert {m[k]: tuple(v.weight.shape) for k, v in on_ldm.items()} == \
                {k: tuple(v.weight.shape) for k, v in on_dif.items()}, trainable
    u = select_modules(model.diffusion_model, "no_attn2", names=names)
    assert not any(n.startswith("time_embed") or n == "out.2" for n in u)
