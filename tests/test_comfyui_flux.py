"""FLUX inside a real ComfyUI (run with ComfyUI's Python, COMFYUI_PATH set).

Stand-ins, random weights built here: the FLUX transformer of
:func:`bierasing.standins_flux.flux_transformer` (FLUX.1's width, one block of each kind, diffusers
layout) through the stock UNETLoader; ComfyUI's own FLUX CLIP (CLIP-L + T5-XXL classes) from
``comfy.sd.load_clip`` with a one-layer T5 at full width (``t5xxl_model_config``: DualCLIPLoader cannot
pass it, and 24 layers are 9.5 GB); FLUX's 16-channel VAE (diffusers layout) through VAELoader; a
small SigLIP in ComfyUI's ClipVisionModel and a Redux file in models/style_models.

Checks: the diffusers-layout file loads as FLUX; ComfyUI's model and diffusers' give the same velocity
(with and without appended image tokens); bierasing's FLUX LoRA files load through ComfyUI's loader
with zero "lora key not loaded" onto the fused q/k/v and linear1 slices and compute what bierasing's
adapters compute; the ComfyUI FLUX backbone equals the diffusers path (conditioning, velocity,
adapters, the first training step, Redux tokens, attention maps for automatic masks); and the nodes
run end to end: Erase Concept -> Save Erasure -> stock LoraLoaderModelOnly -> FluxGuidance ->
KSampler -> VAEDecode."""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_support import comfy_available, load_comfy, pack

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]
SMALL_SIGLIP = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 64, "image_size": 56,
                "intermediate_size": 128, "model_type": "siglip_vision_model", "num_attention_heads": 4,
                "num_hidden_layers": 2, "patch_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def t5_one_layer_tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """T5-XXL's width with one encoder block (fp16, random)."""
    d, ff, inner = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]
    shapes = {"shared.weight": (cfg["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                  (cfg["relative_attention_num_buckets"], cfg["num_heads"]),
              "encoder.block.0.layer.0.layer_norm.weight": (d,), "encoder.block.0.layer.1.layer_norm.weight": (d,),
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (ff, d),
              "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": (ff, d),
              "encoder.block.0.layer.1.DenseReluDense.wo.weight": (d, ff)}
    shapes.update({f"encoder.block.0.layer.0.SelfAttention.{p}.weight": (d, inner) if p == "o" else (inner, d)
                   for p in "qkvo"})
    return {k: (torch.randn(s, generator=gen) * 0.05 if len(s) > 1 else torch.ones(s)).half() for k, s in shapes.items()}


def flux_vae_tensors(seed: int) -> dict[str, torch.Tensor]:
    """FLUX.1's VAE architecture (16 latent channels, no quant convs) with random weights, diffusers layout."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()
    import comfy.clip_vision
    import comfy.model_base
    import comfy.sd
    import comfy.utils
    import folder_paths

    from bierasing.comfy_standins import checkpoint_tensors, randomize
    from bierasing.flux import ReduxProjector
    from bierasing.standins_flux import flux_transformer

    root = tmp_path_factory.mktemp("comfy_flux")
    for sub in ("diffusion_models", "vae", "style_models", "loras", "clip_vision"):
        (root / sub).mkdir()
        folder_paths.add_model_folder_path(sub, str(root / sub), is_default=True)
    t0 = time.time()
    twin = flux_transformer(1, 1, seed=0).eval().requires_grad_(False)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in twin.state_dict().items()},
                                str(root / "diffusion_models" / "flux_standin.safetensors"))
    comfy.utils.save_torch_file(flux_vae_tensors(0), str(root / "vae" / "flux_vae.safetensors"))
    gen = torch.Generator().manual_seed(0)
    sd15, _ = checkpoint_tensors()  # full CLIP-L inside the SD1.5 stand-in checkpoint
    comfy.utils.save_torch_file({k[len("cond_stage_model.transformer."):]: v for k, v in sd15.items()
                                 if k.startswith("cond_stage_model.transformer.")}, str(root / "clip_l.safetensors"))
    t5_cfg = json.loads((Path(comfy.sd.__file__).parent / "text_encoders" / "t5_config_xxl.json").read_text())
    t5_cfg["num_layers"] = 1
    comfy.utils.save_torch_file(t5_one_layer_tensors(t5_cfg, gen), str(root / "t5.safetensors"))
    (root / "clip_vision" / "small_siglip.json").write_text(json.dumps(SMALL_SIGLIP))
    torch.manual_seed(1)
    redux = ReduxProjector(SMALL_SIGLIP["hidden_size"], 3 * SMALL_SIGLIP["hidden_size"], 4096)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in redux.state_dict().items()},
                                str(root / "style_models" / "redux_standin.safetensors"))
    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        model = nodes.UNETLoader().load_unet("flux_standin.safetensors", "default")[0]
        vae = nodes.VAELoader().load_vae("flux_vae.safetensors")[0]
        clip = comfy.sd.load_clip([str(root / "clip_l.safetensors"), str(root / "t5.safetensors")],
                                  clip_type=comfy.sd.CLIPType.FLUX, model_options={"t5xxl_model_config": t5_cfg})
        cv = comfy.clip_vision.ClipVisionModel(str(root / "clip_vision" / "small_siglip.json"))
        sd = cv.model.state_dict()
        randomize(sd, torch.Generator().manual_seed(2))
        cv.model.load_state_dict(sd)
    assert isinstance(model.model, comfy.model_base.Flux), type(model.model)
    print(f"\nFLUX stand-in ({sum(p.numel() for p in twin.parameters()) / 1e6:.0f} M parameters), CLIP-L + one-layer "
          f"T5-XXL, VAE and SigLIP built and loaded in {time.time() - t0:.1f} s as {type(model.model.model_config).__name__}")
    glue = pack("nodes.comfy_glue")
    return SimpleNamespace(nodes=nodes, model=model, twin=twin, root=root, clip=clip, vae=vae, cv=cv, redux=redux,
                           glue=glue, flux_glue=importlib.import_module(f"{glue.__package__}.comfy_flux"),
                           spec=pack("nodes.spec"))


def run(fx, node_id: str, **kw):
    with torch.inference_mode():
        out = fx.nodes.NODE_CLASS_MAPPINGS[node_id].execute(**kw)
    return out.args if hasattr(out, "args") else out


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


# ---- the ComfyUI FLUX backbone against the diffusers path --------------------------------------------------
def twin_backbone(fx, cb, texts: dict):
    """bierasing's diffusers FluxBackbone around the twin transformer, on ``cb``'s time grid and guidance,
    with text conditioning looked up in ``texts`` (computed by ComfyUI's CLIP)."""
    from bierasing import flux
    from bierasing.flux1 import FluxBackbone

    class Given(FluxBackbone):
        def __init__(self):
            self.unet, self.guidance, self.pooled_dim = fx.twin, cb.guidance, 768
            self.sample_shape = cb.sample_shape
            self._img_ids = flux.image_ids(cb.sample_shape[1] // 2, cb.sample_shape[2] // 2)
            self.shift, self.sigmas, self.alphas_cumprod, self.flow_scale = \
                cb.shift, cb.sigmas, cb.alphas_cumprod, cb.flow_scale
            self.image_encoder = self.image_proj = None
            self._recorders = flux.install_attention_recorders(fx.twin)

        def encode_text(self, prompts):
            return torch.cat([texts[p] for p in prompts])

    return Given()


def test_backbone_conditioning_velocity_and_adapters_equal_diffusers(fx):
    from bierasing import flux
    from bierasing.erase.adapters import attach

    cb = fx.flux_glue.ComfyFluxBackbone(fx.model, fx.clip, resolution=64)
    assert cb.guidance == 3.5 and cb.sample_shape == (16, 8, 8) and abs(cb.shift - 3.158) < 1e-3  # e^1.15
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a dog", ""])
        assert text.shape == (2, 257, 4096) and torch.isfinite(text).all()
        assert cb.word_positions("a photo of a dog", "dog") == [cb.content_token_count("a photo of a dog") - 1]
        db = twin_backbone(fx, cb, {"a photo of a dog": text[:1]})
        x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([600])
        with torch.no_grad():
            ours, theirs = cb.model_output(x, t, text[:1]), db.model_output(x, t, text[:1])
        err = (ours - theirs).abs().max().item()
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)
        adapters = cb.attach_adapters("attn", 4, torch.Generator().manual_seed(2))
        twin_ad = attach(fx.twin, "attn", 4, rules=flux.TRAINABLE_RULES)
        try:
            assert set(adapters.layers) == set(twin_ad.layers)
            assert any(la.rows is not None for la in adapters.layers.values())  # slices of fused q/k/v
            with torch.no_grad():
                for name, layer in adapters.layers.items():
                    layer.up.normal_(std=0.02, generator=g)
                    twin_ad.layers[name].up.copy_(layer.up)
                    twin_ad.layers[name].down.copy_(layer.down)
                adapted, adapted_twin = cb.model_output(x, t, text[:1]), db.model_output(x, t, text[:1])
        finally:
            twin_ad.remove(fx.twin)
            cb.release()
    print(f"\nbackbone velocity: max |ComfyUI - diffusers| {err:.2e}; with 'attn' rank-4 adapters "
          f"{(adapted - adapted_twin).abs().max():.2e} (effect {(adapted - ours).abs().mean():.2e})")
    torch.testing.assert_close(adapted, adapted_twin, atol=2e-4, rtol=1e-3)
    assert (adapted - ours).abs().mean() > 1e-4


def test_first_training_step_equals_diffusers(fx):
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser
    from bierasing.erase.export import erasure_tensors

    cfg = EraseConfig(method="esd-x", steps=2, batch_size=2, rank=4, xt_source="cache", cache_size=2,
                      xt_steps=3, lr=1e-3, seed=0)
    concepts = [Concept("cat", "dog")]
    cb = fx.flux_glue.ComfyFluxBackbone(fx.model, fx.clip, resolution=64)
    grads = lambda ad: {n: torch.cat([la.down.grad.flatten(), la.up.grad.flatten()])  # noqa: E731
                        for n, la in ad.layers.items()}
    with torch.inference_mode(False):
        texts = dict(zip(["", "cat", "dog"], cb.encode_text(["", "cat", "dog"]).split(1)))
        db = twin_backbone(fx, cb, texts)
        with fx.glue.unet_session(cb, train=True):
            ec, ed = Eraser(cb, concepts, cfg), Eraser(db, concepts, cfg)
            ec.prepare()
            ed.prepare()
            with torch.no_grad():  # the same start (adapters are keyed by diffusers names on both paths)
                for n, layer in ed.adapters.layers.items():
                    layer.down.copy_(ec.adapters.layers[n].down)
            a, b = ec.cache.states[0], ed.cache.states[0]
            cache_diff = float((a - b).abs().max() / b.abs().max())
            rc, rd = ec.training_step(), ed.training_step()
            gc, tc = grads(ec.adapters), erasure_tensors(ec.adapters)
            ec.adapters.remove(cb.unet)
        gd, td = grads(ed.adapters), erasure_tensors(ed.adapters)
        ed.adapters.remove(db.unet)
    assert set(tc) == set(td) and set(gc) == set(gd)
    grad_rel = max(float((gc[n] - gd[n]).abs().max() / gd[n].abs().max()) for n in gd)
    print(f"\nfirst esd-x step, {len(gd)} layers: x_t cache rel. diff {cache_diff:.1e}, loss ComfyUI {rc['loss']:.6f} "
          f"vs diffusers {rd['loss']:.6f}, gradient max rel. diff {grad_rel:.1e}")
    assert cache_diff < 1e-3 and grad_rel < 1e-2
    assert abs(rc["loss"] - rd["loss"]) <= 1e-4 * max(1.0, abs(rd["loss"]))


def test_redux_tokens_equal_the_library_path(fx):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from bierasing.flux1 import SIGLIP_MEAN_STD
    from bierasing.imageprep import vision_pixels

    (adapter,) = run(fx, "BiErasingImageAdapterLoader", adapter_name="redux_standin.safetensors", scale=1.0)
    assert adapter["kind"] == "redux"
    cb = fx.glue.backbone(fx.model, fx.clip, fx.vae, fx.cv, adapter, 64)
    assert isinstance(cb, fx.flux_glue.ComfyFluxBackbone)
    size = SMALL_SIGLIP["image_size"]  # at the encoder's size: ComfyUI resizes bicubic, the library bilinear
    images = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(3)) / 255
    with torch.inference_mode(False):
        ours = cb.encode_images(images)
    cfg = SiglipVisionConfig(**{k: v for k, v in SMALL_SIGLIP.items() if k not in ("model_type", "image_mean", "image_std")},
                             vision_use_head=False)
    hf = SiglipVisionModel(cfg).eval()
    prefix = "vision_model." if next(iter(hf.state_dict())).startswith("vision_model.") else ""
    comfy_sd = {prefix + k.removeprefix("vision_model."): v for k, v in fx.cv.model.state_dict().items()}
    missing, _ = hf.load_state_dict(comfy_sd, strict=False)
    assert not missing, missing
    with torch.no_grad():
        states = hf(pixel_values=vision_pixels(images, size, *SIGLIP_MEAN_STD)).last_hidden_state
        theirs = fx.redux(states)
    print(f"\nRedux tokens {tuple(ours.shape)}: max |ComfyUI - library| {(ours - theirs).abs().max():.2e} "
          f"(values up to {theirs.abs().max():.2f})")
    assert ours.shape == (2, (size // 14) ** 2, 4096)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)
    ip = {"tensors": {"image_proj.proj.weight": torch.zeros(1)}, "scale": 1.0, "name": "ip.safetensors",
          "kind": "ip-adapter"}
    with pytest.raises(ValueError, match="Redux"):
        fx.glue.backbone(fx.model, fx.clip, fx.vae, fx.cv, ip, 64)


def test_attention_maps_for_automatic_masks_equal_diffusers(fx):
    cb = fx.flux_glue.ComfyFluxBackbone(fx.model, fx.clip, fx.vae, resolution=64)
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a cat"])
        db = twin_backbone(fx, cb, {})
        x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500])
        maps = []
        with fx.glue.unet_session(cb, train=False):
            for bb in (cb, db):
                recs = bb.attention_recorders()
                assert len(recs) == 1
                recs[0].attention_store = []
                try:
                    with torch.no_grad():
                        bb.model_output(x, t, text)
                    maps.append(recs[0].attention_store[0])
                finally:
                    recs[0].attention_store = None
    print(f"\nattention to the text, image tokens x text tokens {tuple(maps[0].shape)}: max |ComfyUI - diffusers| "
          f"{(maps[0] - maps[1]).abs().max():.2e}")
    assert maps[0].shape == (1, 16, 256)
    torch.testing.assert_close(maps[0], maps[1], atol=1e-5, rtol=1e-3)


def test_erase_save_loraloader_ksampler_on_flux(fx, caplog):
    """The node chain a user builds: generated exemplars, automatic masks, Erase Concept (Bi-Erasing with
    the Redux image branch), Save Erasure, the stock LoraLoaderModelOnly, FluxGuidance, KSampler."""
    (adapter,) = run(fx, "BiErasingImageAdapterLoader", adapter_name="redux_standin.safetensors", scale=1.0)
    gen = dict(model=fx.model, clip=fx.clip, vae=fx.vae, negative="", count=2, steps=2, cfg=1.0, resolution=64)
    (neg,) = run(fx, "BiErasingGenerateExemplars", prompt="a photo of a cat", seed=0, **gen)
    (pos,) = run(fx, "BiErasingGenerateExemplars", prompt="a photo of a dog", seed=10, **gen)
    assert neg.shape == (2, 64, 64, 3) and torch.isfinite(neg).all() and not torch.equal(neg, pos)
    filt, masks = run(fx, "BiErasingMaskFilter", images=neg, masks=None, concept="cat", caption="",
                      model=fx.model, clip=fx.clip, vae=fx.vae, threshold=0.4, min_component=0.001,
                      morph_radius_512=3.0, feather_sigma_512=2.0, min_coverage=0.05)
    assert filt.shape == neg.shape and masks.shape == (2, 64, 64) and torch.isfinite(masks).all()
    settings = {p.name: p.default for p in fx.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", steps=2, batch_size=2, cache_size=2, xt_steps=3,
                    resolution=64, preview_every=0, preserve="", adversarial=0.0)
    t0 = time.time()
    erased, lora, curve, report = run(fx, "BiErasingErase", model=fx.model, clip=fx.clip, clip_vision=fx.cv,
                                      image_adapter=adapter, negative_images=filt, positive_images=pos, vae=fx.vae,
                                      **settings)
    seconds = time.time() - t0
    info = json.loads(report)
    assert info["method"] == "bi-erasing" and info["config"]["steps"] == 2
    assert lora and all(k.startswith("transformer.") for k in lora)  # the peft layout both loaders read
    (rel,) = run(fx, "BiErasingSaveErasure", lora=lora, filename="erasures/flux_cat", report=report)
    from safetensors import safe_open

    with safe_open(str(fx.root / "loras" / rel), "pt") as f:
        assert set(f.keys()) == set(lora) and json.loads(f.metadata()["bierasing"])["method"] == "bi-erasing"
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (m2,) = fx.nodes.LoraLoaderModelOnly().load_lora_model_only(fx.model, rel, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    m3, _ = run(fx, "BiErasingLoadErasure", model=fx.model, erasure_name=rel, strength=1.0)
    from comfy_extras.nodes_flux import FluxGuidance as flux_guidance
    with torch.inference_mode():
        pos_c = fx.nodes.CLIPTextEncode().encode(fx.clip, "a photo of a cat")[0]
        pos_c = flux_guidance.execute(conditioning=pos_c, guidance=3.5).args[0]
        neg_c = fx.nodes.CLIPTextEncode().encode(fx.clip, "")[0]
        latent = {"samples": torch.zeros(1, 16, 8, 8)}
        outs = [fx.nodes.common_ksampler(m, 7, 2, 1.0, "euler", "simple", pos_c, neg_c, latent)[0]["samples"]
                for m in (fx.model, erased, m2, m3)]
        image = fx.nodes.VAEDecode().decode(fx.vae, {"samples": outs[1]})[0]
    diff = (outs[0] - outs[1]).abs().mean().item()
    print(f"\nErase Concept on FLUX (bi-erasing + Redux, 2 steps, 64 px): {seconds:.0f} s, {len(lora)} tensors; "
          f"KSampler erased vs original latent mean |diff| {diff:.2e}; erased vs LoraLoader "
          f"{(outs[1] - outs[2]).abs().max():.1e}")
    assert all(torch.isfinite(o).all() for o in outs) and image.shape == (1, 64, 64, 3)
    assert torch.allclose(outs[1], outs[2], atol=1e-5) and torch.allclose(outs[2], outs[3], atol=1e-5)
    assert diff > 1e-6  # the erasure changed the model


def test_fp8_stored_weights_train_fp32_adapters_and_stay_unchanged(fx):
    """FLUX users load fp8 weights (UNETLoader weight_dtype fp8_e4m3fn): the adapters ride on ComfyUI's
    per-forward cast as weight wrappers, so training works and the stored fp8 weights are never written."""
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.engine import Eraser

    with torch.inference_mode():
        m8 = fx.nodes.UNETLoader().load_unet("flux_standin.safetensors", "fp8_e4m3fn")[0]
    dm = m8.model.diffusion_model
    stored = {n: p for n, p in dm.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert stored and dm.double_blocks[0].txt_attn.qkv.weight.dtype == torch.float8_e4m3fn
    with torch.inference_mode(False):
        before = {n: p.detach().view(torch.uint8).clone() for n, p in stored.items()}
        cb = fx.flux_glue.ComfyFluxBackbone(m8, fx.clip, resolution=64)
        cfg = EraseConfig(method="esd-x", steps=2, batch_size=2, rank=4, xt_source="cache", cache_size=2,
                          xt_steps=3, seed=0, preserve="")
        cb.encode_text(["", "cat", "dog"])
        with fx.glue.unet_session(cb, train=True):
            eraser = Eraser(cb, [Concept("cat", "dog")], cfg)
            result = eraser.run()
            layers = list(result.adapters.layers.values())
            assert layers and all(p.dtype == torch.float32 for la in layers for p in (la.down, la.up))
            moved = max(float(la.up.abs().max()) for la in layers)
            result.adapters.remove(cb.unet)
    losses = [r["loss"] for r in result.history]
    print(f"\nfp8-stored FLUX stand-in: {len(stored)} fp8 tensors, esd-x losses {losses}, adapter |up| max {moved:.1e}")
    assert all(torch.isfinite(torch.tensor(losses))) and moved > 0
    assert all(torch.equal(p.detach().view(torch.uint8), before[n]) for n, p in stored.items())


def test_closed_form_erasure_on_flux_is_refused_before_any_work(fx):
    settings = {p.name: p.default for p in fx.spec.BY_ID["BiErasingEraseInstant"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog")
    t0 = time.time()
    with pytest.raises(ValueError, match="use Erase Concept with bi-erasing"):
        run(fx, "BiErasingEraseInstant", model=fx.model, clip=fx.clip, **settings)
    assert time.time() - t0 < 5
