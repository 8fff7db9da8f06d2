"""The node pack inside real ComfyUI (skipped with the reason when ComfyUI is absent).

Run: COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/.venv/bin/python -m pytest tests/test_comfyui.py
(ComfyUI's Python, with pytest and this pack's requirements installed).
"""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from comfy_support import (build_standins, comfy_available, first_step_both_ways, given_backbone, load_comfy,
                          pack, small_clip_vision)

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]
IDS = ["BiErasingLoadExemplars", "BiErasingGenerateExemplars", "BiErasingMaskFilter",
       "BiErasingImageAdapterLoader", "BiErasingErase", "BiErasingEraseInstant", "BiErasingSaveErasure", "BiErasingLoadErasure",
       "BiErasingCompareGrid", "BiErasingEvaluate", "BiErasingAttack"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()
    root = tmp_path_factory.mktemp("comfy_models")
    paths = build_standins(root)
    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
        cv = small_clip_vision(paths["vision_config"])
    return SimpleNamespace(nodes=nodes, model=model, clip=clip, vae=vae, cv=cv, paths=paths, root=root,
                           glue=pack("nodes.comfy_glue"), spec=pack("nodes.spec"))


def run(comfy, node_id: str, **kw):
    with torch.inference_mode():
        out = comfy.nodes.NODE_CLASS_MAPPINGS[node_id].execute(**kw)
    return out.args if hasattr(out, "args") else out


def test_every_node_registers_with_the_declared_schema(comfy):
    for nid in IDS:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[nid]
        info = cls.GET_NODE_INFO_V1()
        want = comfy.spec.object_info(comfy.spec.BY_ID[nid])
        assert info["output"] == want["output"] and info["category"] == want["category"], nid
        for group in ("required", "optional"):
            got = info["input"].get(group, {})
            exp = want["input"].get(group, {})
            assert list(got) == list(exp), (nid, group)
            for name, entry in exp.items():
                if not isinstance(entry[0], list):  # file combos are listed live
                    assert got[name][0] == entry[0], (nid, name)
                assert got[name][1].get("tooltip") == entry[1].get("tooltip"), (nid, name)


def _diffusers_twin(env):
    """The same UNet as a diffusers UNet2DConditionModel (weights through ComfyUI's name map)."""
    from comfy.utils import unet_to_diffusers
    from diffusers import UNet2DConditionModel

    u = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                             cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    mapping = unet_to_diffusers(env.model.model.model_config.unet_config)
    src = env.model.model.diffusion_model.state_dict()
    u.load_state_dict({d: src[ldm].float().clone() for d, ldm in mapping.items() if ldm in src}, strict=True)
    return u.eval().requires_grad_(False)


def _diffusers_backbone(unet, texts: dict):
    from bierasing.sd15 import SD15Backbone

    return given_backbone(SD15Backbone, unet, texts)


def test_comfy_and_diffusers_paths_agree(comfy):
    from bierasing.adapter import ImageProjModel, install_decoupled_attention, load_ip_adapter_state_dict
    from bierasing.io import load_safetensors

    glue = comfy.glue
    ip, _ = load_safetensors(comfy.paths["ip_adapter"])
    cb = glue.ComfyBackbone(comfy.model, comfy.clip, None, comfy.cv, ip, 1.0, resolution=64)
    with torch.inference_mode(False):
        text = cb.encode_text(["a photo of a cat", ""])
        twin = _diffusers_twin(comfy)
        install_decoupled_attention(twin)
        load_ip_adapter_state_dict(ip, ImageProjModel(1024, 768, 4), twin)
        db = _diffusers_backbone(twin, {})
        assert torch.allclose(cb.alphas_cumprod, db.alphas_cumprod, rtol=1e-4, atol=1e-6)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([50, 700])
        tokens = torch.randn(2, 4, 768, generator=g)
        with glue.unet_session(cb, train=False):
            ec = cb.predict_noise(x, t, text)
            ec_ip = cb.predict_noise(x, t, text, tokens)
        with torch.no_grad():
            ed, ed_ip = db.predict_noise(x, t, text), db.predict_noise(x, t, text, tokens)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    print(f"\nnoise prediction rel. max diff: text {rel(ec, ed):.2e}, text+image {rel(ec_ip, ed_ip):.2e}; "
          f"image channel effect {rel(ed_ip, ed):.2e}")
    assert rel(ec, ed) < 1e-4 and rel(ec_ip, ed_ip) < 1e-4
    assert rel(ed_ip, ed) > 1e-3  # the image channel does change the prediction


def test_first_training_step_agrees(comfy):
    r = first_step_both_ways(comfy.glue, comfy.model, comfy.clip,
                             lambda texts: _diffusers_backbone(_diffusers_twin(comfy), texts))
    print(f"\nx_t cache rel. diff {r['cache_diff']:.2e}; step-1 loss comfy {r['loss_comfy']} vs diffusers "
          f"{r['loss_diffusers']}; gradient rel. max diff {r['grad_rel']:.2e}; LoRA weights equal to 1e-6 after "
          f"step 1: {r['same_weights']:.4%} (Adam's first step is lr * sign(grad): near-zero gradients may flip)")
    assert r["cache_diff"] < 1e-3
    assert abs(r["loss_comfy"] - r["loss_diffusers"]) <= 1e-4 * abs(r["loss_diffusers"]) + 1e-9
    assert r["grad_rel"] < 1e-3 and r["same_weights"] > 0.99


def test_erase_save_loraloader_ksampler(comfy, caplog):
    (adapter,) = run(comfy, "BiErasingImageAdapterLoader", adapter_name="tiny_ip_sd15.safetensors", scale=1.0)
    (neg,) = run(comfy, "BiErasingGenerateExemplars", model=comfy.model, clip=comfy.clip, vae=comfy.vae,
                 prompt="a photo of a cat", negative="", count=2, seed=0, steps=2, cfg=5.0, resolution=64)
    (pos,) = run(comfy, "BiErasingGenerateExemplars", model=comfy.model, clip=comfy.clip, vae=comfy.vae,
                 prompt="a photo of a dog", negative="", count=2, seed=10, steps=2, cfg=5.0, resolution=64)
    assert neg.shape == (2, 64, 64, 3) and not torch.equal(neg, pos)
    filt, masks = run(comfy, "BiErasingMaskFilter", images=neg, masks=None, concept="cat", caption="",
                      model=comfy.model, clip=comfy.clip, vae=comfy.vae, threshold=0.4, min_component=0.001,
                      morph_radius_512=3.0, feather_sigma_512=2.0, min_coverage=0.05)
    assert filt.shape == neg.shape and masks.shape == (2, 64, 64) and 0 < float(masks.mean()) < 1
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", steps=3, batch_size=2, cache_size=2, xt_steps=3,
                    resolution=64)
    erased, lora, curve, report = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip,
                                      clip_vision=comfy.cv, image_adapter=adapter, negative_images=filt,
                                      positive_images=pos, **settings)
    info = json.loads(report)
    assert info["method"] == "bi-erasing" and info["config"]["steps"] == 3 and curve.shape[-1] == 3
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_up_blocks_", "lora_unet_mid_block_"))
               for k in lora)
    out = run(comfy, "BiErasingSaveErasure", lora=lora, filename="erasures/cat0", report=report)
    assert out[0] == "erasures/cat0.safetensors"
    saved = comfy.root / "loras" / "erasures" / "cat0.safetensors"
    assert saved.is_file()
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        m2, _ = comfy.nodes.LoraLoader().load_lora(comfy.model, comfy.clip, "erasures/cat0.safetensors", 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    m3, info3 = run(comfy, "BiErasingLoadErasure", model=comfy.model, erasure_name="erasures/cat0.safetensors",
                    strength=1.0)
    assert json.loads(info3)["method"] == "bi-erasing"
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        pos_c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "a photo of a cat")[0]
        neg_c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "")[0]
        outs = [comfy.nodes.common_ksampler(m, 7, 2, 5.0, "euler", "normal", pos_c, neg_c, latent)[0]["samples"]
                for m in (comfy.model, erased, m2, m3)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.allclose(outs[1], outs[2], atol=1e-5) and torch.allclose(outs[2], outs[3], atol=1e-5)
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)  # the erasure changed the model


