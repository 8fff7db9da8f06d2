import functools

import numpy as np
import pytest
import torch

from bierasing.erase import Concept, EraseConfig, ErasureInterrupted, erase
from bierasing.erase.adapters import attach, select_modules
from bierasing.erase.config import ADVERSARIAL_AUTO, MAP_AUTO, MAP_AUTO_KEEP
from bierasing.erase.engine import Eraser
from bierasing.erase.export import load_erasure, merge_erasure, read_erasure
from bierasing.erase.objectives import (branch_weights, mse, negative_guidance_target, positive_guidance_target,
                                       timestep_weights)
from bierasing.io import load_safetensors


def _images(seed, n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _concept():
    return Concept("a circle", "a square", _images(1), _images(2))


def _cfg(**kw):
    base = dict(steps=4, batch_size=2, cache_size=4, xt_steps=5, preserve="", contexts=0)
    base.update(kw)
    return EraseConfig(**base)


def _first_step(bb, concept=None, **kw):
    """The losses of one training step (no adversarial rows); the model is left untouched."""
    e = Eraser(bb, [concept or _concept()], _cfg(adversarial=0.0, **kw))
    try:
        e.prepare()
        return e.training_step()
    finally:
        e.adapters.remove(bb.unet)


def _probe(bb):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([100, 600])
    with torch.no_grad():
        text = bb.encode_text(["a red circle", "a blue star"])
        return bb.predict_noise(x, t, text)


def test_guidance_targets_are_the_equations():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert negative_guidance_target(u, c, 2.0).tolist() == [1 - 2 * 2, 2 - 2 * -1]
    assert positive_guidance_target(u, c, 1.0).tolist() == c.tolist()
    assert branch_weights("joint", 0.9, 0.6, 0.4, 0.8) == (0.6, 0.4)
    assert branch_weights("guide-then-erase", 0.5, 0.6, 0.4, 0.8) == (0.0, 1.0)
    assert branch_weights("guide-then-erase", 0.85, 0.6, 0.4, 0.8) == (1.0, 0.0)


@pytest.mark.parametrize("trainable,rank", [("attn2", 4), ("attn2_kv", 0), ("no_attn2", 2), ("full", 0)])
def test_adapters_start_as_exact_no_ops_and_switch_off(tiny_world, trainable, rank):
    before = _probe(tiny_world)
    adapters = attach(tiny_world.unet, trainable, rank, generator=torch.Generator().manual_seed(0))
    try:
        assert torch.equal(_probe(tiny_world), before)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapters.parameters():  # random, not constant: text tokens are zero-mean after LayerNorm
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        changed = _probe(tiny_world)
        assert (changed - before).abs().max() > 1e-5
        with adapters.disabled():
            assert torch.equal(_probe(tiny_world), before)
    finally:
        adapters.remove(tiny_world.unet)
    assert torch.equal(_probe(tiny_world), before)


def test_trainable_sets_select_by_diffusers_names(tiny_world):
    kv = select_modules(tiny_world.unet, "attn2_kv")
    assert len(kv) == 8 and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    x = select_modules(tiny_world.unet, "attn2")
    assert len(x) == 16
    u = select_modules(tiny_world.unet, "no_attn2")
    assert not any("attn2" in n or n.startswith(("time_embedding", "conv_out")) for n in u)
    assert not any("processor" in n for n in select_modules(tiny_world.unet, "full"))
    with pytest.raises(ValueError, match="unknown trainable set 'xlayer'"):
        select_modules(tiny_world.unet, "xlayer")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="method must be one of"):
        EraseConfig(method="fmn")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100000\]"):
        EraseConfig(steps=0)
    with pytest.raises(ValueError, match="both 0"):
        EraseConfig(neg_weight=0, pos_weight=0)
    with pytest.raises(ValueError, match="guide-then-erase alternates"):
        EraseConfig(method="esd-x", schedule="guide-then-erase")
    esd = EraseConfig(method="esd-u")
    assert esd.trainable == "no_attn2" and esd.pos_weight == 0 and esd.neg_weight == 1.0
    with pytest.raises(ValueError, match=r"adversarial must be -1 \(auto\) or >= 0"):
        EraseConfig(adversarial=-0.5)


