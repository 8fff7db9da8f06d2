"""Clone, patch, never mutate (real ComfyUI; skipped with the reason when it is absent).

The Erase node trains on a clone of the incoming MODEL with ComfyUI's own mechanisms (weight
wrappers, attn2 replace patches); whatever happens - a normal return, Cancel, an exception in the
middle of a step - the input MODEL predicts bit-identically afterwards, carries nothing of ours, and
keeps another pack's patch. Run on the plain fp32 UNet and on weights ComfyUI casts in every forward
(fp8 storage: the manual-cast path that offloading and Dynamic VRAM also take), and in bf16.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from comfy_support import build_standins, comfy_available, load_comfy, pack

WHY = comfy_available()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(WHY is not None, reason=WHY or "")]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(2)
    nodes = load_comfy()
    root = tmp_path_factory.mktemp("comfy_patch")
    build_standins(root)
    return nodes, root, pack("nodes.spec")


def _load(nodes, dtype_name):
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path("checkpoints", "tiny_sd15.safetensors")
    opts = {} if DTYPES[dtype_name] is None else {"dtype": DTYPES[dtype_name]}
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, model_options=opts)[:3]
    return model, clip


def _scaled_attn2_output(n, extra_options):  # what another pack's patch might do
    return n * 1.5


def _fingerprint(model, clip) -> dict:
    """The model's prediction on a fixed input and everything that could carry a leftover patch."""
    import comfy.model_management as mm

    unet = model.model.diffusion_model
    with torch.inference_mode():
        mm.load_models_gpu([model])
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        pred = model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=cond,
                                       transformer_options=model.model_options["transformer_options"]).float()
    to = model.model_options["transformer_options"]
    return {"pred": pred.clone(),
            "modules": sorted(n for n, _ in unet.named_modules()),
            "instance_forwards": sum("forward" in vars(m) for m in unet.modules()),
            "weight_wrappers": sorted(model.weight_wrapper_patches),
            "patches": sorted(model.patches),
            "transformer_options": repr(sorted((k, repr(v)) for k, v in to.items())),
            "requires_grad": sum(p.requires_grad for p in unet.parameters() if not p.is_inference())}


def _erase(nodes, spec, model, clip, **extra):
    settings = {p.name: p.default for p in spec.BY_ID["BiErasingErase"].inputs if p.default is not None}
    settings.update({"concept": "cat", "safe_concept": "dog", "method": "esd-x", "steps": 3, "batch_size": 2,
                     "cache_size": 2, "xt_steps": 3, "resolution": 64, **extra})
    with torch.inference_mode():
        out = nodes.NODE_CLASS_MAPPINGS["BiErasingErase"].execute(model=model, clip=clip, **settings)
    return out.args if hasattr(out, "args") else out


def _assert_untouched(before, after):
    assert torch.equal(before["pred"], after["pred"]), "the input MODEL predicts differently"
    for k in before:
        if k != "pred":
            assert before[k] == after[k], k


@pytest.mark.parametrize("dtype_name", ["fp32", "fp8", "bf16", "fp16"])
def test_erase_leaves_the_input_model_untouched_and_keeps_another_packs_patch(env, dtype_name, caplog):
    import comfy.model_management as mm

    nodes, root, spec = env
    base, clip = _load(nodes, dtype_name)
    model = base.clone()
    model.set_model_attn2_output_patch(_scaled_attn2_output)  # another pack's patch on the input
    assert not torch.equal(_fingerprint(model, clip)["pred"], _fingerprint(base, clip)["pred"])
    before = _fingerprint(model, clip)

    erased, lora, curve, report = _erase(nodes, spec, model, clip)  # a normal return
    info = json.loads(report)
    assert info["config"]["steps"] == 3 and torch.isfinite(torch.tensor(info["final_loss"]))
    _assert_untouched(before, _fingerprint(model, clip))
    assert _scaled_attn2_output in model.model_options["transformer_options"]["patches"]["attn2_output_patch"]

    mm.interrupt_current_processing(True)  # Cancel
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _erase(nodes, spec, model, clip, steps=50)
    finally:
        mm.interrupt_current_processing(False)
    _assert_untouched(before, _fingerprint(model, clip))

    from bierasing.erase.engine import Eraser

    real = Eraser.training_step
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a failure in the middle of a step")
        return real(self)

    Eraser.training_step = failing
    try:
        with pytest.raises(RuntimeError, match="middle of a step"):
            _erase(nodes, spec, model, clip)
    finally:
        Eraser.training_step = real
    _assert_untouched(before, _fingerprint(model, clip))

    # the erasure itself: saved, applied by the stock LoraLoader with every key, sampled
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        saved = nodes.NODE_CLASS_MAPPINGS["BiErasingSaveErasure"].execute(
            lora=lora, filename=f"erasures/patch_{dtype_name}", report=report)
        name = (saved.args if hasattr(saved, "args") else saved)[0]
        m2, _ = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
        pos = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        outs = [nodes.common_ksampler(m, 7, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
                for m in (model, erased, m2)]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[2])  # the erasure changes the samples
    _assert_untouched(before, _fingerprint(model, clip))
