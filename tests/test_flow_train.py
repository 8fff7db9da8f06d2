"""Training ShapesWorld-Flow (``world train --arch flow``): seeded, resumable, each stage trains
only its own networks, the flow loss is the velocity regression it claims to be."""

import pytest
import torch

from bierasing.world.flow import FlowWorldConfig
from bierasing.world.flow_train import FlowWorldTrainer
from bierasing.world.models import ShapesWorldBackbone
from bierasing.world.train import TrainConfig, TrainingInterrupted, train_world

TINY = FlowWorldConfig(heads=2, head_dim=16, double_blocks=1, single_blocks=1, redux_hidden=32,
                       ae_channels=(8, 16, 16))
QUIET = dict(progress=False, log=lambda m: None)


def _cfg(**kw):
    base = dict(arch="flow", seed=3, clip_steps=3, clip_batch=8, unet_steps=4, unet_batch=4, vision_steps=2,
                ip_steps=3, ip_batch=4, vae_steps=2, warmup=2, checkpoint_every=100, probe_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _state(bb):
    out = {}
    for name, mod in (("flow", bb.unet), ("text", bb.text_encoder), ("vision", bb.image_encoder),
                      ("redux", bb.image_proj), ("vae", bb.vae)):
        out.update({f"{name}.{k}": v.clone() for k, v in mod.state_dict().items()})
    return out


@pytest.mark.parametrize("stop_stage,stop_step", [("vae", 1), ("flow", 2), ("redux", 1)])
def test_interrupted_and_resumed_flow_training_equals_uninterrupted(tmp_path, stop_stage, stop_step):
    full = train_world(tmp_path / "full", _cfg(), TINY, **QUIET)
    trainer = FlowWorldTrainer(tmp_path / "cut", _cfg(), TINY, **QUIET)
    trainer.should_stop = lambda: trainer.stage == stop_stage and trainer.step == stop_step
    with pytest.raises(TrainingInterrupted, match=f"stopped at {stop_stage} step {stop_step}"):
        trainer.run()
    resumed = train_world(tmp_path / "cut", _cfg(), TINY, **QUIET)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_flow_world_other_seed_other(tmp_path):
    a = _state(train_world(tmp_path / "a", _cfg(), TINY, **QUIET))
    b = _state(train_world(tmp_path / "b", _cfg(), TINY, **QUIET))
    c = _state(train_world(tmp_path / "c", _cfg(seed=4), TINY, **QUIET))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_flow_stage_lowers_the_velocity_loss_and_the_folder_loads_as_a_flow_world(tmp_path):
    trainer = FlowWorldTrainer(tmp_path, _cfg(unet_steps=200, ip_steps=20), TINY, **QUIET)
    trainer.run()
    flow = trainer.history["flow"]
    images = trainer._batch(64)[0]
    _, v = trainer._flow_state(images, torch.rand(64, generator=trainer.gen))
    assert flow[-1][1] < 0.8 * v.pow(2).mean().item(), flow  # predicting zero velocity scores E|v|^2
    trainer.bb.save(tmp_path / "model", extra={"train": {}})
    bb = ShapesWorldBackbone.load(tmp_path / "model")
    assert bb.arch == "flow" and bb.prediction_type == "flow"


def test_redux_stage_trains_only_the_redux_projector(tmp_path):
    trainer = FlowWorldTrainer(tmp_path, _cfg(ip_steps=0), TINY, **QUIET)
    trainer.run()
    before = _state(trainer.bb)
    again = FlowWorldTrainer(tmp_path / "r", _cfg(ip_steps=3), TINY, **QUIET)
    trainer.bb.save(tmp_path / "m", extra={})
    again.run(init_from=tmp_path / "m", start_stage="redux")
    after = _state(again.bb)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"redux"}


def test_a_retrained_transformer_may_be_built_differently_but_kept_networks_may_not(tmp_path):
    import dataclasses

    src = train_world(tmp_path / "src", _cfg(), TINY, **QUIET)
    deeper = dataclasses.replace(TINY, double_blocks=2, single_blocks=0)
    new = train_world(tmp_path / "new", _cfg(), deeper, init_from=tmp_path / "src" / "model", start_stage="flow",
                      **QUIET)
    a, b = _state(src), _state(new)
    assert all(torch.equal(a[k], b[k]) for k in a if k.split(".")[0] in ("text", "vae"))  # vision retrains later
    assert ShapesWorldBackbone.load(tmp_path / "new" / "model").config.double_blocks == 2
    wider = dataclasses.replace(TINY, ae_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="another architecture or another vae config"):
        train_world(tmp_path / "bad", _cfg(), wider, init_from=tmp_path / "src" / "model", start_stage="flow",
                    **QUIET)


