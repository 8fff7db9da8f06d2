"""Erasures fused into a single-file checkpoint: the fused file draws as the model with its LoRAs
loaded, everything else in the file is copied as it is, and bad requests say what to change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from bierasing.cli import main
from bierasing.erase.export import merge_erasure, save_erasure
from bierasing.erase.fuse import fuse_single_file
from bierasing.single_file import build_sd1_single_file, load_sd1_single_file
from bierasing.single_file_xl import build_sdxl_single_file, load_sdxl_single_file


def _random_erasure(bb, path, seed, rank):
    """Random attn2 weights (rank 0: full deltas of to_k / to_v), a trained erasure's layout."""
    g = torch.Generator().manual_seed(seed)
    adapters = bb.attach_adapters("attn2" if rank else "attn2_kv", rank, g)
    with torch.no_grad():
        for layer in adapters.layers.values():
            t = layer.up if rank else layer.delta
            t.copy_(0.05 * torch.randn(t.shape, generator=g))
    save_erasure(path, adapters, {"method": "bi-erasing", "concepts": [{"target": f"c{seed}", "safe": ""}]})
    adapters.remove(bb.unet)
    return path


def _noise(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *bb.sample_shape, generator=g)
    with torch.no_grad():
        return bb.predict_noise(x, torch.tensor([50, 700]), bb.encode_text(["a photo of a cat", "a dog"]))


def _check_fused(bb, load, tiny, tmp_path):
    a = _random_erasure(bb, tmp_path / "a.safetensors", 1, rank=2)
    b = _random_erasure(bb, tmp_path / "b.safetensors", 2, rank=0)
    fused = fuse_single_file(tiny["checkpoint"], [a, b], tmp_path / "fused.safetensors", [0.5, 1.0],
                             config=tiny["config"])
    assert [r["file"] for r in fused["erasures"]] == ["a.safetensors", "b.safetensors"]
    assert fused["erasures"][0]["strength"] == 0.5
    plain = _noise(bb)
    kept = {}
    merge_erasure(bb.unet, a, strength=0.5, originals=kept)  # what LoraLoader does, twice
    merge_erasure(bb.unet, b, originals=kept)
    want = _noise(bb)
    with torch.no_grad():
        for weight, saved in kept.values():
            weight.copy_(saved)
    got = _noise(load(tmp_path / "fused.safetensors", config=tiny["config"]))
    assert (want - plain).abs().max() > 1e-3  # the erasures change the prediction
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    with safe_open(str(tiny["checkpoint"]), "pt") as f0, safe_open(str(tmp_path / "fused.safetensors"), "pt") as f1:
        assert set(f0.keys()) == set(f1.keys())
        changed = [k for k in f0.keys() if not torch.equal(f0.get_tensor(k), f1.get_tensor(k))]  # noqa: SIM118
        assert json.loads(f1.metadata()["bierasing_fused"])["layers"] == len(changed)
    assert changed and all(k.startswith("model.diffusion_model.") and ".attn2.to_" in k for k in changed)
    return changed


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tiny = build_sd1_single_file(tmp_path_factory.mktemp("fuse") / "tiny.safetensors", seed=0)
    return tiny, load_sd1_single_file(tiny["checkpoint"], resolution=64, config=tiny["config"])


def test_a_fused_sd1_checkpoint_draws_as_the_model_with_its_erasures_loaded(sd1, tmp_path):
    tiny, bb = sd1
    changed = _check_fused(bb, lambda p, config: load_sd1_single_file(p, resolution=64, config=config), tiny, tmp_path)
    assert any(k.endswith("to_k.weight") for k in changed) and any(k.endswith("to_v.weight") for k in changed)


def test_a_fused_sdxl_checkpoint_draws_as_the_model_with_its_erasures_loaded(tmp_path):
    tiny = build_sdxl_single_file(tmp_path / "xl" / "tiny_sdxl.safetensors")
    bb = load_sdxl_single_file(tiny["checkpoint"], resolution=64, config=tiny["config"])
    _check_fused(bb, lambda p, config: load_sdxl_single_file(p, resolution=64, config=config), tiny, tmp_path)


def test_fuse_refuses_what_it_cannot_do_with_a_reason(sd1, tmp_path, world):
    tiny, bb = sd1
    a = _random_erasure(bb, tmp_path / "a.safetensors", 1, rank=2)
    with pytest.raises(ValueError, match="new file"):
        fuse_single_file(tiny["checkpoint"], [a], tiny["checkpoint"], config=tiny["config"])
    with pytest.raises(ValueError, match="one per erasure"):
        fuse_single_file(tiny["checkpoint"], [a], tmp_path / "f.safetensors", [1.0, 0.5], config=tiny["config"])
    other = _random_erasure(world, tmp_path / "world.safetensors", 3, rank=2)  # made for another UNet
    with pytest.raises(ValueError, match="not in this checkpoint's UNet|fuse erasures made for this model"):
        fuse_single_file(tiny["checkpoint"], [other], tmp_path / "f.safetensors", config=tiny["config"])
    with pytest.raises(ValueError, match="pickle"):
        fuse_single_file(tmp_path / "model.ckpt", [a], tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()


def test_cli_fuse_writes_the_checkpoint_and_says_what_went_in(sd1, tmp_path, capsys):
    tiny, bb = sd1
    a = _random_erasure(bb, tmp_path / "a.safetensors", 1, rank=2)
    out = tmp_path / "cli_fused.safetensors"
    assert main(["fuse", "--model", str(tiny["checkpoint"]), "--model-config", str(tiny["config"]),
                 "--erasure", str(a), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["output"] == str(out) and out.is_file() and printed["layers"] > 0
