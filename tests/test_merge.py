"""Per-concept erasures merged into one: key/value edits fused (merge_kv) or summed, and the CLI."""

import json

import pytest
import torch

from bierasing.cli import main as cli_main
from bierasing.erase.export import _module_index, read_erasure, save_erasure
from bierasing.erase.merge import merge_kv
from bierasing.erase.stack import _delta, _layers
from bierasing.erase.uce import subject_tokens


def _erasure(bb, path, seed, target, preserve=""):
    """A random attn2 LoRA that names ``target`` as its concept (a trained erasure's shape)."""
    g = torch.Generator().manual_seed(seed)
    adapters = bb.attach_adapters("attn2", 2, g)
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.up.copy_(0.05 * torch.randn(layer.up.shape, generator=g))
    save_erasure(path, adapters, {"method": "bi-erasing", "concepts": [{"target": target, "safe": ""}],
                                  "config": {"preserve": preserve}})
    adapters.remove(bb.unet)
    return path


def test_merge_kv_gives_each_concept_its_own_erasure_and_sums_the_rest(tiny_world, tmp_path):
    a = _erasure(tiny_world, tmp_path / "a.safetensors", 1, "a circle", preserve="a star")
    b = _erasure(tiny_world, tmp_path / "b.safetensors", 2, "something red", preserve="a star, something red")
    tensors, info = merge_kv(tiny_world, [a, b], lam=1e-4)
    merged = _layers(tensors)
    parts = [_layers(read_erasure(p)[0]) for p in (a, b)]
    rows = [subject_tokens(tiny_world, [t])[0] for t in ("a circle", "something red")]
    star = subject_tokens(tiny_world, ["a star"])[0]
    index = _module_index(tiny_world.unet)
    kv = [k for k in merged if k.endswith(("attn2_to_k", "attn2_to_v"))]
    assert kv and all(".diff" in merged[k] for k in kv)
    for key in kv:
        name = index[key]
        w0 = tiny_world.unet.get_submodule(name).weight.detach().double()
        w = w0 + merged[key][".diff"].double()
        for e, p in zip(rows, parts):  # each concept's tokens: what its own erasure alone gives them
            want = e.double() @ (w0 + _delta(p[key]).double()).T
            assert ((e.double() @ w.T - want).norm() / want.norm()) < 0.02, name
        # the preserved word ("something red" is erased by b, so only "a star" is held)
        assert ((star.double() @ (w - w0).T).norm() / (star.double() @ w0.T).norm()) < 0.02
    assert info["preserve"] == ["a star"] and info["method"] == "merge-kv"
    q = next(k for k in merged if k.endswith("attn2_to_q"))  # a layer that does not read the text: the sum
    assert torch.allclose(_delta(merged[q]), _delta(parts[0][q]) + _delta(parts[1][q]), atol=1e-6)


def test_merge_kv_can_average_or_leave_out_the_other_layers(tiny_world, tmp_path):
    a = _erasure(tiny_world, tmp_path / "a.safetensors", 1, "a circle")
    b = _erasure(tiny_world, tmp_path / "b.safetensors", 2, "a star")
    parts = [_layers(read_erasure(p)[0]) for p in (a, b)]
    summed, _ = merge_kv(tiny_world, [a, b])
    mean, info = merge_kv(tiny_world, [a, b], others="mean")
    only, _ = merge_kv(tiny_world, [a, b], others="drop")
    q = next(k for k in _layers(mean) if k.endswith("attn2_to_q"))
    assert torch.allclose(_delta(_layers(mean)[q]), (_delta(parts[0][q]) + _delta(parts[1][q])) / 2, atol=1e-6)
    assert info["other_layers"] == "mean"
    kv = {k for k in _layers(summed) if k.endswith(("attn2_to_k", "attn2_to_v"))}
    assert set(_layers(only)) == kv and all(torch.equal(only[k + ".diff"], summed[k + ".diff"]) for k in kv)
    with pytest.raises(ValueError, match="others must be one of"):
        merge_kv(tiny_world, [a, b], others="max")


def test_merge_refuses_files_without_concepts_and_single_inputs(tiny_world, tmp_path):
    a = _erasure(tiny_world, tmp_path / "a.safetensors", 1, "a circle")
    with pytest.raises(ValueError, match="at least two"):
        merge_kv(tiny_world, [a])
    tensors, _ = read_erasure(a)
    with pytest.raises(ValueError, match="name its concepts"):
        merge_kv(tiny_world, [a, (tensors, {"method": "unknown"})])


def test_cli_merge_writes_one_loadable_file(tiny_world, tmp_path, capsys):
    a = _erasure(tiny_world, tmp_path / "a.safetensors", 1, "a circle")
    b = _erasure(tiny_world, tmp_path / "b.safetensors", 2, "a star")
    out = tmp_path / "ab.safetensors"
    assert cli_main(["merge", "--erasure", f"{a},{b}", "--out", str(out), "--how", "sum", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tensors, info = read_erasure(out)
    assert summary["how"] == "sum" and [r["concepts"][0]["target"] for r in info["stack"]] == ["a circle", "a star"]
    assert tensors[next(k for k in tensors if k.endswith(".lora_down.weight"))].dtype == torch.float32  # auto
    assert cli_main(["merge", "--erasure", f"{a},{out}", "--out", str(out), "--how", "sum"]) == 2
    assert "both an erasure to merge and the output" in capsys.readouterr().err