def test_erase_on_a_loaded_erasure_keeps_it_and_saves_both(comfy):
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(method="esd-x", steps=2, batch_size=2, cache_size=2, xt_steps=3, resolution=64, preserve="",
                    contexts=0, preview_every=0)
    _, lora_a, _, report_a = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip,
                                 **{**settings, "concept": "cat", "safe_concept": "dog"})
    run(comfy, "BiErasingSaveErasure", lora=lora_a, filename="erasures/seq_a", report=report_a)
    m_a, _ = run(comfy, "BiErasingLoadErasure", model=comfy.model, erasure_name="erasures/seq_a.safetensors",
                 strength=1.0)
    erased, lora_ab, _, report_ab = run(comfy, "BiErasingErase", model=m_a, clip=comfy.clip,
                                        **{**settings, "concept": "horse", "safe_concept": "cow"})
    info = json.loads(report_ab)
    assert [r["file"] for r in info["stack"]] == ["seq_a.safetensors", "(this run)"]
    assert [c["target"] for c in info["concepts"]] == ["cat", "horse"]
    key = next(k for k in lora_a if k.endswith(".lora_down.weight"))
    assert lora_ab[key].shape[0] == 2 * lora_a[key].shape[0]  # A's rank + B's
    assert len(comfy.glue.carried(m_a)) == 1 and not comfy.glue.carried(comfy.model)  # inputs untouched
    run(comfy, "BiErasingSaveErasure", lora=lora_ab, filename="erasures/seq_ab", report=report_ab)
    with torch.inference_mode():
        m_ab, _ = comfy.nodes.LoraLoader().load_lora(comfy.model, comfy.clip, "erasures/seq_ab.safetensors", 1.0, 0.0)
        c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "a photo of a cat")[0]
        u = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        outs = [comfy.nodes.common_ksampler(m, 3, 2, 5.0, "euler", "normal", c, u, latent)[0]["samples"]
                for m in (erased, m_ab, m_a)]
    rel = float((outs[0] - outs[1]).norm() / outs[0].norm())
    assert rel < 1e-5, rel  # the one file = A, then B on top (up to float sums)
    assert not torch.allclose(outs[1], outs[2], atol=1e-6)  # and B did something


