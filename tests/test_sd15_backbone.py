"""The SD1.x backbone on an architecture-true stand-in (same classes and interface, few channels)."""

import pytest
import torch

from bierasing.erase import Concept, EraseConfig, erase
from bierasing.erase.export import read_erasure
from bierasing.sampling import sample
from bierasing.sd15 import SD15Backbone
from bierasing.standins import build_sd15_folder


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    paths = build_sd15_folder(tmp_path_factory.mktemp("sd15"), "tiny")
    bb = SD15Backbone.from_pretrained(paths["model"], ip_adapter=paths["ip_adapter"],
                                      image_encoder=paths["image_encoder"], resolution=32)
    return bb, paths


def test_sd15_interface_shapes(sd15):
    bb, _ = sd15
    assert bb.sample_shape == (4, 16, 16)
    with torch.no_grad():
        text = bb.encode_text(["a photo of nudity", ""])
        assert text.shape == (2, 77, 768)
        tokens = bb.encode_images(torch.rand(2, 3, 48, 40))
        assert tokens.shape == (2, 4, 768)
        x0 = bb.to_x(torch.rand(2, 3, 32, 32))
        assert x0.shape == (2, 4, 16, 16)
        eps = bb.predict_noise(x0, torch.tensor([10, 900]), text, tokens)
        assert eps.shape == x0.shape and torch.isfinite(eps).all()
    assert len(bb.attn2_modules()) == 4  # down 1 + mid 1 + up 2
    img = sample(bb, ["a cat"], [0], steps=2)
    assert img.shape == (1, 3, 32, 32)


def test_erasure_on_sd15_writes_comfyui_lora_keys(sd15, tmp_path):
    bb, _ = sd15
    imgs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = erase(bb, [Concept("nudity", "clothed", imgs, imgs)],
              EraseConfig(steps=2, batch_size=1, xt_source="noised"))
    path = r.save(tmp_path / "nudity.safetensors")
    r.adapters.remove(bb.unet)
    tensors, info = read_erasure(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    assert [(c["target"], c["safe"]) for c in info["concepts"]][:2] == [("nudity", "clothed"),
                                                                         ("a photo of nudity", "a photo of clothed")]


def test_sd15_loader_errors(tmp_path, sd15):
    _, paths = sd15
    with pytest.raises(FileNotFoundError, match="not a diffusers SD1.x folder"):
        SD15Backbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="give both ip_adapter and image_encoder"):
        SD15Backbone.from_pretrained(paths["model"], ip_adapter=paths["ip_adapter"])
    pt = tmp_path / "ip-adapter_sd15.bin"
    pt.write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle-format"):
        SD15Backbone.from_pretrained(paths["model"], ip_adapter=pt, image_encoder=paths["image_encoder"])
