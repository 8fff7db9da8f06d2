import json
import subprocess
import sys

import pytest
import torch

from bierasing.world.models import ShapesWorldBackbone, WorldConfig
from bierasing.world.train import TrainConfig, TrainingInterrupted, WorldTrainer, train_world

TINY = WorldConfig(unet_channels=(8, 16, 16))


def _cfg(**kw):
    base = dict(seed=3, clip_steps=3, clip_batch=8, unet_steps=4, unet_batch=4, vision_steps=2, ip_steps=3,
                ip_batch=4, warmup=2, checkpoint_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _state(bb):
    sd = {f"unet.{k}": v for k, v in bb.unet.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in bb.text_encoder.state_dict().items()})
    sd.update({f"proj.{k}": v for k, v in bb.image_proj.state_dict().items()})
    return sd


@pytest.mark.parametrize("stop_stage,stop_step", [("unet", 2), ("vision", 1), ("ip", 1)])
def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, stop_stage, stop_step):
    full = train_world(tmp_path / "full", _cfg(), TINY, progress=False, log=lambda m: None)

    trainer = WorldTrainer(tmp_path / "cut", _cfg(), TINY, progress=False, log=lambda m: None,
                           should_stop=lambda: False)
    trainer.should_stop = lambda: trainer.stage == stop_stage and trainer.step == stop_step
    with pytest.raises(TrainingInterrupted, match=f"stopped at {stop_stage} step {stop_step}"):
        trainer.run()
    resumed = train_world(tmp_path / "cut", _cfg(), TINY, progress=False, log=lambda m: None)

    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_gives_identical_weights_and_other_seed_does_not(tmp_path):
    a = _state(train_world(tmp_path / "a", _cfg(), TINY, progress=False, log=lambda m: None))
    b = _state(train_world(tmp_path / "b", _cfg(), TINY, progress=False, log=lambda m: None))
    c = _state(train_world(tmp_path / "c", _cfg(seed=4), TINY, progress=False, log=lambda m: None))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_seed(tmp_path):
    train_world(tmp_path, _cfg(), TINY, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="another seed"):
        train_world(tmp_path, _cfg(seed=9), TINY, progress=False, log=lambda m: None)


def test_training_lowers_the_losses(tmp_path):
    trainer = WorldTrainer(tmp_path, _cfg(clip_steps=100, unet_steps=100, ip_steps=0), TINY,
                           progress=False, log=lambda m: None)
    trainer.run()
    clip, unet = trainer.history["clip"], trainer.history["unet"]
    assert clip[-1][1] < clip[0][1] * 0.9
    assert unet[-1][1] < unet[0][1] * 0.8


def test_cli_world_train_then_eval_smoke(tmp_path):
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, "-m", "bierasing.cli", "world", "train", "--out", str(out),
                        "--clip-steps", "2", "--unet-steps", "2", "--vision-steps", "2", "--ip-steps", "2", "--skip-eval",
                        "--quiet", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    bb = ShapesWorldBackbone.load(out / "model")
    meta = json.loads((out / "model" / "world.json").read_text())
    assert meta["train"]["unet_steps"] == 2 and set(meta["seconds"]) == {"clip", "unet", "vision", "ip"}
    assert bb.config == WorldConfig()
    r = subprocess.run([sys.executable, "-m", "bierasing.cli", "world", "eval", "--model",
                        str(out / "model"), "--samples", "1", "--steps", "2", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("shape_acc", "color_acc", "axis3_acc", "image_steer_acc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["samples_per_prompt"] == 1


def test_cli_reports_bad_model_folder_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bierasing.cli", "world", "eval", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "not a ShapesWorld model folder" in r.stderr and "Traceback" not in r.stderr