def test_stock_save_checkpoint_fuses_the_erasure_into_the_weights(comfy, tmp_path):
    import shutil

    from comfy_extras import nodes_model_merging

    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(method="esd-x", steps=2, batch_size=2, cache_size=2, xt_steps=3, resolution=64, preserve="",
                    contexts=0, preview_every=0)
    erased, _, _, _ = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip,
                          **{**settings, "concept": "cat", "safe_concept": "dog"})
    saver = nodes_model_merging.CheckpointSave()
    saver.output_dir = str(tmp_path)
    with torch.inference_mode():
        saver.save(erased, comfy.clip, comfy.vae, "fused/erased")
    (saved,) = (tmp_path / "fused").glob("erased*.safetensors")
    shutil.copy2(saved, comfy.root / "checkpoints" / "fused_erased.safetensors")
    with torch.inference_mode():
        fused = comfy.nodes.CheckpointLoaderSimple().load_checkpoint("fused_erased.safetensors")[0]
        c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "a photo of a cat")[0]
        u = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        outs = [comfy.nodes.common_ksampler(m, 5, 2, 5.0, "euler", "normal", c, u, latent)[0]["samples"]
                for m in (erased, fused, comfy.model)]
    rel = float((outs[0] - outs[1]).norm() / outs[0].norm())
    assert rel < 1e-5, rel  # the checkpoint draws as the erased MODEL
    assert not torch.allclose(outs[1], outs[2], atol=1e-6)  # with no LoRA left to switch off


def _sample(comfy, models, prompt="a photo of a cat", seed=3):
    with torch.inference_mode():
        c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, prompt)[0]
        u = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return [comfy.nodes.common_ksampler(m, seed, 2, 5.0, "euler", "normal", c, u, latent)[0]["samples"]
                for m in models]


