"""The flow path: FLUX-layout packing, the VP view of a flow model, Redux tokens, trainable sets
on a transformer, the erasure engine and persistence on a (random, tiny) flow world."""

import pytest
import torch

from bierasing import flux
from bierasing.erase import Concept, EraseConfig, erase
from bierasing.erase.adapters import select_modules
from bierasing.erase.objectives import negative_guidance_target
from bierasing.sampling import ddim_step, sample


def _state(bb, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *bb.sample_shape, generator=g)
    t = torch.tensor([5, 480, 990])[:n]
    with torch.no_grad():
        text = bb.encode_text(["a red circle", "a blue star", ""][:n])
    return x, t, text


def test_pack_is_fluxs_layout_and_unpack_inverts_it():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    tokens = flux.pack(x, 4)
    assert tokens.shape == (2, 4, 48)
    # token 1 is the top-right 4x4 patch, channel-major: (c, ph, pw)
    assert torch.equal(tokens[0, 1, :16], x[0, 0, :4, 4:].flatten())
    assert torch.equal(flux.unpack(tokens, 4, 3, 8, 8), x)
    ids = flux.image_ids(2, 2)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_flow_state_is_a_rescaled_vp_state_with_the_same_noise(tiny_flow_world):
    bb = tiny_flow_world
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(2, *bb.sample_shape, generator=g), torch.randn(2, *bb.sample_shape, generator=g)
    t = torch.tensor([100, 900])
    s = bb.sigmas[t].view(-1, 1, 1, 1)
    c = flux.vp_to_flow_scale(bb.sigmas)[t].view(-1, 1, 1, 1)
    x_vp = bb.add_noise(x0, n, t)
    assert torch.allclose(c * x_vp, (1 - s) * x0 + s * n, atol=1e-5)
    # the true velocity converts to the true noise
    assert torch.allclose(bb.output_to_eps(n - x0, x_vp, t), n, atol=1e-5)
    assert bb.alphas_cumprod[-1] > 0 and bb.sigmas[-1] < 1 and bb.sigmas.diff().min() > 0


def test_a_ddim_step_is_an_euler_step_of_the_flow(tiny_flow_world):
    bb = tiny_flow_world
    x, t, text = _state(bb, n=2)
    t, t_prev = 700, 300
    tt = torch.full((2,), t)
    with torch.no_grad():
        v = bb.model_output(x, tt, text)
        eps = bb.output_to_eps(v, x, tt)
    s, s_prev = bb.sigmas[t], bb.sigmas[t_prev]
    c, c_prev = (flux.vp_to_flow_scale(bb.sigmas)[i] for i in (t, t_prev))
    ddim = ddim_step(bb, x, eps, t, t_prev) * c_prev  # latents: no x0 clipping
    euler = c * x + (s_prev - s) * v
    assert torch.allclose(ddim, euler, atol=1e-4)


def test_guidance_targets_in_eps_are_the_same_targets_in_velocity(tiny_flow_world):
    bb = tiny_flow_world
    x, t, text = _state(bb, n=2)
    with torch.no_grad():
        v_u = bb.model_output(x, t, text[[1, 1]])
        v_c = bb.model_output(x, t, text[[0, 0]])
    eta = 2.0
    from_eps = negative_guidance_target(bb.output_to_eps(v_u, x, t), bb.output_to_eps(v_c, x, t), eta)
    from_v = bb.output_to_eps(negative_guidance_target(v_u, v_c, eta), x, t)
    assert torch.allclose(from_eps, from_v, atol=1e-5)


def test_redux_tokens_steer_and_zero_rows_run_without_them(tiny_flow_world):
    bb = tiny_flow_world
    x, t, text = _state(bb, n=2)
    with torch.no_grad():
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        tokens = bb.encode_images(images)
        n = bb.config.redux_tokens
        assert n > 1 and tokens.shape == (2, n, bb.config.text_width)
        # n copies of the projected class state
        cls = bb.image_proj(bb.hidden_states_of_images(images)[:, :1])
        assert torch.equal(tokens, cls.expand(-1, n, -1))
        plain = bb.model_output(x, t, text)
        steered = bb.model_output(x, t, text, tokens)
        assert (steered - plain).abs().max() > 1e-4
        mixed = bb.model_output(x, t, text, torch.stack([tokens[0], torch.zeros_like(tokens[1])]))
    assert torch.allclose(mixed[0], steered[0], atol=1e-5)
    assert torch.allclose(mixed[1], plain[1], atol=1e-5)


def test_worlds_saved_before_repeated_redux_tokens_keep_one_token_per_hidden_state(tiny_flow_world):
    from dataclasses import asdict

    from bierasing.world.flow import FlowWorldConfig

    saved = {k: v for k, v in asdict(tiny_flow_world.config).items() if k != "redux_tokens"}
    old = FlowWorldConfig.from_json(saved)
    assert old.redux_tokens == 0
    bb = tiny_flow_world
    bb.config, keep = old, bb.config
    try:
        with torch.no_grad():
            tokens = bb.encode_images(torch.rand(1, 3, 32, 32))
    finally:
        bb.config = keep
    assert tokens.shape == (1, 65, old.text_width)