def test_adversarial_auto_is_on_for_bi_erasing_only_and_explicit_values_win():
    assert EraseConfig().adversarial == ADVERSARIAL_AUTO == 0.3
    for baseline in ("esd-x", "esd-u", "co-erasing"):
        assert EraseConfig(method=baseline).adversarial == 0.0
    assert EraseConfig(adversarial=0.0).adversarial == 0.0
    assert EraseConfig(method="esd-x", adversarial=1.0).adversarial == 1.0
    # the resolved value is what is recorded, so a saved config re-creates the same run
    assert EraseConfig(**EraseConfig().to_dict()) == EraseConfig()


def test_map_auto_pulls_harder_when_other_concepts_are_held():
    assert EraseConfig(preserve="").map_target_to_safe == MAP_AUTO == 0.15
    assert EraseConfig().map_target_to_safe == -1  # preserve 'auto': resolved with the model's suggestion
    assert EraseConfig(preserve="a square").map_target_to_safe == MAP_AUTO_KEEP == 0.3
    assert EraseConfig(preserve="a square", map_target_to_safe=0.0).map_target_to_safe == 0.0
    assert EraseConfig(method="esd-x", preserve="a square").map_target_to_safe == 0.0
    with pytest.raises(ValueError, match=r"map_target_to_safe must be -1 \(auto\) or >= 0"):
        EraseConfig(map_target_to_safe=-0.5)


@pytest.mark.parametrize("method,xt", [("bi-erasing", "cache"), ("esd-x", "esd"), ("co-erasing", "noised"),
                                       ("bi-erasing", "reproduce")])