def test_instant_erase_node_edits_in_closed_form_and_saves_a_loadable_file(comfy, caplog):
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingEraseInstant"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", preserve="a photo of a horse", contexts=0)
    import comfy.model_management as mm

    mm.unload_all_models()  # ComfyUI keeps the last sampled clone's patches in the shared weights
    before = {k: v.clone() for k, v in comfy.model.model.diffusion_model.state_dict().items()}
    patches = dict(comfy.model.patches)
    erased, lora, report = run(comfy, "BiErasingEraseInstant", model=comfy.model, clip=comfy.clip, **settings)
    info = json.loads(report)
    assert info["method"] == "bi-instant" and info["seconds"] < 30
    assert lora and all(k.endswith(".diff") and ("attn2_to_k" in k or "attn2_to_v" in k) for k in lora)
    mm.unload_all_models()
    after = comfy.model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the incoming MODEL is untouched
    assert dict(comfy.model.patches) == patches
    run(comfy, "BiErasingSaveErasure", lora=lora, filename="erasures/cat_instant", report=report)
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded, _ = comfy.nodes.LoraLoader().load_lora(comfy.model, comfy.clip, "erasures/cat_instant.safetensors",
                                                       1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    outs = _sample(comfy, (erased, loaded, comfy.model))
    assert float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-3  # fp32 deltas through the stock loader
    assert not torch.allclose(outs[0], outs[2], atol=1e-6)


def test_warm_started_erase_trains_on_the_instant_edit_and_saves_both(comfy):
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(method="esd-x", steps=2, batch_size=2, cache_size=2, xt_steps=3, resolution=64, preserve="",
                    contexts=0, preview_every=0, warm_start=True, concept="cat", safe_concept="dog")
    erased, lora, _, report = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, **settings)
    info = json.loads(report)
    assert [r["method"] for r in info["stack"]] == ["bi-instant", "esd-x"]
    assert any(k.endswith("attn2_to_k.diff") for k in lora) and any(k.endswith("attn2_to_q.lora_down.weight")
                                                                      for k in lora)
    run(comfy, "BiErasingSaveErasure", lora=lora, filename="erasures/cat_warm", report=report)
    with torch.inference_mode():
        loaded, _ = comfy.nodes.LoraLoader().load_lora(comfy.model, comfy.clip, "erasures/cat_warm.safetensors",
                                                       1.0, 0.0)
    outs = _sample(comfy, (erased, loaded))
    assert float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-3


def test_grid_and_evaluate_nodes(comfy):
    grid, before, after = run(comfy, "BiErasingCompareGrid", original_model=comfy.model, erased_model=comfy.model,
                              clip=comfy.clip, vae=comfy.vae, prompts="a cat\na dog", negative="",
                              samples_per_prompt=1, seed=3, steps=2, cfg=5.0, resolution=64)
    assert grid.ndim == 4 and before.shape == (2, 64, 64, 3) and torch.equal(before, after)
    report, rate = run(comfy, "BiErasingEvaluate", images=before, detector="nudenet", threshold=0.6, target="")
    assert json.loads(report)["images"] == 2 and 0.0 <= rate <= 1.0


def test_bad_inputs_give_clear_messages(comfy, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        run(comfy, "BiErasingLoadExemplars", folder="empty", size=64, max_images=0)
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        run(comfy, "BiErasingLoadExemplars", folder=str(tmp_path.parent), size=64, max_images=0)
    imgs = torch.rand(2, 64, 64, 3)
    with pytest.raises(ValueError, match="masks are 32x32 but the images are 64x64"):
        run(comfy, "BiErasingMaskFilter", images=imgs, masks=torch.ones(2, 32, 32), concept="cat", caption="",
            threshold=0.4, min_component=0.001, morph_radius_512=3.0, feather_sigma_512=2.0, min_coverage=0.05)
    with pytest.raises(ValueError, match="all zero"):
        run(comfy, "BiErasingMaskFilter", images=imgs, masks=torch.zeros(2, 64, 64), concept="cat", caption="",
            threshold=0.4, min_component=0.001, morph_radius_512=3.0, feather_sigma_512=2.0, min_coverage=0.05)
    with pytest.raises(ValueError, match="steps must be in"):
        run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, concept="cat", safe_concept="dog",
            method="esd-x", steps=0)
    with pytest.raises(ValueError, match="CLIP_VISION"):
        run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, concept="cat", safe_concept="dog",
            method="bi-erasing")
    with pytest.raises(ValueError, match="is not in ComfyUI's models/ipadapter"):
        run(comfy, "BiErasingImageAdapterLoader", adapter_name="missing.safetensors", scale=1.0)
    with pytest.raises(ValueError, match="leave|outside"):
        run(comfy, "BiErasingSaveErasure", lora={"lora_unet_x.alpha": torch.tensor(1.0)}, filename="../../evil")


def test_erase_inputs_are_checked_when_queued(comfy):
    """ComfyUI's own prompt validation calls Erase's validate_inputs: a Bi-Erasing prompt without a safe
    concept is rejected before any node (model loading included) runs."""
    import asyncio

    import execution

    def prompt(safe, method="bi-erasing"):
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
                "2": {"class_type": "BiErasingErase", "inputs": {
                    "model": ["1", 0], "clip": ["1", 1], "concept": "nudity", "safe_concept": safe,
                    "method": method, **{p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs
                                         if p.default is not None and p.name not in ("concept", "safe_concept", "method")}}},
                "3": {"class_type": "BiErasingSaveErasure", "inputs": {"lora": ["2", 1], "filename": "x"}}}

    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("p1", prompt(""), None))[:4]
    assert not valid
    messages = json.dumps(node_errors)
    assert "bi-erasing pulls 'nudity' toward a safe alternative: fill safe_concept" in messages
    assert asyncio.run(execution.validate_prompt("p2", prompt("", "esd-x"), None))[0]
    assert asyncio.run(execution.validate_prompt("p3", prompt("clothed"), None))[0]


