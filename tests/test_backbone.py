import pytest
import torch

from bierasing.adapter import (DecoupledCrossAttnProcessor, ImageProjModel, ip_adapter_state_dict,
                               load_ip_adapter_state_dict)
from bierasing.sampling import ddim_timesteps, sample, seeded_noise


def test_v_prediction_output_converts_to_the_true_noise(tiny_world):
    bb = tiny_world
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t = bb.add_noise(x0, eps, t)
    a = bb.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert bb.prediction_type == "v_prediction"
    torch.testing.assert_close(bb.output_to_eps(v, x_t, t), eps, atol=1e-4, rtol=1e-4)


def test_every_attn2_has_a_decoupled_image_channel(tiny_world):
    names = tiny_world.attn2_modules()
    assert len(names) == 4  # 8x8 down block, mid block, two layers of the 8x8 up block
    procs = [m.processor for m in names.values()]
    assert all(isinstance(p, DecoupledCrossAttnProcessor) for p in procs)


def test_image_tokens_steer_and_scale_zero_is_text_only(tiny_world):
    bb = tiny_world
    with torch.no_grad():
        procs = [m.processor for m in bb.attn2_modules().values()]
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([500, 500])
        text = bb.encode_text(["a red circle", ""])
        tokens = bb.encode_images(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        assert tokens.shape == (2, 4, 64)
        plain = bb.predict_noise(x, t, text)
        with_img = bb.predict_noise(x, t, text, tokens)
        for p in procs:
            p.scale = 0.0
        off = bb.predict_noise(x, t, text, tokens)
        for p in procs:
            p.scale = 1.0
    assert (with_img - plain).abs().max() > 1e-4
    torch.testing.assert_close(off, plain)


def test_ip_adapter_state_dict_round_trip_and_errors(tiny_world):
    bb = tiny_world
    sd = ip_adapter_state_dict(bb.image_proj, bb.unet)
    assert "image_proj.proj.weight" in sd and "image_proj.norm.weight" in sd
    ip_keys = sorted(k for k in sd if k.startswith("ip_adapter."))
    assert len(ip_keys) == 2 * len(bb.attn2_modules())
    assert all(int(k.split(".")[1]) % 2 == 1 for k in ip_keys)  # attn2 = odd processor index
    fresh = ImageProjModel(64, 64, 4)
    load_ip_adapter_state_dict({k: v.clone() for k, v in sd.items()}, fresh, bb.unet)
    torch.testing.assert_close(fresh.proj.weight, bb.image_proj.proj.weight)
    broken = {k: v for k, v in sd.items() if k != ip_keys[0]}
    with pytest.raises(ValueError, match="lack ip_adapter"):
        load_ip_adapter_state_dict(broken, fresh, bb.unet)
    wrong = dict(sd)
    wrong[ip_keys[0]] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="has shape"):
        load_ip_adapter_state_dict(wrong, fresh, bb.unet)


def test_sampling_is_deterministic_per_seed_and_batch_independent(tiny_world):
    a = sample(tiny_world, ["a red circle", "a blue star"], [7, 8], steps=4)
    b = sample(tiny_world, ["a red circle", "a blue star"], [7, 8], steps=4)
    c = sample(tiny_world, ["a blue star"], [8], steps=4)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[1:], c, atol=1e-5, rtol=0)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == (2, 3, 32, 32)


def test_sampler_input_checks():
    assert ddim_timesteps(1000, 20).tolist()[:3] == [950, 900, 850]
    with pytest.raises(ValueError, match="sampling steps"):
        ddim_timesteps(1000, 0)
    assert torch.equal(seeded_noise([3], (2, 2))[0], torch.randn(2, 2, generator=torch.Generator().manual_seed(3)))


def test_save_load_round_trip(tiny_world, tmp_path):
    from bierasing.world.models import ShapesWorldBackbone

    tiny_world.save(tmp_path / "m")
    again = ShapesWorldBackbone.load(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([300])
    with torch.no_grad():
        text = tiny_world.encode_text(["a green box"])
        tok = tiny_world.encode_images(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(again.encode_text(["a green box"]), text)
        torch.testing.assert_close(again.predict_noise(x, t, text, tok), tiny_world.predict_noise(x, t, text, tok))
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_a_folder_that_is_not_a_model(tmp_path):
    from bierasing.world.models import ShapesWorldBackbone

    with pytest.raises(FileNotFoundError, match="not a ShapesWorld model folder"):
        ShapesWorldBackbone.load(tmp_path)