def test_erasure_changes_the_model_and_same_seed_is_bit_identical(tiny_world, tmp_path, method, xt):
    before = _probe(tiny_world)
    cfg = _cfg(method=method, xt_source=xt, lr=1e-2)
    r1 = erase(tiny_world, [_concept()], cfg)
    after = _probe(tiny_world)
    r1.save(tmp_path / "a.safetensors")
    r1.adapters.remove(tiny_world.unet)
    r2 = erase(tiny_world, [_concept()], cfg)
    r2.save(tmp_path / "b.safetensors")
    r2.adapters.remove(tiny_world.unet)
    a, _ = load_safetensors(tmp_path / "a.safetensors")
    b, _ = load_safetensors(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (after - before).abs().max() > 1e-6
    assert len(r1.history) == 4 and all(np.isfinite(h["loss"]) for h in r1.history)


def test_saved_erasure_reproduces_the_erased_model(tiny_world, tmp_path):
    r = erase(tiny_world, [_concept()], _cfg(lr=1e-2, map_target_to_safe=0.5))
    erased = _probe(tiny_world)
    path = r.save(tmp_path / "e.safetensors")
    r.adapters.remove(tiny_world.unet)
    tensors, info = read_erasure(path)
    assert info["method"] == "bi-erasing" and info["concepts"] == [{"target": "a circle", "safe": "a square", "neg_anchor": 0.5}]
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert any("down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k" in k for k in tensors)
    adapters, _ = load_erasure(tiny_world.unet, path)
    assert torch.equal(_probe(tiny_world), erased)  # identical forward pass
    adapters.remove(tiny_world.unet)
    backup = {k: v.clone() for k, v in tiny_world.unet.state_dict().items()}
    merge_erasure(tiny_world.unet, path)
    torch.testing.assert_close(_probe(tiny_world), erased, atol=1e-5, rtol=1e-4)
    tiny_world.unet.load_state_dict(backup)


def test_interrupted_erasure_resumes_to_identical_tensors(tiny_world, tmp_path):
    cfg = _cfg(steps=6, lr=1e-2)
    full = erase(tiny_world, [_concept()], cfg)
    ref = {k: v.clone() for k, v in full.adapters.state_tensors().items()}
    full.adapters.remove(tiny_world.unet)

    ckpt = tmp_path / "ck.safetensors"
    eraser = Eraser(tiny_world, [_concept()], cfg, checkpoint_path=ckpt, should_stop=lambda: eraser.step == 3)
    with pytest.raises(ErasureInterrupted, match="stopped at step 3 of 6"):
        eraser.run()
    eraser.adapters.remove(tiny_world.unet)
    resumed = Eraser(tiny_world, [_concept()], cfg, checkpoint_path=ckpt).run()
    got = resumed.adapters.state_tensors()
    resumed.adapters.remove(tiny_world.unet)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_a_resumed_run_keeps_the_anchors_it_started_with(tiny_world, tmp_path):
    from bierasing import io

    cfg, ckpt = _cfg(steps=4), tmp_path / "ck.safetensors"
    eraser = Eraser(tiny_world, [_concept()], cfg, checkpoint_path=ckpt, should_stop=lambda: eraser.step == 2)
    with pytest.raises(ErasureInterrupted):
        eraser.run()
    eraser.adapters.remove(tiny_world.unet)
    tensors, meta = io.load_checkpoint(ckpt)
    assert meta["neg_anchors"] == [eraser.concepts[0].neg_anchor] and 0.5 <= meta["neg_anchors"][0] <= 1.0
    io.save_checkpoint(ckpt, tensors, {**meta, "neg_anchors": [0.8]})  # as if measured otherwise back then
    resumed = Eraser(tiny_world, [_concept()], cfg, checkpoint_path=ckpt).run()
    resumed.adapters.remove(tiny_world.unet)
    assert resumed.neg_anchors == [0.8] and resumed.info()["concepts"][0]["neg_anchor"] == 0.8


def test_nan_loss_is_reported_clearly(tiny_world):
    bad = Concept("a circle", "a square", torch.full((2, 3, 32, 32), float("nan")), _images(2))
    eraser = Eraser(tiny_world, [bad], _cfg(xt_source="cache"))
    before = _probe(tiny_world)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        eraser.run()
    assert eraser.adapters.layers == {}  # a failed run leaves the model as it was
    assert torch.equal(_probe(tiny_world), before)


def test_missing_inputs_are_reported():
    with pytest.raises(ValueError, match="concept to erase is empty"):
        Concept("  ")
    with pytest.raises(ValueError, match=r"non-empty \[N, 3, H, W\]"):
        Concept("a circle", "a square", torch.zeros(0, 3, 32, 32))


def test_bi_erasing_requires_images_and_a_safe_concept(tiny_world):
    with pytest.raises(ValueError, match="needs negative exemplar images"):
        Eraser(tiny_world, [Concept("a circle", "a square")], _cfg())
    with pytest.raises(ValueError, match="needs a safe alternative"):
        Eraser(tiny_world, [Concept("a circle", "", _images(1), _images(2))], _cfg())


def test_multi_concept_run_trains_each_concept(tiny_world):
    cs = [_concept(), Concept("something red", "something green", _images(3), _images(4))]
    r = erase(tiny_world, cs, _cfg(steps=6))
    r.adapters.remove(tiny_world.unet)
    second = r.info()["concepts"][1]
    assert (second["target"], second["safe"]) == ("something red", "something green")
    assert 0.5 <= second["neg_anchor"] <= 1.0  # measured per concept (neg_anchor auto)


def test_uce_closed_form_maps_erased_tokens_to_guide_outputs(tiny_world):
    from bierasing.erase.uce import subject_tokens, uce_edit

    before = {n: m.weight.detach().clone() for n, m in tiny_world.unet.named_modules()
              if n.endswith(("attn2.to_k", "attn2.to_v"))}
    adapters, secs = uce_edit(tiny_world, ["a circle"], ["a square"], ["a star", "a cross"], lam=1e-4)
    try:
        e = subject_tokens(tiny_world, ["a circle"])[0]
        g = subject_tokens(tiny_world, ["a square"])[0]
        p = subject_tokens(tiny_world, ["a star"])[0]
        for name, layer in adapters.layers.items():
            w0 = before[name]
            w = w0 + layer.delta
            # erased tokens now produce (nearly) what the guide tokens produced; preserved ones are kept
            err_e = (e @ w.T - g[: len(e)] @ w0.T).norm() / (g @ w0.T).norm()
            err_p = (p @ w.T - p @ w0.T).norm() / (p @ w0.T).norm()
            assert err_e < 0.05 and err_p < 0.05, (name, float(err_e), float(err_p))
    finally:
        adapters.remove(tiny_world.unet)
    assert secs < 10


def test_released_rerun_trains_every_unet_weight_with_a_second_copy(tiny_world):
    import copy

    from bierasing.erase.released import released_bi_erasing

    backup = copy.deepcopy(tiny_world.unet.state_dict())
    try:
        out = released_bi_erasing(tiny_world, _concept(), steps=2, lr=1e-3, ddim_steps=5)
        n_unet = sum(p.numel() for n, p in tiny_world.unet.named_parameters() if "processor." not in n)
        assert out["trained_parameters"] == n_unet
        changed = [k for k, v in tiny_world.unet.state_dict().items() if not torch.equal(v, backup[k])]
        assert changed and not any("processor." in k for k in changed)
    finally:
        tiny_world.unet.load_state_dict(backup)


def test_x0_weights_favour_noisy_steps_capped_with_mean_one_over_the_grid():
    a = torch.linspace(0.999, 0.01, 1000)  # alpha_bar falls with t
    grid = torch.tensor([900, 600, 300, 0])
    w = timestep_weights(a, grid, grid, cap=5.0)
    raw = (1.0 / a[grid]).clamp(max=5.0)
    assert torch.allclose(w, raw / raw.mean()) and abs(w.mean().item() - 1.0) < 1e-6
    assert w[0] > w[1] > w[2] > w[3]  # noisier t counts more
    assert raw[0] == 5.0 and 1.0 / a[900] > 5.0 and raw[1] < 5.0  # the cap binds at the noisiest step only
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert mse(pred, target).item() == pytest.approx(2.5)
    assert mse(pred, target, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)  # (2 * 1 + 0 * 4) / 2


def test_x0_loss_weighting_changes_the_step_loss_and_is_recorded(tiny_world):
    first_step = functools.partial(_first_step, tiny_world)
    uniform, x0 = first_step(loss_weighting="uniform"), first_step(loss_weighting="x0")
    assert abs(uniform["neg"] - x0["neg"]) > 1e-6 and abs(uniform["map"] - x0["map"]) > 1e-6, (uniform, x0)
    assert first_step() == x0  # auto = x0 for bi-erasing on a UNet
    assert _cfg().loss_weighting == "auto" and _cfg(method="esd-x").loss_weighting == "uniform"
    assert Eraser(tiny_world, [_concept()], _cfg(adversarial=0.0)).cfg.to_dict()["loss_weighting"] == "x0"
    with pytest.raises(ValueError, match="loss_weighting must be one of auto, uniform, x0"):
        _cfg(loss_weighting="snr")


def test_safe_anchor_moves_only_the_negative_target_and_needs_a_safe_concept(tiny_world):
    first_step = functools.partial(_first_step, tiny_world)
    empty, mid, safe = first_step(neg_anchor=0.0), first_step(neg_anchor=0.5), first_step(neg_anchor=1.0)
    assert empty["pos"] == mid["pos"] == safe["pos"] and empty["map"] == mid["map"] == safe["map"]
    assert len({round(r["neg"], 9) for r in (empty, mid, safe)}) == 3, (empty, mid, safe)
    assert first_step(neg_anchor="safe") == safe and first_step(neg_anchor="empty") == empty  # legacy names
    # auto: measured per concept for bi-erasing (0.5 for this one, test_anchor has the rule), 0 for the baselines
    assert first_step() == mid and _cfg().neg_anchor == -1.0
    assert _cfg(method="esd-x").neg_anchor == 0.0 and _cfg(method="co-erasing").neg_anchor == 0.0
    no_pos = first_step(neg_anchor=1.0, pos_weight=0.0, map_target_to_safe=0.0)  # safe rows still computed
    assert set(no_pos) == {"step", "loss", "neg"} and abs(no_pos["neg"] - safe["neg"]) < 1e-9
    with pytest.raises(ValueError, match="neg_anchor 0.5 needs a safe alternative"):
        first_step(Concept("a circle", "", _images(1), _images(2)), method="co-erasing", neg_anchor=0.5)
    with pytest.raises(ValueError, match=r"neg_anchor must be -1 \(auto\) or >= 0"):
        _cfg(neg_anchor=-0.5)
    with pytest.raises(ValueError, match="neg_anchor must be a number in"):
        _cfg(neg_anchor="halfway")


def test_anchor_share_interpolates_the_negative_target():
    from bierasing.erase.objectives import negative_guidance_target

    g = torch.Generator().manual_seed(0)
    empty, safe, concept = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    targets = [negative_guidance_target((1 - a) * empty + a * safe, concept, 1.0) for a in (0.0, 0.5, 1.0)]
    assert torch.allclose(targets[1], (targets[0] + targets[2]) / 2, atol=1e-6)
    assert torch.allclose(targets[1], empty + safe - concept, atol=1e-6)  # the concept swapped for the safe one


def test_map_text_only_drops_the_image_from_the_target_to_safe_student_row_only(tiny_world):
    first_step = functools.partial(_first_step, tiny_world)
    with_image, text_only = first_step(map_text_only=False), first_step(map_text_only=True)
    assert with_image["neg"] == text_only["neg"] and with_image["pos"] == text_only["pos"]
    assert abs(with_image["map"] - text_only["map"]) > 1e-6, (with_image, text_only)


def test_cli_boolean_settings_default_to_the_dataclass_and_can_be_turned_off():
    from bierasing.cli import _config_from_args, build_parser

    parse = lambda *a: _config_from_args(build_parser().parse_args(["erase", "--concept", "circle", *a]))  # noqa: E731
    assert parse().map_text_only is True and parse().text_uncond is False
    assert parse("--no-map-text-only").map_text_only is False
    assert parse("--text-uncond").text_uncond is True


def test_preserve_is_parsed_checked_and_reaches_the_cli():
    from bierasing.cli import _config_from_args, build_parser

    assert EraseConfig(preserve=" a square,, a star ,").preserved() == ["a square", "a star"]
    assert EraseConfig(preserve="").preserved() == []
    cfg = _config_from_args(build_parser().parse_args(["erase", "--concept", "circle", "--preserve", "a square, a star"]))
    assert cfg.preserved() == ["a square", "a star"]
    default = _config_from_args(build_parser().parse_args(["erase", "--concept", "circle"]))
    assert default.preserve == "auto" and default.contexts == -1
    assert _config_from_args(build_parser().parse_args(["erase", "--concept", "circle", "--contexts", "2"])).contexts == 2


def test_preserve_rejects_text_the_model_would_cut_off(tiny_world):
    with pytest.raises(ValueError, match="concept to preserve"):
        Eraser(tiny_world, [_concept()], _cfg(preserve="a square, " + "very " * 40 + "long"))
    with pytest.raises(ValueError, match="both erased and preserved"):
        Eraser(tiny_world, [_concept()], _cfg(preserve="a square, A circle"))


@pytest.mark.parametrize("preserve_xt", ["own", "target"])
def test_preservation_rows_hold_the_kept_prompt_to_the_frozen_prediction(tiny_world, preserve_xt):
    """Same seed, with and without the preservation loss: the kept prompt drifts less."""
    kept = "a blue star"
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([50, 300, 600, 900])
    with torch.no_grad():
        text = tiny_world.encode_text([kept] * 4)
        before = tiny_world.predict_noise(x, t, text)

    def drift(**kw):
        res = erase(tiny_world, [_concept()], _cfg(steps=12, lr=1e-2, adversarial=0.0, **kw))
        try:
            with torch.no_grad():
                return (tiny_world.predict_noise(x, t, text) - before).pow(2).mean().item(), res.history
        finally:
            res.adapters.remove(tiny_world.unet)

    free, _ = drift()
    held, history = drift(preserve=kept, preserve_weight=5.0, preserve_xt=preserve_xt)
    assert "keep" in history[0] and history[0]["keep"] == 0.0  # LoRA starts as a no-op
    assert free > 0 and held < 0.5 * free, (free, held)


@pytest.mark.parametrize("preserve_xt", ["target", "own"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_world, preserve_xt):
    """Chunks of UNet rows (gradients summed) make the same update as one call, with every row
    group on: negative, positive, target->safe, adversarial (its attack chunked too), x0 weights and
    preservation rows. Plain SGD at lr 1 so that the update is the gradient itself (Adam would
    magnify float rounding in near-zero coordinates)."""
    def one_step(micro):
        cfg = _cfg(batch_size=5, micro_batch=micro, adversarial=0.5, adversarial_steps=2,
                   preserve="a blue star, a red square", preserve_xt=preserve_xt)
        e = Eraser(tiny_world, [_concept()], cfg)
        try:
            e.prepare()
            e.opt = torch.optim.SGD(e.adapters.parameters(), lr=1.0)
            before = {k: v.clone() for k, v in e.adapters.state_tensors().items()}
            rec = e.training_step()
            grads = {k: before[k] - v for k, v in e.adapters.state_tensors().items()}
            return grads, rec, e.adv_delta[0].clone(), e.cfg
        finally:
            e.adapters.remove(tiny_world.unet)

    whole, rec_whole, adv_whole, cfg_whole = one_step(0)
    assert cfg_whole.micro_batch == 0 and {"neg", "pos", "map", "adv", "keep"} <= rec_whole.keys()
    scale = max(float(g.abs().max()) for g in whole.values())
    assert scale > 0
    for micro in (1, 7):  # 7 rows: chunks that cut across row groups
        grads, rec, adv, cfg = one_step(micro)
        assert cfg.micro_batch == micro
        for k in whole:
            torch.testing.assert_close(grads[k], whole[k], rtol=1e-4, atol=1e-5 * scale)
        # the attack's own Adam steps magnify rounding a little in near-zero coordinates
        torch.testing.assert_close(adv, adv_whole, rtol=1e-3, atol=1e-4 * float(adv_whole.abs().max()))
        assert rec.keys() == rec_whole.keys()
        assert all(abs(rec[k] - rec_whole[k]) <= 1e-6 + 1e-4 * abs(rec_whole[k]) for k in rec)


def test_micro_batch_auto_splits_large_unets_only(tiny_world):
    from bierasing.erase.config import MICRO_AUTO_PARAMS
    from bierasing.erase.engine import resolve_for_model

    def micro(bb, cfg):
        return resolve_for_model(bb, cfg, [])[0].micro_batch

    assert micro(tiny_world, _cfg()) == 0  # a tiny UNet: the whole batch at once
    assert micro(tiny_world, _cfg(micro_batch=3)) == 3

    class Large:
        unet = torch.nn.Linear(1, MICRO_AUTO_PARAMS, device="meta")  # a parameter count, no memory
        prediction_type = "epsilon"

        def suggest_related(self, pairs, n):
            return [], [[] for _ in pairs]

    assert micro(Large(), _cfg()) == 1
    with pytest.raises(ValueError, match=r"micro_batch must be in \[-1, 256\]"):
        EraseConfig(micro_batch=-2)


def test_positive_and_target_to_safe_rows_split_the_batch(tiny_world):
    """Both rows are trained toward eps*(c+, I+)-guided targets, so they share the step's x_t
    samples instead of each taking all: the pull costs no student rows beyond the positive branch."""
    def cost(map_weight):
        res = Eraser(tiny_world, [_concept()], _cfg(batch_size=4, adversarial=0.0, map_target_to_safe=map_weight)).run()
        res.adapters.remove(tiny_world.unet)
        return res.forward_rows, res.history[-1]

    rows_with, last = cost(0.3)
    rows_without, _ = cost(0.0)
    assert {"pos", "map"} <= last.keys() and last["map"] > 0
    assert rows_with == rows_without == 4 * 4 * (3 + 3 * 2)  # 4 steps x B 4 x (3 teacher + 2 student groups x 3)