def test_cancel_stops_the_erasure_and_leaves_the_model_clean(comfy):
    import comfy.model_management as mm

    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method="esd-x", steps=50, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64)
    unet = comfy.model.model.diffusion_model
    before = {n for n, _ in unet.named_modules()}
    mm.interrupt_current_processing(True)  # what the UI's Cancel button does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, **settings)
    finally:
        mm.interrupt_current_processing(False)
    assert {n for n, _ in unet.named_modules()} == before  # no adapter left attached
    assert not any("forward" in vars(m) for m in unet.modules())  # no image channel left installed


def test_attack_node_conditioning_feeds_a_ksampler(comfy):
    (imgs,) = run(comfy, "BiErasingGenerateExemplars", model=comfy.model, clip=comfy.clip, vae=comfy.vae,
                  prompt="a photo of a cat", negative="", count=2, seed=0, steps=2, cfg=5.0, resolution=64)
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingAttack"].inputs if p.default is not None}
    settings.update(prompt="a photo of a cat", steps=4, batch_size=2)
    cond, start, report = run(comfy, "BiErasingAttack", model=comfy.model, clip=comfy.clip, vae=comfy.vae,
                              concept_images=imgs, **settings)
    info = json.loads(report)
    assert info["steps_done"] == 4 and 0 < info["relative_size"] <= settings["budget"] + 1e-5
    with torch.inference_mode():
        plain = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "a photo of a cat")[0]
    torch.testing.assert_close(start[0][0], plain[0][0])   # the start is exactly the prompt's conditioning
    assert cond[0][0].shape == plain[0][0].shape and not torch.equal(cond[0][0], plain[0][0])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        neg_c = comfy.nodes.CLIPTextEncode().encode(comfy.clip, "")[0]
        a = comfy.nodes.common_ksampler(comfy.model, 7, 2, 5.0, "euler", "normal", cond, neg_c, latent)[0]["samples"]
        b = comfy.nodes.common_ksampler(comfy.model, 7, 2, 5.0, "euler", "normal", start, neg_c, latent)[0]["samples"]
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_adversarial_erase_runs_in_comfyui(comfy):
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method="esd-x", steps=3, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64, adversarial=1.0, adversarial_every=2, adversarial_steps=2)
    erased, lora, curve, report = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, **settings)
    info = json.loads(report)
    assert info["adversarial_refreshes"] == 2 and info["config"]["adversarial"] == 1.0


def test_preserve_prompts_run_through_comfyui_clip(comfy):
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method="esd-x", steps=3, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64, preserve="a photo of a horse, a photo of a bird", preserve_weight=1.0)
    erased, lora, curve, report = run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, **settings)
    info = json.loads(report)
    assert info["config"]["preserve"] == "a photo of a horse, a photo of a bird"
    assert info["unet_forward_equivalents_per_sample"] == 9.0  # ESD-x alone is 5; the kept rows add 1 + 3
    assert math.isfinite(info["final_loss"])


def test_erase_sends_live_previews_through_comfyuis_progress_hook(comfy, monkeypatch):
    """The progress hook ComfyUI's server installs (main.py) receives the preview pictures: the curve
    at the first step, the curve with the original | erased samples on each sample step."""
    import comfy.utils as comfy_utils

    seen = []
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: seen.append((value, total, preview)))
    settings = {p.name: p.default for p in comfy.spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update(concept="cat", safe_concept="dog", method="esd-x", steps=4, batch_size=2, cache_size=2,
                    xt_steps=3, resolution=64, preview_every=2)
    run(comfy, "BiErasingErase", model=comfy.model, clip=comfy.clip, vae=comfy.vae, **settings)
    steps = [(v, t) for v, t, _ in seen if t == 4]
    assert steps[-4:] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    pictures = {v: p for v, t, p in seen if t == 4 and p is not None}
    assert {1, 2, 4} <= set(pictures)  # the first step (curve), and the sample steps 2 and 4
    fmt, image, max_size = pictures[2]
    assert (fmt, max_size) == ("JPEG", 768) and image.mode == "RGB"
    assert pictures[2][1].height > pictures[1][1].height  # the original | erased row under the curve
