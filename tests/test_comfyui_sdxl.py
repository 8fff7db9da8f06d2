"""SDXL inside a real ComfyUI (run with ComfyUI's Python, COMFYUI_PATH set): the nodes take an SDXL-family
MODEL/CLIP from CheckpointLoaderSimple; ComfyUI's path and the diffusers path give the same noise
predictions (text; text + image) and the same first training step; erase -> Save Erasure -> stock
LoraLoader -> KSampler with zero "lora key not loaded"; the input MODEL is left as it was.
Stand-in: bierasing.comfy_standins.TINY_SDXL_UNET (detected as Segmind Vega, an SDXL distillation) with
full-size random CLIP-L + bigG."""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import torch
from comfy_support import (SMALL_VISION, comfy_available, first_step_both_ways, given_backbone, load_comfy,
                          pack, small_clip_vision)

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()  # puts ComfyUI on sys.path
    import comfy.utils
    import folder_paths

    from bierasing.comfy_standins import ip_adapter_tensors, sdxl_checkpoint_tensors

    root = tmp_path_factory.mktemp("comfy_sdxl")
    for sub in ("checkpoints", "loras", "clip_vision"):
        (root / sub).mkdir()
        folder_paths.add_model_folder_path(sub, str(root / sub), is_default=True)
    t0 = time.time()
    ckpt, n_attn2 = sdxl_checkpoint_tensors()
    comfy.utils.save_torch_file(ckpt, str(root / "checkpoints" / "tiny_sdxl.safetensors"))
    del ckpt
    ip = ip_adapter_tensors(n_attn2, inner_dim=320, context_dim=2048, embed_dim=1024)
    (root / "clip_vision" / "small_vision.json").write_text(json.dumps(SMALL_VISION))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sdxl.safetensors")[:3]
        cv = small_clip_vision(root / "clip_vision" / "small_vision.json")
    print(f"\nSDXL stand-in built and loaded in {time.time() - t0:.1f} s "
          f"({type(model.model.model_config).__name__}, {n_attn2} attn2 layers)")
    return SimpleNamespace(nodes=nodes, model=model, clip=clip, vae=vae, cv=cv, ip=ip, root=root,
                           glue=pack("nodes.comfy_glue"), spec=pack("nodes.spec"))


def run(xl, node_id: str, **kw):
    with torch.inference_mode():
        out = xl.nodes.NODE_CLASS_MAPPINGS[node_id].execute(**kw)
    return out.args if hasattr(out, "args") else out


