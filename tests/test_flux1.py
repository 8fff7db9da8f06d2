"""FLUX.1 in the library (diffusers): the backbone's conditioning and velocity are what diffusers'
FluxPipeline computes from the same prompt and latents; Redux tokens come from the flux1-redux-dev
layout; ``bierasing erase`` erases from a FLUX folder with Redux; the LoRA is written in the layout
both loaders read and, loaded by ``FluxPipeline.load_lora_weights`` with no warning, computes what
bierasing's adapters compute. Tiny random stand-in."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli_real_models import _run

from bierasing.erase.export import kohya_tensors, load_erasure, peft_tensors, read_erasure
from bierasing.flux1 import FluxBackbone, flux_shift
from bierasing.loading import model_kind
from bierasing.standins_flux import build_flux_folder

PROMPTS = ["a photo of a cat", ""]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def bb(standin):
    return FluxBackbone.from_pretrained(standin["model"], standin["ip_adapter"], standin["image_encoder"],
                                        resolution=32)


@pytest.fixture(scope="module")
def pipe(standin):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(standin["model"])


def _diffusers_velocity(pipe, x_flow, sigma, guidance, prompt_embeds, pooled, text_ids):
    """The transformer as FluxPipeline's denoising loop calls it (its own packing and position ids)."""
    b, c, h, w = x_flow.shape
    latents = pipe._pack_latents(x_flow, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    g = None if guidance is None else torch.full((b,), guidance)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=latents, timestep=sigma, guidance=g, pooled_projections=pooled,
                             encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids).sample
    size = h * pipe.vae_scale_factor
    return pipe._unpack_latents(v, size, size, pipe.vae_scale_factor)


