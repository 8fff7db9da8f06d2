"""bi-instant: the closed-form bidirectional edit, its job and node paths, and the warm start."""

import pytest
import torch

from bierasing.erase import Concept, EraseConfig
from bierasing.erase.export import read_erasure
from bierasing.erase.instant import guide_tokens, instant_config, instant_erasure
from bierasing.erase.job import ConceptSpec, ExemplarSpec, run_erase_job
from bierasing.erase.uce import subject_tokens


def _weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_guide_tokens_mix_the_branches_targets():
    c_neg, c_pos, c0 = torch.full((2, 3), 1.0), torch.full((2, 3), 3.0), torch.zeros(2, 3)
    cfg = EraseConfig(method="bi-instant", neg_weight=0.6, pos_weight=0.4)
    # anchor a = 0.5: c_a = 1.5; negative (1 + 1) 1.5 - 1 = 2; with the positive branch 0.6 * 2 + 0.4 * 3
    assert torch.allclose(guide_tokens(c_neg, c_pos, c0, cfg, 0.5, eta=1.0), torch.full((2, 3), 2.4))
    # eta 0 (the default): the negative branch targets its anchor, 0.6 * 1.5 + 0.4 * 3
    assert torch.allclose(guide_tokens(c_neg, c_pos, c0, cfg, 0.5), torch.full((2, 3), 2.1))
    cfg = EraseConfig(method="bi-instant", pos_weight=0.0)  # the anchor alone
    assert torch.allclose(guide_tokens(c_neg, c_pos, c0, cfg, 1.0), c_pos)
    assert torch.allclose(guide_tokens(c_neg, None, c0, cfg, 0.5), c0)  # no safe concept: the empty prompt


def test_the_edit_moves_the_concept_tokens_to_the_target_and_holds_the_preserve_set(tiny_world):
    before = _weights(tiny_world.unet)
    cfg = EraseConfig(method="bi-instant", preserve="a star, a cross", contexts=0)
    res = instant_erasure(tiny_world, [Concept("a circle", "a square")], cfg, lam=1e-4)
    try:
        e = subject_tokens(tiny_world, ["a circle"])[0]
        s = subject_tokens(tiny_world, ["a square"])[0]
        c0 = tiny_world.encode_text([""])[0][tiny_world.content_token_count("a circle"):]
        n = min(len(e), len(s))
        g = guide_tokens(e[:n], s[:n], c0[:n], res.config, 0.5)
        p = subject_tokens(tiny_world, ["a star"])[0]
        for name, layer in res.adapters.layers.items():
            w0 = before[name + ".weight"]
            w = w0 + layer.delta
            moved = (e[:n] @ w.T - g @ w0.T).norm() / (e[:n] @ w0.T - g @ w0.T).norm()
            held = (p @ w.T - p @ w0.T).norm() / (p @ w0.T).norm()
            assert moved < 0.1 and held < 0.05, (name, float(moved), float(held))
    finally:
        res.adapters.remove(tiny_world.unet)
    assert res.seconds < 10 and res.config.neg_anchor == 0.5
    assert all(torch.equal(before[k], v) for k, v in tiny_world.unet.state_dict().items())


def test_instant_refuses_what_it_cannot_do(tiny_world, tiny_flow_world):
    from bierasing.erase.engine import Eraser

    with pytest.raises(ValueError, match="closed-form edit, not trained"):
        Eraser(tiny_world, [Concept("a circle", "a square")], EraseConfig(method="bi-instant"))
    with pytest.raises(ValueError, match="warm_start"):
        EraseConfig(method="bi-instant", warm_start=True)
    with pytest.raises(ValueError, match="not 'bi-erasing'"):
        instant_erasure(tiny_world, [Concept("a circle", "a square")], EraseConfig())
    with pytest.raises(ValueError, match="both erased and preserved"):
        instant_erasure(tiny_world, [Concept("a circle", "a square")],
                        EraseConfig(method="bi-instant", preserve="a circle", contexts=0))
    with pytest.raises(ValueError, match="use bi-erasing"):  # a transformer's joint attention
        instant_erasure(tiny_flow_world, [Concept("a circle", "a square")],
                        EraseConfig(method="bi-instant", preserve="", contexts=0))


def test_instant_config_keeps_the_shared_settings_of_a_trained_run():
    cfg = instant_config(EraseConfig(preserve="a star", preserve_weight=2.0, contexts=0, neg_anchor=0.8, steps=50))
    assert (cfg.method, cfg.preserve, cfg.preserve_weight, cfg.contexts, cfg.neg_anchor) == \
        ("bi-instant", "a star", 2.0, 0, 0.8)
    assert instant_config(EraseConfig()).neg_anchor == 0.5  # a measured (auto) anchor: the instant edit's own


def test_the_job_runs_the_instant_edit_and_writes_a_loadable_file(tiny_world, tmp_path):
    before = _weights(tiny_world.unet)
    report = run_erase_job(tiny_world, [ConceptSpec("red", "green")],
                           EraseConfig(method="bi-instant", preserve="something blue", contexts=0),
                           tmp_path, eval_samples=0, progress=False)
    tensors, info = read_erasure(report["output"])
    assert tensors and all(k.endswith(".diff") and ("attn2_to_k" in k or "attn2_to_v" in k) for k in tensors)
    assert info["method"] == "bi-instant" and report["loss_first"] is None
    assert "closed form" in (tmp_path / "report.md").read_text()
    assert all(torch.equal(before[k], v) for k, v in tiny_world.unet.state_dict().items())


def test_a_warm_started_job_trains_on_the_edit_and_saves_both(tiny_world, tmp_path):
    before = _weights(tiny_world.unet)
    cfg = EraseConfig(steps=2, batch_size=2, cache_size=4, xt_steps=5, preserve="something blue", contexts=0,
                      adversarial=0.0, warm_start=True)
    spec = ConceptSpec("red", "green", ExemplarSpec("generate", 2, auto_mask="none"),
                       ExemplarSpec("generate", 2, auto_mask="none"))
    report = run_erase_job(tiny_world, [spec], cfg, tmp_path, eval_samples=0, progress=False)
    tensors, info = read_erasure(report["output"])
    assert [r["method"] for r in info["stack"]] == ["bi-instant", "bi-erasing"]
    assert any(k.endswith("attn2_to_k.diff") for k in tensors)  # the edit and the LoRA on k/v summed
    assert any(k.endswith("attn2_to_q.lora_down.weight") for k in tensors)  # the LoRA alone on q
    assert report["on"] == ["the bi-instant edit"]
    assert all(torch.equal(before[k], v) for k, v in tiny_world.unet.state_dict().items())