def _diffusers_twin(xl):
    """The same UNet as a diffusers SDXL UNet2DConditionModel (weights through ComfyUI's name map)."""
    from comfy.utils import unet_to_diffusers
    from diffusers import UNet2DConditionModel

    u = UNet2DConditionModel(sample_size=8, block_out_channels=(320, 320, 320), layers_per_block=2,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                             transformer_layers_per_block=(1, 1, 2), attention_head_dim=(5, 5, 5),
                             cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    mapping = unet_to_diffusers(xl.model.model.model_config.unet_config)
    src = xl.model.model.diffusion_model.state_dict()
    fix = lambda d: d.replace("class_embedding.", "add_embedding.")  # noqa: E731  ComfyUI's older name
    u.load_state_dict({fix(d): src[ldm].float().clone() for d, ldm in mapping.items() if ldm in src}, strict=True)
    return u.eval().requires_grad_(False)


def _diffusers_backbone(unet, texts: dict):
    from bierasing.sdxl import SDXLBackbone

    return given_backbone(SDXLBackbone, unet, texts, pooled_dim=1280)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_the_sdxl_model_is_recognised(xl):
    assert xl.glue.model_family(xl.model) == "sdxl"
    cb = xl.glue.ComfyBackbone(xl.model, xl.clip, resolution=64)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a cat"])
    assert text.shape == (1, 78, 2048) and float(text[0, 77, 1280:].abs().max()) == 0


def test_comfy_and_diffusers_paths_agree_on_sdxl(xl):
    from bierasing.adapter import ImageProjModel, install_decoupled_attention, load_ip_adapter_state_dict

    glue = xl.glue
    cb = glue.ComfyBackbone(xl.model, xl.clip, None, xl.cv, xl.ip, 1.0, resolution=64)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a cat", ""])
        twin = _diffusers_twin(xl)
        install_decoupled_attention(twin)
        load_ip_adapter_state_dict(xl.ip, ImageProjModel(1024, 2048, 4), twin)
        db = _diffusers_backbone(twin, {})
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
        tokens = torch.randn(2, 4, 2048, generator=g)
        with glue.unet_session(cb, train=False):
            ec, ec_ip = cb.predict_noise(x, t, text), cb.predict_noise(x, t, text, tokens)
        with torch.no_grad():
            ed, ed_ip = db.predict_noise(x, t, text), db.predict_noise(x, t, text, tokens)
    print(f"\nSDXL noise prediction rel. max diff: text {rel(ec, ed):.2e}, text+image {rel(ec_ip, ed_ip):.2e}; "
          f"image channel effect {rel(ed_ip, ed):.2e}")
    assert rel(ec, ed) < 1e-4 and rel(ec_ip, ed_ip) < 1e-4
    assert rel(ed_ip, ed) > 1e-3


def test_first_training_step_agrees_on_sdxl(xl):
    r = first_step_both_ways(xl.glue, xl.model, xl.clip, lambda texts: _diffusers_backbone(_diffusers_twin(xl), texts))
    print(f"\nSDXL x_t cache rel. diff {r['cache_diff']:.2e}; step-1 loss comfy {r['loss_comfy']} vs diffusers "
          f"{r['loss_diffusers']}; gradient rel. max diff {r['grad_rel']:.2e} over {r['layers']} adapted layers; "
          f"LoRA weights equal to 1e-6 after step 1: {r['same_weights']:.4%}")
    assert r["cache_diff"] < 1e-3
    assert abs(r["loss_comfy"] - r["loss_diffusers"]) <= 1e-4 * abs(r["loss_diffusers"]) + 1e-9
    assert r["grad_rel"] < 1e-3 and r["same_weights"] > 0.99


def _fingerprint(xl):
    with torch.inference_mode():
        pos = xl.nodes.CLIPTextEncode().encode(xl.clip, "a photo of a cat")[0]
        neg = xl.nodes.CLIPTextEncode().encode(xl.clip, "")[0]
        lat = {"samples": torch.zeros(1, 4, 8, 8)}
        return xl.nodes.common_ksampler(xl.model, 3, 2, 5.0, "euler", "normal", pos, neg, lat)[0]["samples"]


@pytest.mark.parametrize("method", ["esd-x", "bi-erasing"])
def test_erase_save_loraloader_ksampler_on_sdxl(xl, method, caplog):
    before = _fingerprint(xl)
    settings = {p.name: p.default for p in xl.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method=method, steps=3, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64, preview_every=0)
    images = {}
    if method == "bi-erasing":
        (neg,) = run(xl, "BiErasingGenerateExemplars", model=xl.model, clip=xl.clip, vae=xl.vae, prompt="a cat",
                     negative="", count=2, seed=0, steps=2, cfg=5.0, resolution=64)
        (pos,) = run(xl, "BiErasingGenerateExemplars", model=xl.model, clip=xl.clip, vae=xl.vae, prompt="a dog",
                     negative="", count=2, seed=5, steps=2, cfg=5.0, resolution=64)
        images = dict(clip_vision=xl.cv, image_adapter={"tensors": xl.ip, "scale": 1.0, "name": "ip"},
                      negative_images=neg, positive_images=pos)
    t0 = time.time()
    erased, lora, _, report = run(xl, "BiErasingErase", model=xl.model, clip=xl.clip, vae=xl.vae, **images,
                                  **settings)
    seconds = time.time() - t0
    info = json.loads(report)
    assert info["config"]["steps"] == 3 and torch.isfinite(torch.tensor(info["final_loss"]))
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        name = run(xl, "BiErasingSaveErasure", lora=lora, filename=f"erasures/xl_{method}", report=report)[0]
        m2, _ = xl.nodes.LoraLoader().load_lora(xl.model, xl.clip, name, 1.0, 0.0)
        pos = xl.nodes.CLIPTextEncode().encode(xl.clip, "a photo of a cat")[0]
        neg = xl.nodes.CLIPTextEncode().encode(xl.clip, "")[0]
        lat = {"samples": torch.zeros(1, 4, 8, 8)}
        outs = [xl.nodes.common_ksampler(m, 3, 2, 5.0, "euler", "normal", pos, neg, lat)[0]["samples"]
                for m in (erased, m2)]
    print(f"\nSDXL {method}: erase (3 steps, 64 px) {seconds:.1f} s, {len(lora)} LoRA tensors")
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)  # the file is the erased MODEL
    assert not torch.equal(outs[1], before)
    assert torch.equal(_fingerprint(xl), before)  # the input MODEL is untouched


