"""DRAFT (not yet run): ComfyUI's FLUX MODEL + FLUX CLIP behind ``nodes.comfy_flux.ComfyFluxBackbone``.

The CLIP is ComfyUI's own FLUX CLIP (CLIP-L + T5-XXL classes) loaded by ``comfy.sd.load_clip`` with a
one-layer T5 at full width (``model_options["t5xxl_model_config"]``; DualCLIPLoader cannot pass it),
random weights; the transformer is bierasing.standins_flux.flux_transformer (1 + 1 blocks, full width).
Checks: conditioning shapes; the backbone's velocity equals the diffusers twin's at the same sigma;
adapters keyed by diffusers names compute what the same adapters compute on the twin."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_support import comfy_available, load_comfy, pack

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]


def _random(shapes: dict[str, tuple], gen: torch.Generator, dtype=torch.float16) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(s, generator=gen) * (0.02 if len(s) > 1 else 1.0) + (0 if len(s) > 1 else 1.0)).to(dtype)
            for k, s in shapes.items()}


def t5_one_layer_tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, ff, inner = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]
    shapes = {"shared.weight": (cfg["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                  (cfg["relative_attention_num_buckets"], cfg["num_heads"]),
              "encoder.block.0.layer.0.layer_norm.weight": (d,), "encoder.block.0.layer.1.layer_norm.weight": (d,),
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (ff, d),
              "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": (ff, d),
              "encoder.block.0.layer.1.DenseReluDense.wo.weight": (d, ff)}
    shapes.update({f"encoder.block.0.layer.0.SelfAttention.{p}.weight": (inner, d) if p != "o" else (d, inner)
                   for p in "qkvo"})
    out = _random(shapes, gen)
    out["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] = torch.zeros(1, dtype=torch.float16)  # detection key
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()
    import comfy.sd
    import comfy.utils

    from bierasing.comfy_standins import checkpoint_tensors
    from bierasing.standins_flux import flux_transformer

    root = tmp_path_factory.mktemp("comfy_flux_bb")
    (root / "diffusion_models").mkdir()
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"), is_default=True)
    twin = flux_transformer(1, 1, seed=0).eval().requires_grad_(False)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in twin.state_dict().items()},
                                str(root / "diffusion_models" / "flux.safetensors"))
    gen = torch.Generator().manual_seed(0)
    sd15, _ = checkpoint_tensors()  # full CLIP-L inside the SD1.5 stand-in checkpoint
    clip_l = {k[len("cond_stage_model.transformer."):]: v for k, v in sd15.items()
              if k.startswith("cond_stage_model.transformer.")}
    comfy.utils.save_torch_file(clip_l, str(root / "clip_l.safetensors"))
    t5_cfg = json.loads((Path(comfy.sd.__file__).parent / "text_encoders" / "t5_config_xxl.json").read_text())
    t5_cfg["num_layers"] = 1
    comfy.utils.save_torch_file(t5_one_layer_tensors(t5_cfg, gen), str(root / "t5.safetensors"))
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet("flux.safetensors", "default")[0]
        clip = comfy.sd.load_clip([str(root / "clip_l.safetensors"), str(root / "t5.safetensors")],
                                  clip_type=comfy.sd.CLIPType.FLUX, model_options={"t5xxl_model_config": t5_cfg})
    return SimpleNamespace(model=model, clip=clip, twin=twin, flux_glue=pack("nodes.comfy_flux"))


def test_conditioning_is_256_t5_tokens_and_the_pooled_vector(fx):
    bb = fx.flux_glue.ComfyFluxBackbone(fx.model, fx.clip, resolution=64)
    with torch.inference_mode(False):
        text = bb.encode_text(["a dog", ""])
    assert text.shape == (2, 257, 4096) and torch.isfinite(text).all()
    assert bb.guidance == 3.5 and bb.sample_shape == (16, 8, 8)


def test_velocity_and_adapters_equal_the_diffusers_twin(fx):
    from bierasing import flux
    from bierasing.erase.adapters import attach

    bb = fx.flux_glue.ComfyFluxBackbone(fx.model, fx.clip, resolution=64)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode(False):
        text = bb.encode_text(["a dog"])
        x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([600])
        sigma, c = bb.sigmas[t], bb.flow_scale[t].view(-1, 1, 1, 1)

        def twin_v():
            tokens, pooled = text[:, :-1], text[:, -1, :768]
            with torch.no_grad():
                out = fx.twin(hidden_states=flux.pack(x * c, 2), encoder_hidden_states=tokens, pooled_projections=pooled,
                              timestep=sigma, guidance=torch.tensor([3.5]), img_ids=flux.image_ids(4, 4),
                              txt_ids=torch.zeros(tokens.shape[1], 3)).sample
            return flux.unpack(out, 2, 16, 8, 8)

        with torch.no_grad():
            ours = bb.model_output(x, t, text)
        torch.testing.assert_close(ours, twin_v(), atol=2e-4, rtol=1e-3)

        adapters = bb.attach_adapters("attn", 4, torch.Generator().manual_seed(2))
        twin_ad = attach(fx.twin, "attn", 4, rules=flux.TRAINABLE_RULES)
        assert set(adapters.layers) == set(twin_ad.layers)
        with torch.no_grad():
            for name, layer in adapters.layers.items():
                layer.up.normal_(std=0.02, generator=g)
                twin_ad.layers[name].up.copy_(layer.up)
                twin_ad.layers[name].down.copy_(layer.down)
            adapted = bb.model_output(x, t, text)
        try:
            torch.testing.assert_close(adapted, twin_v(), atol=2e-4, rtol=1e-3)
            assert (adapted - ours).abs().mean() > 1e-4
        finally:
            twin_ad.remove(fx.twin)
            bb.release()
