"""Erasures one after another: stacked files, a model that carries earlier erasures."""

import pytest
import torch

from bierasing.erase import EraseConfig
from bierasing.erase.export import load_erasure, merge_erasure, read_erasure, save_erasure
from bierasing.erase.job import ConceptSpec, ExemplarSpec, run_erase_job
from bierasing.erase.stack import _delta, _layers, carrying, stack_erasures, stack_tensors

ATTN2 = "attn2"


def _random_erasure(bb, path, seed, rank, alpha=None):
    """A LoRA on attn2 with random up and down (a trained erasure's shape, made in no time)."""
    g = torch.Generator().manual_seed(seed)
    adapters = bb.attach_adapters(ATTN2, rank, g)
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.up.copy_(0.05 * torch.randn(layer.up.shape, generator=g))
            if alpha is not None:
                layer.alpha = float(alpha)
    save_erasure(path, adapters, {"method": "bi-erasing", "concepts": [{"target": f"c{seed}", "safe": ""}]})
    adapters.remove(bb.unet)
    return path


def _weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_a_stack_is_the_sum_of_its_erasures_for_linear_conv_and_full_deltas():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a = {"lora_unet_lin.lora_down.weight": r(2, 6), "lora_unet_lin.lora_up.weight": r(5, 2),
         "lora_unet_lin.alpha": torch.tensor(1.0),
         "lora_unet_conv.lora_down.weight": r(3, 4, 3, 3), "lora_unet_conv.lora_up.weight": r(8, 3, 1, 1)}
    b = {"lora_unet_lin.lora_down.weight": r(4, 6), "lora_unet_lin.lora_up.weight": r(5, 4),
         "lora_unet_lin.alpha": torch.tensor(4.0), "lora_unet_conv.diff": r(8, 4, 3, 3),
         "lora_unet_only_b.lora_down.weight": r(2, 3), "lora_unet_only_b.lora_up.weight": r(3, 2),
         "lora_unet_only_b.alpha": torch.tensor(2.0)}
    s = _layers(stack_tensors([a, b]))
    la, lb = _layers(a), _layers(b)
    assert s["lora_unet_lin"][".lora_down.weight"].shape == (6, 6)  # ranks 2 + 4
    assert torch.allclose(_delta(s["lora_unet_lin"]), _delta(la["lora_unet_lin"]) + _delta(lb["lora_unet_lin"]),
                          atol=1e-5)
    assert set(s["lora_unet_conv"]) == {".diff"}  # a full delta anywhere: the layer's sum as one diff
    assert torch.allclose(s["lora_unet_conv"][".diff"], _delta(la["lora_unet_conv"]) + lb["lora_unet_conv"][".diff"],
                          atol=1e-5)
    assert torch.allclose(_delta(s["lora_unet_only_b"]), _delta(lb["lora_unet_only_b"]), atol=1e-6)
    assert _delta(la["lora_unet_lin"]).abs().max() > 0.1  # the check compares real, non-zero deltas
    half = _layers(stack_tensors([a, b], scales=[0.5, 1.0]))  # a LoRA loaded at strength 0.5, then b
    assert torch.allclose(_delta(half["lora_unet_lin"]),
                          0.5 * _delta(la["lora_unet_lin"]) + _delta(lb["lora_unet_lin"]), atol=1e-5)