def test_an_sdxl_erasure_saved_in_comfyui_loads_in_diffusers(xl, tmp_path):
    """The file Save Erasure writes for SDXL: StableDiffusionXLPipeline.load_lora_weights takes every key
    (no missing or unexpected ones), and the diffusers UNet then predicts what ComfyUI's erased MODEL does."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    from diffusers import StableDiffusionXLPipeline
    from test_diffusers_lora import captured_warnings

    from bierasing.standins import build_sdxl_folder

    settings = {p.name: p.default for p in xl.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method="esd-x", steps=3, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64, preview_every=0, lr=1e-2)
    erased, lora, _, report = run(xl, "BiErasingErase", model=xl.model, clip=xl.clip, **settings)
    name = run(xl, "BiErasingSaveErasure", lora=lora, filename="erasures/xl_for_diffusers", report=report)[0]
    path = xl.root / "loras" / name

    small = build_sdxl_folder(tmp_path / "parts")["model"]  # tokenizers, text encoders, VAE, scheduler
    parts = StableDiffusionXLPipeline.from_pretrained(small)
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2,
                                     unet=_diffusers_twin(xl), scheduler=parts.scheduler)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(path))
    assert [m for m in messages if "No LoRA keys associated to CLIPText" not in m] == []

    glue = xl.glue
    cb = glue.ComfyBackbone(erased, xl.clip, resolution=64)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a cat", ""])
        db = _diffusers_backbone(pipe.unet, {})
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
        with glue.unet_session(cb, train=False):
            ec = cb.predict_noise(x, t, text)
        with torch.no_grad():
            ed = db.predict_noise(x, t, text)
            plain = _diffusers_backbone(_diffusers_twin(xl), {}).predict_noise(x, t, text)
    print(f"\nComfyUI erased vs diffusers + LoRA rel. max diff {rel(ec, ed):.2e}; the erasure's own effect "
          f"{rel(ed, plain):.2e}")
    assert rel(ec, ed) < 1e-4 and rel(ed, plain) > 1e-3


def test_attack_node_on_sdxl_gives_conditioning_a_ksampler_takes(xl):
    (imgs,) = run(xl, "BiErasingGenerateExemplars", model=xl.model, clip=xl.clip, vae=xl.vae, prompt="a cat",
                  negative="", count=2, seed=0, steps=2, cfg=5.0, resolution=64)
    settings = {p.name: p.default for p in xl.spec.BY_ID["BiErasingAttack"].inputs if p.default is not None}
    settings.update(prompt="a photo of a cat", steps=3, batch_size=2)
    cond, start, report = run(xl, "BiErasingAttack", model=xl.model, clip=xl.clip, vae=xl.vae,
                              concept_images=imgs, **settings)
    with torch.inference_mode():
        plain = xl.nodes.CLIPTextEncode().encode(xl.clip, "a photo of a cat")[0]
        neg = xl.nodes.CLIPTextEncode().encode(xl.clip, "")[0]
        lat = {"samples": torch.zeros(1, 4, 8, 8)}
        out = xl.nodes.common_ksampler(xl.model, 0, 2, 5.0, "euler", "normal", cond, neg, lat)[0]["samples"]
    assert cond[0][0].shape == plain[0][0].shape == (1, 77, 2048)  # the pooled token is not a context token
    assert cond[0][1]["pooled_output"].shape == (1, 1280)
    torch.testing.assert_close(start[0][0], plain[0][0])
    torch.testing.assert_close(start[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    assert json.loads(report)["steps_done"] == 3 and torch.isfinite(out).all()


def test_instant_edit_agrees_between_comfyui_and_diffusers_on_sdxl(xl):
    """bi-instant reads the keys/values' tokens without SDXL's packed pooled vector, the same way on
    both paths (ComfyUI's tokenizer counts the concept's tokens, diffusers' twin is given them)."""
    from bierasing.erase import Concept, EraseConfig
    from bierasing.erase.export import erasure_tensors
    from bierasing.erase.instant import instant_erasure

    glue = xl.glue
    cfg = EraseConfig(method="bi-instant", preserve="a photo of a horse", contexts=0)
    concepts = [Concept("a photo of a cat", "a photo of a dog")]
    cb = glue.ComfyBackbone(xl.model, xl.clip, resolution=64)
    with torch.inference_mode(False):
        texts = {p: cb.encode_text([p]) for p in ("", "a photo of a cat", "a photo of a dog", "a photo of a horse")}
        with glue.unet_session(cb, train=False):
            res = instant_erasure(cb, concepts, cfg)
            comfy = erasure_tensors(res.adapters, glue.ldm_to_diffusers_names(xl.model))
            res.adapters.remove(cb.unet)
        db = given_backbone_xl(_diffusers_twin(xl), texts, cb.content_token_count)
        res = instant_erasure(db, concepts, cfg)
        ours = erasure_tensors(res.adapters)
        res.adapters.remove(db.unet)
    assert sorted(comfy) == sorted(ours) and len(ours) > 2  # every attn2 to_k and to_v
    worst = max(rel(comfy[k], ours[k]) for k in ours)
    print(f"\nSDXL bi-instant deltas, ComfyUI vs diffusers: rel. max diff {worst:.2e} over {len(ours)} tensors")
    assert worst < 1e-3 and all(float(v.abs().max()) > 0 for v in ours.values())


def given_backbone_xl(unet, texts, content_token_count):
    db = _diffusers_backbone(unet, texts)
    db.content_token_count = content_token_count
    return db
