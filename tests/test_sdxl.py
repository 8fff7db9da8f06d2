"""SDXL in the library (diffusers): the backbone packs bigG's pooled embedding with the 2048-d (here
64-d) context and feeds SDXL's added conditions; ``bierasing erase`` erases from an SDXL folder with and
without the IP-Adapter SDXL image branch; the LoRA loads in ``StableDiffusionXLPipeline`` with no missing
or unexpected keys and its UNet computes what bierasing's adapters compute. Tiny random stand-in."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_real_models import _run

from bierasing.loading import model_kind
from bierasing.backbone import pack_pooled, unpack_pooled
from bierasing.sdxl import SDXLBackbone, size_ids
from bierasing.standins import build_sdxl_folder, sdxl_unet_config


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def bb(standin):
    return SDXLBackbone.from_pretrained(standin["model"], standin["ip_adapter"], standin["image_encoder"],
                                        resolution=64)


def test_pooled_rides_as_a_last_token():
    ctx, pooled = torch.randn(3, 77, 16), torch.randn(3, 10)
    packed = pack_pooled(ctx, pooled)
    assert packed.shape == (3, 78, 16) and torch.equal(packed[:, -1, 10:], torch.zeros(3, 6))
    c, p = unpack_pooled(packed, 10)
    assert torch.equal(c, ctx) and torch.equal(p, pooled)
    with pytest.raises(ValueError, match="pooled width 20 exceeds"):
        pack_pooled(ctx, torch.randn(3, 20))


def test_text_is_both_encoders_penultimate_states_and_bigGs_pooled(bb):
    text = bb.encode_text(["a photo of a cat", ""])
    assert text.shape == (2, 78, 64)
    ids = [t(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in bb.tokenizers]
    with torch.no_grad():
        l_out = bb.text_encoders[0](ids[0], output_hidden_states=True)
        g_out = bb.text_encoders[1](ids[1], output_hidden_states=True)
    torch.testing.assert_close(text[0, :77, :32], l_out.hidden_states[-2][0])
    torch.testing.assert_close(text[0, :77, 32:], g_out.hidden_states[-2][0])
    torch.testing.assert_close(text[0, 77, :32], g_out.text_embeds[0])


def test_model_output_is_the_unet_with_sdxls_added_conditions(bb):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    text = bb.encode_text(["a cat", "a dog"])
    with torch.no_grad():
        ours = bb.model_output(x, t, text)
        ref = bb.unet(x, t, encoder_hidden_states=text[:, :77], added_cond_kwargs={
            "text_embeds": text[:, 77, :32], "time_ids": size_ids(64, 64).expand(2, -1)}).sample
        other_size = bb.unet(x, t, encoder_hidden_states=text[:, :77], added_cond_kwargs={
            "text_embeds": text[:, 77, :32], "time_ids": size_ids(1024, 1024).expand(2, -1)}).sample
        image = bb.model_output(x, t, text, bb.encode_images(torch.rand(2, 3, 64, 64, generator=g)))
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, other_size)  # the size conditions reach the UNet
    assert (image - ours).abs().mean() > 1e-4  # the IP-Adapter SDXL channel is active


def test_model_kind_knows_sdxl_and_refuses_the_refiner(standin, tmp_path):
    assert model_kind(standin["model"]) == "sdxl"
    refiner = tmp_path / "refiner" / "unet"
    refiner.mkdir(parents=True)
    (refiner / "config.json").write_text(json.dumps({**sdxl_unet_config("full"), "cross_attention_dim": 1280,
                                                     "projection_class_embeddings_input_dim": 2560}))
    with pytest.raises(ValueError, match="SDXL refiner; erase from the SDXL base model"):
        model_kind(refiner.parent)


def _erase(standin, out, *extra):
    args = ["erase", "--model", str(standin["model"]), "--concept", "a dog", "--safe", "a cat", "--steps", "2",
            "--out", str(out), "--exemplars", "2", "--eval-samples", "1", "--resolution", "64",
            "--cache-size", "2", "--batch-size", "2", "--xt-steps", "4", "--adversarial-steps", "1",
            "--threads", "2", "--json", "--device", "cpu", "--rank", "2", *extra]
    return _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")


@pytest.fixture(scope="module")
def bi_lora(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_cli") / "erase"
    r = _erase(standin, out, "--ip-adapter", str(standin["ip_adapter"]), "--image-encoder",
               str(standin["image_encoder"]))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "bi-erasing" and (out / "before_after.png").is_file()
    return out / "erasure.safetensors"


def test_cli_esd_x_on_sdxl(standin, tmp_path):
    r = _erase(standin, tmp_path / "esd", "--method", "esd-x")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "esd" / "erasure.safetensors").is_file()


def test_sdxl_lora_loads_in_diffusers_and_computes_what_bierasing_computes(standin, bi_lora):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    from diffusers import StableDiffusionXLPipeline
    from test_diffusers_lora import captured_warnings

    from bierasing.erase.export import load_erasure

    pipe = StableDiffusionXLPipeline.from_pretrained(standin["model"])
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": size_ids(64, 64).expand(2, -1)}

    def out(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    before = out(pipe.unet)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(bi_lora))
    assert [m for m in messages if "No LoRA keys associated to CLIPText" not in m] == []
    theirs = out(pipe.unet)
    assert not torch.equal(theirs, before)

    ours_bb = SDXLBackbone.from_pretrained(standin["model"], resolution=64)
    load_erasure(ours_bb.unet, bi_lora)
    torch.testing.assert_close(out(ours_bb.unet), theirs, atol=1e-5, rtol=1e-4)


def test_automatic_masks_on_sdxl(bb):
    """Masks from the model's cross-attention to a word work on SDXL as on SD1.x (the packed pooled token
    never reaches the attention: only the 77 context tokens do)."""
    from bierasing.erase.attention_mask import attention_masks

    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        m = attention_masks(bb, imgs, "a photo of a dog", "dog")
    assert m.shape == (2, 64, 64) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert float(m.std()) > 0  # a map, not a constant
    widths = {p.to_k_ip.in_features for p in bb.attention_recorders()}
    assert widths == {64} and len(bb.attention_recorders()) == len(bb.attn2_modules()) == 8  # every attn2
