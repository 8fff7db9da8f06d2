"""Precision policy: whatever the model's dtype (fp32, bf16, fp16), the adapters and Adam's state
are fp32, the UNet runs in its own dtype, fp16 scales its loss, and the first steps stay close to
the fp32 run. Checked on the tiny SD1.5 stand-in loaded through diffusers with ``torch_dtype``."""

import pytest
import torch

from bierasing.erase import Concept, EraseConfig
from bierasing.erase.engine import Eraser
from bierasing.sd15 import SD15Backbone
from bierasing.standins import build_sd15_folder

#: loss of the first steps against the fp32 run (relative); bf16 keeps 8 mantissa bits, fp16 11
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_sd15_folder(tmp_path_factory.mktemp("sd15"), "tiny")


def _load(standin, dtype):
    return SD15Backbone.from_pretrained(standin["model"], ip_adapter=standin["ip_adapter"],
                                        image_encoder=standin["image_encoder"], resolution=64, dtype=dtype)


def _run(bb, steps=3, **kw):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    cfg = EraseConfig(steps=steps, batch_size=2, cache_size=2, xt_steps=4, adversarial=0.0, lr=1e-3, **kw)
    er = Eraser(bb, [Concept("a dog", "a cat", imgs, imgs.flip(-1))], cfg)
    res = er.run()
    return er, res


@pytest.fixture(scope="module")
def fp32_run(standin):
    bb = _load(standin, torch.float32)
    er, res = _run(bb)
    return res.history, {k: v.clone() for k, v in res.adapters.state_tensors().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_train_fp32_adapters_close_to_fp32(standin, fp32_run, dtype):
    bb = _load(standin, dtype)
    assert next(bb.unet.parameters()).dtype == dtype
    er, res = _run(bb)
    assert all(p.dtype == torch.float32 for p in res.adapters.parameters())
    state = [v for s in er.opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    assert state and all(v.dtype == torch.float32 for v in state)  # Adam's moments
    assert er.scaler.is_enabled() == (dtype == torch.float16)
    ref, _ = fp32_run
    # the loss is a mean of squared differences of near-equal predictions, so its rounding error is
    # set by the predictions' size, not by how small one step's loss is: measured against the run's
    # mean loss (one step with few rows can be several times smaller than the others)
    scale = sum(abs(w["loss"]) for w in ref) / len(ref)
    for got, want in zip(res.history, ref):
        assert torch.isfinite(torch.tensor(got["loss"]))
        assert abs(got["loss"] - want["loss"]) <= TOLERANCE[dtype] * scale, (got, want)
    # the base weights stay in the model's dtype and untouched
    assert all(p.dtype == dtype for n, p in bb.unet.named_parameters() if "processor" not in n and ".base." in n)


def test_saved_lora_precision_follows_the_setting(standin, tmp_path):
    from safetensors import safe_open

    bb = _load(standin, torch.float32)
    _, res = _run(bb, steps=1, method="esd-x")
    assert res.config.save_precision == "fp32"  # auto: fp32 below SD size, fp16 at SD size
    for precision, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res.config.save_precision = precision
        path = res.save(tmp_path / f"e_{precision}.safetensors")
        with safe_open(str(path), "pt") as f:
            dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
        assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {dt}
        assert {d for k, d in dtypes.items() if k.endswith(".alpha")} == {torch.float32}


def test_a_nan_loss_stops_with_a_resumable_checkpoint(standin, tmp_path):
    bb = _load(standin, torch.float32)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 64, 64, generator=g)
    ckpt = tmp_path / "ckpt.safetensors"
    cfg = EraseConfig(steps=4, batch_size=2, cache_size=2, xt_steps=4, adversarial=0.0, method="esd-x")
    er = Eraser(bb, [Concept("a dog", "a cat", imgs, imgs)], cfg, checkpoint_path=ckpt)
    calls = {"n": 0}
    real = er.training_step

    def step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("the erasure loss became nan at step 2")
        return real()

    er.training_step = step
    with pytest.raises(FloatingPointError, match="Step 2 is saved in .*ckpt.safetensors: run again with a lower lr"):
        er.run()
    assert ckpt.is_file()
    resumed = Eraser(bb, [Concept("a dog", "a cat", imgs, imgs)],
                     EraseConfig(**{**cfg.to_dict(), "lr": cfg.lr / 2, "micro_batch": -1, "save_precision": "auto"}),
                     checkpoint_path=ckpt).run()
    assert resumed.config.lr == cfg.lr / 2 and len(resumed.history) == 4
