"""FLUX inside a real ComfyUI (run with ComfyUI's Python, COMFYUI_PATH set): a diffusers-layout FLUX
transformer file loads through the stock UNETLoader as FLUX; ComfyUI's model and diffusers'
``FluxTransformer2DModel`` give the same velocity (text tokens; text + appended image tokens, as Redux
appends them); an erasure file bierasing writes for FLUX (``transformer.*`` keys) loads through ComfyUI's
LoRA loader with zero "lora key not loaded" - onto the fused q/k/v and linear1 slices - and the patched
model computes what bierasing's adapters compute on the diffusers model.
Stand-in: :func:`bierasing.standins_flux.flux_transformer` (FLUX.1's width, one block of each kind)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
import torch
from comfy_support import comfy_available, load_comfy

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()
    import comfy.model_base
    import comfy.utils
    import folder_paths

    from bierasing.standins_flux import flux_transformer

    root = tmp_path_factory.mktemp("comfy_flux")
    (root / "diffusion_models").mkdir()
    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"), is_default=True)
    t0 = time.time()
    twin = flux_transformer(1, 1, seed=0).eval().requires_grad_(False)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in twin.state_dict().items()},
                                str(root / "diffusion_models" / "flux_standin.safetensors"))
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet("flux_standin.safetensors", "default")[0]
    assert isinstance(model.model, comfy.model_base.Flux), type(model.model)
    print(f"\nFLUX stand-in ({sum(p.numel() for p in twin.parameters()) / 1e6:.0f} M parameters) built and loaded "
          f"in {time.time() - t0:.1f} s as {type(model.model.model_config).__name__}")
    return SimpleNamespace(nodes=nodes, model=model, twin=twin, root=root)


def _inputs(seed: int, image_tokens: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    tokens = torch.randn(1, 8 + image_tokens, 4096, generator=g)
    return x, torch.tensor([0.6]), tokens, torch.randn(1, 768, generator=g), torch.tensor([3.5])


def comfy_velocity(model, x, sigma, tokens, pooled, guidance):
    """ComfyUI's FLUX as its samplers call it: apply_model returns x0, the velocity is (x - x0) / sigma."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    with torch.no_grad():
        den = model.model.apply_model(x, sigma, c_crossattn=tokens, y=pooled, guidance=guidance,
                                      transformer_options=model.model_options.get("transformer_options", {}))
    return (x - den.float()) / sigma.view(-1, 1, 1, 1)


def diffusers_velocity(twin, x, sigma, tokens, pooled, guidance):
    from bierasing import flux

    b, c, h, w = x.shape
    with torch.no_grad():
        out = twin(hidden_states=flux.pack(x, 2), encoder_hidden_states=tokens, pooled_projections=pooled,
                   timestep=sigma, guidance=guidance, img_ids=flux.image_ids(h // 2, w // 2),
                   txt_ids=torch.zeros(tokens.shape[1], 3)).sample
    return flux.unpack(out, 2, c, h, w)


@pytest.mark.parametrize("image_tokens", [0, 16])
def test_comfyui_and_diffusers_flux_give_the_same_velocity(fx, image_tokens):
    args = _inputs(image_tokens, image_tokens)
    ours, theirs = diffusers_velocity(fx.twin, *args), comfy_velocity(fx.model, *args)
    err = (ours - theirs).abs().max().item()
    print(f"\nvelocity, {image_tokens} image tokens: max |diffusers - ComfyUI| = {err:.2e} "
          f"(values up to {ours.abs().max().item():.2f})")
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("trainable,rank", [("attn", 4), ("attn2", 4), ("attn2_kv", 0)])
def test_bierasing_flux_lora_loads_in_comfyui_onto_fused_weights(fx, trainable, rank, caplog):
    import comfy.sd
    import comfy.utils

    from bierasing.erase.adapters import attach
    from bierasing.erase.export import save_erasure
    from bierasing.flux import TRAINABLE_RULES

    g = torch.Generator().manual_seed(1)
    adapters = attach(fx.twin, trainable, rank, generator=g, rules=TRAINABLE_RULES)
    try:
        with torch.no_grad():
            for p in adapters.parameters():
                p.normal_(std=0.02, generator=g)
        path = save_erasure(fx.root / f"{trainable}_{rank}.safetensors", adapters, {"method": "test"}, layout="peft")
        args = _inputs(7, 16)
        ours = diffusers_velocity(fx.twin, *args)
        with adapters.disabled():
            before = diffusers_velocity(fx.twin, *args)
    finally:
        adapters.remove(fx.twin)
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert all(k.startswith("transformer.") for k in tensors)
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(fx.model, None, tensors, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    theirs = comfy_velocity(patched, *args)
    print(f"\n{trainable} rank {rank}: {len(tensors)} tensors; erasure effect {(ours - before).abs().mean():.2e}, "
          f"max |diffusers - ComfyUI| {(ours - theirs).abs().max():.2e}")
    assert (ours - before).abs().mean() > 1e-4  # the erasure changes the output far beyond the two paths' difference
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(comfy_velocity(fx.model, *args), before, atol=2e-4, rtol=1e-3)  # input unchanged