def test_trainable_sets_on_a_flux_transformer(tiny_flow_world):
    unet, rules = tiny_flow_world.unet, tiny_flow_world.trainable_rules()
    picked = {s: set(select_modules(unet, s, rules=rules)) for s in rules}
    pooled = {"time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"}
    assert picked["attn2"] == {f"transformer_blocks.0.attn.{p}" for p in
                               ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")} | pooled
    assert picked["attn2_kv"] == {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"}
    assert picked["attn2"] - pooled < picked["attn"] and "single_transformer_blocks.0.attn.to_q" in picked["attn"]
    assert not picked["attn2"] & picked["no_attn2"]
    assert "single_transformer_blocks.0.proj_mlp" in picked["no_attn2"]
    assert picked["attn"] | picked["no_attn2"] < picked["full"] and "x_embedder" in picked["full"]
    assert pooled < picked["full"] and not any(n.startswith("time_text_embed.timestep") for n in picked["full"])


def test_sampling_is_deterministic_and_starts_at_pure_noise(tiny_flow_world):
    bb = tiny_flow_world
    ts = bb.sampling_timesteps(4)
    assert ts.tolist() == [999, 749, 500, 250]
    a = sample(bb, ["a red circle", "a blue star"], [0, 1], steps=3)
    b = sample(bb, ["a blue star"], [1], steps=3)
    assert a.shape == (2, 3, 32, 32) and torch.allclose(a[1], b[0], atol=1e-4)
    with pytest.raises(ValueError, match="sampling steps"):
        bb.sampling_timesteps(0)


def test_bi_erasing_trains_on_a_flow_world_and_round_trips(tiny_flow_world, tmp_path):
    from bierasing.erase.export import load_erasure

    bb = tiny_flow_world
    g = torch.Generator().manual_seed(2)
    concept = Concept("a circle", "a square", torch.rand(4, 3, 32, 32, generator=g),
                      torch.rand(4, 3, 32, 32, generator=g))
    x, t, text = _state(bb, n=2)
    with torch.no_grad():
        before = bb.predict_noise(x, t, text)
    cfg = EraseConfig(steps=3, batch_size=2, cache_size=2, xt_steps=4, preserve="", contexts=0, adversarial=0.0)
    result = erase(bb, [concept], cfg)
    try:
        assert len(result.history) == 3 and all(h["loss"] >= 0 for h in result.history)
        with torch.no_grad():
            erased = bb.predict_noise(x, t, text)
        assert (erased - before).abs().max() > 1e-6
        names = set(result.adapters.layers)
        assert names and all(".attn.add_" in n or n.endswith("to_add_out") or "text_embedder" in n for n in names)
        path = result.save(tmp_path / "e.safetensors")
    finally:
        result.adapters.remove(bb.unet)
    with torch.no_grad():
        assert torch.equal(bb.predict_noise(x, t, text), before)
    loaded, _ = load_erasure(bb.unet, path)
    try:
        with torch.no_grad():
            assert torch.allclose(bb.predict_noise(x, t, text), erased, atol=1e-6)
    finally:
        loaded.remove(bb.unet)


def test_flow_world_saves_and_loads(tiny_flow_world, tmp_path):
    from bierasing.world.models import ShapesWorldBackbone

    bb = tiny_flow_world
    bb.save(tmp_path / "m")
    again = ShapesWorldBackbone.load(tmp_path / "m")
    assert type(again).__name__ == "FlowWorldBackbone" and again.config == bb.config
    x, t, text = _state(bb)
    tokens = bb.encode_images(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        assert torch.equal(again.predict_noise(x, t, text, tokens), bb.predict_noise(x, t, text, tokens))


def test_attention_masks_from_the_joint_attention(tiny_flow_world):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from bierasing.erase.attention_mask import attention_masks

    bb = tiny_flow_world
    x, t, text = _state(bb)
    with torch.no_grad():
        recorded = bb.predict_noise(x, t, text)
        procs = [blk.attn.processor for blk in bb.unet.transformer_blocks]
        for blk in bb.unet.transformer_blocks:
            blk.attn.set_processor(FluxAttnProcessor())
        try:
            stock = bb.predict_noise(x, t, text)
        finally:
            for blk, p in zip(bb.unet.transformer_blocks, procs):
                blk.attn.set_processor(p)
    assert torch.equal(recorded, stock)  # the recorder leaves the forward as diffusers computes it
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    masks = attention_masks(bb, images, "a red circle", "circle")  # 4x4 token maps, resized
    assert masks.shape == (2, 32, 32) and masks.min() == 0 and masks.max() == 1
    assert all(p.attention_store is None for p in bb.attention_recorders())


def test_velocity_weighting_turns_noise_mse_into_velocity_mse(tiny_flow_world):
    from bierasing.erase.objectives import mse, velocity_weights

    bb = tiny_flow_world
    x, t, text = _state(bb)
    g = torch.Generator().manual_seed(8)
    v_a, v_b = torch.randn(2, *x.shape, generator=g)
    w = velocity_weights(bb.alphas_cumprod, t)
    assert torch.allclose(w, 1 / (1 - bb.sigmas[t]) ** 2, rtol=1e-4)
    eps_mse = mse(bb.output_to_eps(v_a, x, t), bb.output_to_eps(v_b, x, t), w)
    assert torch.allclose(eps_mse, mse(v_a, v_b), rtol=1e-4)


def test_bi_erasing_trains_flow_models_on_the_velocity_loss_and_baselines_on_theirs(tiny_flow_world):
    from bierasing.erase.engine import _resolve

    def resolved(**kw):
        cfg = EraseConfig(preserve="", contexts=0, **kw)
        return _resolve(tiny_flow_world, cfg, [Concept("a circle", "")])[0]

    assert resolved().loss_weighting == "velocity"
    assert resolved(method="esd-x").loss_weighting == "uniform"
    assert resolved(loss_weighting="x0").loss_weighting == "x0"  # an explicit choice is kept