def test_a_stacked_file_loads_as_both_erasures_one_after_the_other(tiny_world, tmp_path):
    unet = tiny_world.unet
    a = _random_erasure(tiny_world, tmp_path / "a.safetensors", 1, rank=2, alpha=1.0)
    b = _random_erasure(tiny_world, tmp_path / "b.safetensors", 2, rank=4)
    ab = stack_erasures(tmp_path / "ab.safetensors", [a, b])
    original = _weights(unet)
    x = torch.randn(2, *tiny_world.sample_shape, generator=torch.Generator().manual_seed(3))
    t, c = torch.tensor([500, 100]), tiny_world.encode_text(["a red circle", "a blue star"])
    with torch.no_grad():
        plain = tiny_world.predict_noise(x, t, c)
        with carrying(unet, [a, b]):
            both = tiny_world.predict_noise(x, t, c)
        assert all(torch.equal(original[k], v) for k, v in unet.state_dict().items())  # restored exactly
        adapters, info = load_erasure(unet, ab)
        stacked = tiny_world.predict_noise(x, t, c)
        adapters.remove(unet)
    assert (both - plain).abs().max() > 1e-3
    assert torch.allclose(stacked, both, atol=1e-5)
    assert [r["file"] for r in info["stack"]] == ["a.safetensors", "b.safetensors"]
    assert [c["target"] for c in info["concepts"]] == ["c1", "c2"]
    # a stack stacked again keeps a flat record, in order
    c3 = _random_erasure(tiny_world, tmp_path / "c.safetensors", 3, rank=2)
    _, info = read_erasure(stack_erasures(tmp_path / "abc.safetensors", [ab, c3]))
    assert [r["file"] for r in info["stack"]] == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_carrying_restores_the_weights_when_the_work_fails(tiny_world, tmp_path):
    a = _random_erasure(tiny_world, tmp_path / "a.safetensors", 1, rank=2)
    original = _weights(tiny_world.unet)
    with pytest.raises(RuntimeError):
        with carrying(tiny_world.unet, [a]):
            assert not all(torch.equal(original[k], v) for k, v in tiny_world.unet.state_dict().items())
            raise RuntimeError("interrupted")
    assert all(torch.equal(original[k], v) for k, v in tiny_world.unet.state_dict().items())


def test_an_erasure_job_on_an_erased_model_trains_on_it_and_saves_both(tiny_world, tmp_path):
    a = _random_erasure(tiny_world, tmp_path / "a.safetensors", 1, rank=2)
    original = _weights(tiny_world.unet)
    cfg = EraseConfig(steps=3, batch_size=2, cache_size=4, xt_steps=5, preserve="", contexts=0, adversarial=0.0)
    spec = ConceptSpec("red", "green", ExemplarSpec("generate", 2, auto_mask="none"),
                       ExemplarSpec("generate", 2, auto_mask="none"))
    report = run_erase_job(tiny_world, [spec], cfg, tmp_path / "out", name="b", eval_samples=0, progress=False,
                           on=[a])
    assert all(torch.equal(original[k], v) for k, v in tiny_world.unet.state_dict().items())  # left as given
    tensors, info = read_erasure(report["output"])
    a_tensors, _ = read_erasure(a)
    key = next(k for k in a_tensors if k.endswith(".lora_down.weight"))
    assert tensors[key].shape[0] == a_tensors[key].shape[0] + cfg.rank  # A's rank + the new erasure's
    assert [r.get("file") for r in info["stack"]] == ["a.safetensors", "(this run)"]
    assert info["stack"][1]["concepts"][0]["target"] == "something red"
    assert report["on"] == ["a.safetensors"]
    assert "carrying a.safetensors" in (tmp_path / "out" / "report.md").read_text()


def test_an_erasure_job_refuses_to_overwrite_what_it_builds_on(tiny_world, tmp_path):
    a = _random_erasure(tiny_world, tmp_path / "erasure.safetensors", 1, rank=2)
    with pytest.raises(ValueError, match="both an erasure to build on and this run's output"):
        run_erase_job(tiny_world, [ConceptSpec("red", "green")], EraseConfig(steps=1), tmp_path, on=[a])
    with pytest.raises(ValueError, match="does not exist"):
        run_erase_job(tiny_world, [ConceptSpec("red", "green")], EraseConfig(steps=1), tmp_path / "o",
                      on=[tmp_path / "missing.safetensors"])


def test_merging_records_each_weight_once_before_its_first_change(tiny_world, tmp_path):
    unet = tiny_world.unet
    a = _random_erasure(tiny_world, tmp_path / "a.safetensors", 1, rank=2)
    original = _weights(unet)
    kept = {}
    merge_erasure(unet, a, originals=kept)
    merge_erasure(unet, a, originals=kept)
    assert kept and all(torch.equal(w, original[f"{name}.weight"]) for name, (_, w) in kept.items())
    with torch.no_grad():
        for weight, w in kept.values():
            weight.copy_(w)