def test_the_flow_loss_is_velocity_regression(tmp_path):
    trainer = FlowWorldTrainer(tmp_path, _cfg(), TINY, **QUIET)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0])
    trainer.gen.manual_seed(5)
    x, v = trainer._flow_state(images, sigma)
    trainer.gen.manual_seed(5)
    noise = torch.randn((4, *trainer.bb.sample_shape), generator=trainer.gen)
    x0 = trainer.bb.to_x(images)
    assert torch.allclose(x[0], x0[0]) and torch.allclose(x[3], noise[3])
    assert torch.allclose(v, noise - x0)


def test_arch_is_validated_and_flow_checkpoints_are_not_mixed_with_unet_ones(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of unet, flow"):
        TrainConfig(arch="dit")
    with pytest.raises(ValueError, match="embed_dim must equal text_width"):
        FlowWorldConfig(embed_dim=32)
    train_world(tmp_path, _cfg(), TINY, **QUIET)
    with pytest.raises(ValueError, match="another seed or model config"):
        train_world(tmp_path, _cfg(arch="unet"), None, **QUIET)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_pooled_dropout_gives_the_transformer_the_empty_prompts_pooled_vector(tmp_path, share):
    trainer = FlowWorldTrainer(tmp_path, _cfg(flow_pooled_dropout=share), TINY, **QUIET)
    seen = []
    real = trainer.bb.velocity

    def recording(x, sigma, text, image_tokens=None):
        seen.append(text.detach().clone())
        return real(x, sigma, text, image_tokens)

    trainer.bb.velocity = recording
    captions = ["a red circle", "a blue star"]
    with torch.no_grad():
        text = trainer.bb.encode_text(captions)
        empty_pooled = trainer.bb.encode_text([""])[0, -1]
    trainer._denoiser_loss(torch.rand(2, 3, 32, 32), text)
    (given,) = seen
    assert torch.equal(given[:, :-1], text[:, :-1])  # the tokens always keep the caption
    if share == 1.0:
        assert all(torch.equal(row, empty_pooled) for row in given[:, -1])
    else:
        assert torch.equal(given[:, -1], text[:, -1]) and not torch.equal(text[0, -1], empty_pooled)


def test_pooled_dropout_is_validated_and_for_the_flow_world_only(tmp_path):
    import subprocess
    import sys

    with pytest.raises(ValueError, match=r"flow_pooled_dropout is a share of steps in \[0, 1\]"):
        TrainConfig(flow_pooled_dropout=1.5)
    r = subprocess.run([sys.executable, "-m", "bierasing", "world", "train", "--flow-pooled-dropout", "0.5",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "no pooled text vector" in r.stderr and "Traceback" not in r.stderr


def test_flow_t_mean_moves_the_noise_level_draw_and_is_for_the_flow_world_only(tmp_path):
    import subprocess
    import sys

    drawn = {}
    for mean in (-1.0, 1.0):
        trainer = FlowWorldTrainer(tmp_path / str(mean), _cfg(flow_t_mean=mean), TINY, **QUIET)
        real = trainer.bb.velocity
        sigmas = []

        def recording(x, sigma, text, image_tokens=None, real=real, sigmas=sigmas):
            sigmas.append(sigma.detach().clone())
            return real(x, sigma, text, image_tokens)

        trainer.bb.velocity = recording
        with torch.no_grad():
            text = trainer.bb.encode_text(["a red circle"] * 64)
            trainer._denoiser_loss(torch.rand(64, 3, 32, 32), text)
        drawn[mean] = sigmas[0]
    # shifted logit-normal medians: sigmoid(-1) -> 0.52, sigmoid(1) -> 0.90 at the world's shift 3
    assert drawn[-1.0].median() < 0.65 < 0.8 < drawn[1.0].median()
    with pytest.raises(ValueError, match="flow_t_mean sets the flow world"):
        TrainConfig(flow_t_mean=-0.5)
    r = subprocess.run([sys.executable, "-m", "bierasing", "world", "train", "--flow-t-mean", "-0.5",
                        "--out", str(tmp_path / "unet")], capture_output=True, text=True)
    assert r.returncode != 0 and "flow_t_mean sets the flow world" in r.stderr and "Traceback" not in r.stderr


def test_world_dependent_defaults_resolve_by_arch_and_keep_what_is_given():
    flow, unet = TrainConfig(arch="flow"), TrainConfig()
    assert (flow.unet_steps, flow.flow_pooled_dropout, flow.vision_steps) == (16000, 0.5, 3000)
    assert (unet.unet_steps, unet.flow_pooled_dropout, unet.vision_steps) == (5500, 0.0, 1500)
    assert (flow.flow_t_mean, unet.flow_t_mean) == (0.0, 0.0)
    assert TrainConfig(arch="flow", flow_pooled_dropout=0.0, unet_steps=7).flow_pooled_dropout == 0.0
    assert (FlowWorldConfig().double_blocks, FlowWorldConfig().single_blocks) == (4, 2)
    with pytest.raises(ValueError, match="no pooled text vector"):
        TrainConfig(flow_pooled_dropout=0.5)