def test_conditioning_and_velocity_are_fluxpipelines(bb, pipe):
    text = bb.encode_text(PROMPTS)
    assert text.shape == (2, 257, 32)  # 256 T5 tokens + CLIP's pooled vector as one more token
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=256)
    torch.testing.assert_close(text[:, :256], embeds, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(text[:, 256], pooled)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *bb.sample_shape, generator=g), torch.tensor([100, 900])
    sigma, c = bb.sigmas[t], bb.flow_scale[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        ours = bb.model_output(x, t, text)
    theirs = _diffusers_velocity(pipe, x * c, sigma, 3.5, embeds, pooled, text_ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    other = _diffusers_velocity(pipe, x * c, sigma, 1.0, embeds, pooled, text_ids)
    assert (other - theirs).abs().mean() > 1e-4  # the guidance embedding is live, at 3.5 by default


def test_redux_is_the_flux1_redux_dev_layout_and_steers(bb, standin):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import load_file

    sd = load_file(str(standin["ip_adapter"]))
    ref = ReduxImageEncoder(redux_dim=sd["redux_up.weight"].shape[1], txt_in_features=sd["redux_down.weight"].shape[0])
    ref.load_state_dict(sd)  # strict: the same four keys diffusers' and ComfyUI's Redux read
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = bb.encode_images(images)
        from bierasing.imageprep import vision_pixels

        states = bb.image_encoder(pixel_values=vision_pixels(images, 28, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
        torch.testing.assert_close(tokens, ref(states).image_embeds)
        assert tokens.shape == (2, 4, 32)  # one token per SigLIP patch (729 at 384 px)
        x, t = torch.randn(2, *bb.sample_shape), torch.tensor([500, 500])
        text = bb.encode_text(["a cat"] * 2)
        plain = bb.model_output(x, t, text)
        mixed = bb.model_output(x, t, text, torch.cat([tokens[:1], torch.zeros_like(tokens[:1])]))
    assert (mixed[0] - plain[0]).abs().mean() > 1e-4
    torch.testing.assert_close(mixed[1], plain[1])  # an all-zero row runs without image tokens


def test_schnell_has_no_guidance_and_an_unshifted_schedule(tmp_path):
    p = build_flux_folder(tmp_path / "schnell", schnell=True)
    bb = FluxBackbone.from_pretrained(p["model"], resolution=32)
    assert bb.guidance is None and bb.shift == 1.0
    assert bb.erasure_scorer().steps == 4 and bb.erasure_scorer().guidance == 1.0
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxBackbone.from_pretrained(p["model"], resolution=32, guidance=3.5)


def test_time_shift_follows_the_resolution_as_diffusers_does():
    assert flux_shift(1024) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))  # 512 px
    assert flux_shift(4096) == pytest.approx(math.exp(1.15))  # 1024 px: ComfyUI's constant
    assert flux_shift(4096, {"use_dynamic_shifting": False, "shift": 1.0}) == 1.0


def test_model_kind_knows_flux_and_refuses_other_transformers(standin, tmp_path):
    assert model_kind(standin["model"]) == "flux"
    other = tmp_path / "sd3" / "transformer"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="SD3Transformer2DModel; of the transformer models this version erases FLUX"):
        model_kind(other.parent)


def test_t5_word_positions_start_at_zero(bb):
    prompt = "a photo of a cat"
    ids = bb.tokenizer(prompt, add_special_tokens=False).input_ids
    pos = bb.word_positions(prompt, "cat")
    assert ids[pos[0]:pos[-1] + 1] == bb.tokenizer("cat", add_special_tokens=False).input_ids


def test_peft_layout_folds_alpha_and_reads_back():
    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_transformer_blocks_0_attn_add_k_proj"
    kohya = {f"{stem}.lora_down.weight": torch.randn(4, 8, generator=g),
             f"{stem}.lora_up.weight": torch.randn(8, 4, generator=g), f"{stem}.alpha": torch.tensor(2.0),
             "lora_unet_transformer_blocks_0_attn_to_add_out.diff": torch.randn(8, 8, generator=g)}
    peft = peft_tensors(kohya, ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out"])
    assert sorted(peft) == ["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight",
                            "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight",
                            "transformer.transformer_blocks.0.attn.to_add_out.diff"]
    back = kohya_tensors(peft)
    delta = lambda d: d[f"{stem}.lora_up.weight"] @ d[f"{stem}.lora_down.weight"] * float(d[f"{stem}.alpha"]) / 4  # noqa: E731
    torch.testing.assert_close(delta(back), delta(kohya))
    with pytest.raises(ValueError, match="names no module"):
        peft_tensors(kohya, ["transformer_blocks.1.attn.add_k_proj"])


@pytest.fixture(scope="module")
def bi_lora(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_cli") / "erase"
    args = ["erase", "--model", str(standin["model"]), "--concept", "a dog", "--safe", "a cat", "--steps", "2",
            "--out", str(out), "--exemplars", "2", "--eval-samples", "1", "--resolution", "32",
            "--cache-size", "2", "--batch-size", "2", "--xt-steps", "4", "--adversarial-steps", "1",
            "--threads", "2", "--json", "--device", "cpu", "--rank", "2",
            "--ip-adapter", str(standin["ip_adapter"]), "--image-encoder", str(standin["image_encoder"])]
    r = _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["method"] == "bi-erasing"
    return out / "erasure.safetensors"


def test_flux_lora_loads_in_diffusers_and_computes_what_bierasing_computes(standin, bi_lora, pipe):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from test_diffusers_lora import captured_warnings

    with safe_open(str(bi_lora), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert any(".attn.add_k_proj." in k for k in keys) and any("text_embedder" in k for k in keys)

    fresh = FluxPipeline.from_pretrained(standin["model"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 16, 16, generator=g)
    embeds, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    args = (x, torch.tensor([0.3, 0.8]), 3.5, embeds, pooled, torch.zeros(8, 3))
    before = _diffusers_velocity(fresh, *args)
    with captured_warnings() as messages:
        fresh.load_lora_weights(str(bi_lora))
    assert [m for m in messages if "No LoRA keys associated to CLIPText" not in m] == []
    theirs = _diffusers_velocity(fresh, *args)
    assert not torch.equal(theirs, before)

    ours = FluxPipeline.from_pretrained(standin["model"])
    tensors, info = read_erasure(bi_lora)
    assert info["method"] == "bi-erasing"
    load_erasure(ours.transformer, (tensors, info))
    torch.testing.assert_close(_diffusers_velocity(ours, *args), theirs, atol=1e-5, rtol=1e-4)


def test_stacked_flux_erasures_keep_the_peft_layout(bi_lora, tmp_path):
    from bierasing.erase.stack import stack_erasures

    out = stack_erasures(tmp_path / "both.safetensors", [bi_lora, bi_lora])
    one, both = read_erasure(bi_lora)[0], read_erasure(out)[0]
    assert set(both) == set(one)  # the same layers, ranks concatenated, read back from transformer.* keys
    stem = next(k for k in one if k.endswith(".lora_down.weight")).partition(".")[0]

    def delta(t):
        up, down = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"]
        return up @ down * float(t[f"{stem}.alpha"]) / down.shape[0]

    torch.testing.assert_close(delta(both), 2 * delta(one))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


def test_a_row_adapter_on_fused_qkv_is_the_adapter_on_the_split_projection():
    """ComfyUI keeps FLUX's q, k, v in one Linear: an adapter on rows [8, 16) of the fused weight must be
    the same adapter on diffusers' separate k projection (the erasure files name the split layers)."""
    from torch import nn

    from bierasing.erase.adapters import AdaptedLayer

    g = torch.Generator().manual_seed(0)
    fused = nn.Linear(8, 24)
    split = nn.Linear(8, 8)
    with torch.no_grad():
        split.weight.copy_(fused.weight[8:16])
        split.bias.copy_(fused.bias[8:16])
    for rank in (2, 0):
        on_split, on_rows = AdaptedLayer(split, rank, 1.0, g), AdaptedLayer(fused, rank, 1.0, rows=(8, 8))
        with torch.no_grad():
            for name in ("up", "down") if rank else ("delta",):
                getattr(on_split, name).normal_(generator=g)
                getattr(on_rows, name).copy_(getattr(on_split, name))
        x = torch.randn(3, 8, generator=g)
        out = on_rows(x)
        torch.testing.assert_close(out[:, 8:16], on_split(x))
        torch.testing.assert_close(out[:, :8], fused(x)[:, :8])
        torch.testing.assert_close(out[:, 16:], fused(x)[:, 16:])
        torch.testing.assert_close(on_rows.patch_weight(fused.weight.detach())[8:16],
                                   on_split.patch_weight(split.weight.detach()))
    with pytest.raises(ValueError, match="do not lie inside"):
        AdaptedLayer(fused, 2, 2.0, rows=(16, 16))


def test_dtype_auto_is_fp32_but_bf16_for_flux_on_a_gpu(standin):
    from bierasing.loading import model_dtype

    assert model_dtype("auto", "cpu", "flux") == torch.float32
    assert model_dtype("auto", "cuda", "sd1") == torch.float32
    if torch.cuda.is_available():
        assert model_dtype("auto", "cuda", "flux") in (torch.bfloat16, torch.float16)
    assert model_dtype("bf16", "cpu", "sd1") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto"):
        model_dtype("fp8", "cpu", "flux")


def test_a_bf16_flux_model_trains_fp32_adapters(standin):
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.loading import load_backbone

    bb = load_backbone(standin["model"], resolution=32, device="cpu", dtype="bf16")
    assert next(bb.unet.parameters()).dtype == torch.bfloat16
    cfg = EraseConfig(method="esd-x", steps=2, batch_size=2, cache_size=2, xt_steps=3, adversarial=0.0, rank=2)
    result = Eraser(bb, [Concept("a dog", "a cat")], cfg).run()
    assert all(p.dtype == torch.float32 for p in result.adapters.parameters())
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_text_is_encoded_once_per_prompt_whatever_its_batch(bb):
    alone = bb.encode_text(["a red fox"])
    together = bb.encode_text(["a cat", "a red fox", "a cat"])
    torch.testing.assert_close(together[1], alone[0])
    torch.testing.assert_close(together[0], together[2])
    assert "a red fox" in bb._text_memo and not bb.offload_text_encoders  # on the CPU nothing moves
