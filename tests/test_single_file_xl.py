"""Single-file SDXL (SGM layout: UNet, VAE, CLIP-L, OpenCLIP bigG): converted offline with diffusers'
converters into the same model the diffusers folder gives, and erasable from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_real_models import _run

from bierasing.loading import model_kind
from bierasing.sdxl import SDXLBackbone
from bierasing.single_file_xl import (SDXL_CONFIG, TEXT_G_PREFIX, build_sdxl_single_file, load_sdxl_single_file,
                                      sdxl_problem)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_sdxl_single_file(tmp_path_factory.mktemp("xl_file") / "tiny_sdxl.safetensors")


def test_the_single_file_is_the_diffusers_model(tiny):
    assert model_kind(tiny["checkpoint"]) == "sdxl_file"
    from safetensors import safe_open

    with safe_open(str(tiny["checkpoint"]), "pt") as f:
        keys = set(f.keys())
    assert f"{TEXT_G_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in keys  # OpenCLIP's fused q/k/v
    assert f"{TEXT_G_PREFIX}text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    a = load_sdxl_single_file(tiny["checkpoint"], tiny["ip_adapter"], tiny["image_encoder"], resolution=64,
                              config=tiny["config"])
    b = SDXLBackbone.from_pretrained(tiny["diffusers"], tiny["ip_adapter"], tiny["image_encoder"], resolution=64)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 600])
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ta, tb = a.encode_text(["a photo of a cat", ""]), b.encode_text(["a photo of a cat", ""])
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
        ia, ib = a.encode_images(imgs), b.encode_images(imgs)
        torch.testing.assert_close(a.predict_noise(x, t, ta, ia), b.predict_noise(x, t, tb, ib), rtol=0, atol=0)
        torch.testing.assert_close(a.to_x(imgs), b.to_x(imgs), rtol=0, atol=0)


def test_shipped_configs_are_sdxl_base():
    unet = json.loads((SDXL_CONFIG / "unet" / "config.json").read_text())
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"]) == (2048, 2816)
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["block_out_channels"] == [320, 640, 1280]
    g = json.loads((SDXL_CONFIG / "text_encoder_2" / "config.json").read_text())
    assert (g["hidden_size"], g["num_hidden_layers"], g["projection_dim"]) == (1280, 32, 1280)
    assert json.loads((SDXL_CONFIG / "vae" / "config.json").read_text())["scaling_factor"] == 0.13025


def test_a_refiner_or_non_sdxl_file_is_named(tmp_path):
    from safetensors.torch import save_file

    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(refiner))
    assert "SDXL refiner" in sdxl_problem(refiner)
    with pytest.raises(ValueError, match="SDXL refiner"):
        model_kind(refiner)


def test_cli_erases_from_a_single_file_sdxl_checkpoint(tiny, tmp_path):
    args = ["erase", "--model", str(tiny["checkpoint"]), "--model-config", str(tiny["config"]), "--concept",
            "a dog", "--safe", "a cat", "--method", "esd-x", "--steps", "2", "--out", str(tmp_path / "e"),
            "--eval-samples", "1", "--resolution", "64", "--cache-size", "2", "--batch-size", "2",
            "--xt-steps", "4", "--threads", "2", "--json", "--device", "cpu"]
    r = _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "e" / "erasure.safetensors").is_file()


def test_full_size_sdxl_round_trips_through_the_shipped_configs():
    """SDXL base's real shapes (meta tensors, no memory): diffusers components built from the shipped
    configs -> SGM names -> diffusers' converters give back every tensor with its shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bierasing.single_file import _unet_to_ldm, _vae_to_ldm
    from bierasing.single_file_xl import TEXT_L_PREFIX, _open_clip_to_ldm

    cfg = {s: json.loads((SDXL_CONFIG / s / "config.json").read_text()) for s in ("unet", "vae")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        l_model = CLIPTextModel(CLIPTextConfig.from_json_file(str(SDXL_CONFIG / "text_encoder" / "config.json")))
        g_model = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(str(SDXL_CONFIG / "text_encoder_2" /
                                                                                "config.json")))
    ckpt = _unet_to_ldm(unet.state_dict(), unet.config)
    ckpt.update(_vae_to_ldm(vae.state_dict(), 4))
    ckpt.update({TEXT_L_PREFIX + k: v for k, v in l_model.state_dict().items()})
    ckpt.update(_open_clip_to_ldm(g_model.state_dict()))
    assert sum(v.numel() for k, v in ckpt.items() if k.startswith("model.diffusion_model.")) == 2_567_463_684

    def same(converted, model):
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted.items() if not k.endswith("position_ids")}
        assert got == own

    same(sfu.convert_ldm_unet_checkpoint(ckpt, cfg["unet"]), unet)
    same(sfu.convert_ldm_vae_checkpoint(ckpt, cfg["vae"]), vae)
    same(sfu.convert_open_clip_checkpoint(g_model, ckpt, prefix=TEXT_G_PREFIX), g_model)
