"""SD1.x single-file (.safetensors, LDM layout) loading: offline conversion, refusals, shipped config
and tokenizer."""

import json
import socket

import pytest
import torch

from bierasing import single_file as sf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sf.build_sd1_single_file(tmp_path_factory.mktemp("sf") / "tiny.safetensors", seed=0)


@pytest.fixture
def offline(monkeypatch):
    """No network: hub access off and any socket connection an error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("network access during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, what: str):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}: {k}"


def test_single_file_has_ldm_layout(tiny):
    from safetensors import safe_open

    with safe_open(str(tiny["checkpoint"]), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    sf.check_sd1_single_file(tiny["checkpoint"])
    assert sf.is_sd1_single_file(tiny["checkpoint"])


def test_loads_equal_to_diffusers_original(tiny, offline):
    from bierasing.sd15 import SD15Backbone

    bb = sf.load_sd1_single_file(tiny["checkpoint"], config=tiny["config"])
    ref = SD15Backbone.from_pretrained(tiny["diffusers"])
    assert isinstance(bb, SD15Backbone)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(getattr(bb, name), getattr(ref, name), name)
    assert torch.equal(bb.alphas_cumprod, ref.alphas_cumprod)
    assert bb.sample_shape == ref.sample_shape and bb.prediction_type == "epsilon"
    assert torch.equal(bb.encode_text(["a cat"]), ref.encode_text(["a cat"]))


def test_image_branch_and_dtype(tiny, offline):
    from bierasing.sd15 import SD15Backbone

    kw = {"ip_adapter": tiny["ip_adapter"], "image_encoder": tiny["image_encoder"]}
    bb = sf.load_sd1_single_file(tiny["checkpoint"], config=tiny["config"], **kw)
    ref = SD15Backbone.from_pretrained(tiny["diffusers"], **kw)
    _assert_same(bb.unet, ref.unet, "unet with IP-Adapter")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(bb.encode_images(x), ref.encode_images(x))
    half = sf.load_sd1_single_file(tiny["checkpoint"], config=tiny["config"], dtype=torch.float16)
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="both ip_adapter and image_encoder"):
        sf.load_sd1_single_file(tiny["checkpoint"], config=tiny["config"], ip_adapter=tiny["ip_adapter"])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_refused(tmp_path, suffix):
    p = tmp_path / f"model{suffix}"
    p.write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match="pickled checkpoints"):
        sf.load_sd1_single_file(p)
    assert not sf.is_sd1_single_file(p)


def _fake(path, tensors):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return path


def test_non_sd1_refused(tmp_path, tiny):
    u = "model.diffusion_model."
    base = {u + "input_blocks.0.0.weight": (4, 4, 3, 3), "first_stage_model.encoder.conv_in.weight": (2, 3, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}
    cases = {
        "SDXL": {**base, u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
                 "conditioner.embedders.1.model.ln_final.weight": (8,)},
        "2048-d": {**base, u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)},
        "SD2.x": {**base, u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
        "inpainting": {**base, u + "input_blocks.0.0.weight": (4, 9, 3, 3),
                       u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
        "no model.diffusion_model": {"first_stage_model.encoder.conv_in.weight": (2, 3, 3, 3)},
    }
    for what, tensors in cases.items():
        p = _fake(tmp_path / f"{what.replace(' ', '_')}.safetensors", tensors)
        with pytest.raises(ValueError, match=what.replace(".", r"\.")):
            sf.check_sd1_single_file(p)
        with pytest.raises(ValueError, match="reads SD1.x and SDXL base checkpoints"):
            sf.load_sd1_single_file(p, config=tiny["config"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sf.check_sd1_single_file(bad)
    with pytest.raises(FileNotFoundError):
        sf.check_sd1_single_file(tmp_path / "missing.safetensors")


def test_weights_not_matching_config_refused(tmp_path, tiny):
    """An SD1-looking file whose weights do not fit the config: a clear error, not a crash."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny["checkpoint"]))
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="UNet weights do not match"):
        sf.load_sd1_single_file(tmp_path / "cut.safetensors", config=tiny["config"])
    with pytest.raises(ValueError, match="UNet weights do not match"):  # the SD1.5 config: other shapes
        sf.load_sd1_single_file(tiny["checkpoint"])


def test_shipped_tokenizer_is_clips():
    tok = sf.clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[-1] == 49407
    vocab, merges = sf.clip_vocab()
    assert len(merges) == 48894 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256


def test_shipped_sd15_config():
    """The shipped configs parse into diffusers/transformers configs with SD1.5's architecture, and
    a full-size LDM key set converts onto exactly the UNet / VAE / text encoder they describe
    (built on the meta device: no 860M-parameter allocation)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = sf.SD15_CONFIG
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    ucfg = UNet2DConditionModel.load_config(root / "unet")
    vcfg = AutoencoderKL.load_config(root / "vae")
    tcfg = CLIPTextConfig.from_pretrained(root / "text_encoder")
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"))
    assert ucfg["cross_attention_dim"] == 768 and list(ucfg["block_out_channels"]) == [320, 640, 1280, 1280]
    assert vcfg["scaling_factor"] == 0.18215 and vcfg["latent_channels"] == 4
    assert (tcfg.hidden_size, tcfg.num_hidden_layers, tcfg.num_attention_heads, tcfg.intermediate_size,
            tcfg.hidden_act, tcfg.max_position_embeddings, tcfg.vocab_size) == (768, 12, 12, 3072, "quick_gelu",
                                                                               77, 49408)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    assert sched.config.num_train_timesteps == 1000 and abs(sched.betas[-1].item() - 0.012) < 1e-6

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
        text = CLIPTextModel(tcfg)
    assert 859_000_000 < sum(p.numel() for p in unet.parameters()) < 860_000_000
    ldm = sf.diffusers_to_ldm_checkpoint(unet, vae, text)
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert tuple(ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320, 1, 1)
    shapes = {k: list(v.shape) for k, v in ldm.items()}
    assert sf._sd1_problem(shapes) is None
    back = sf.convert_sd1_checkpoint(ldm, ucfg, vcfg)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k.removeprefix("text_model.") if not any(o.startswith("text_model.") for o in own) else k:
               tuple(v.shape) for k, v in back[name].items()}
        assert got == own, name
