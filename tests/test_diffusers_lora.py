"""Erasure files in diffusers: ``StableDiffusionPipeline.load_lora_weights`` (the PEFT backend) reads the
kohya keys ``bierasing.erase.export`` writes, leaves none out, and its UNet computes exactly what
bierasing's own adapters compute. Runs on the tiny SD1.5 stand-in (random weights, a few seconds).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch

pytest.importorskip("peft", reason="diffusers loads LoRAs through peft: pip install -c constraints.txt '.[test]'")

from bierasing.erase import adapters as A  # noqa: E402
from bierasing.erase.export import read_erasure, save_erasure  # noqa: E402
from bierasing.sd15 import SD15Backbone  # noqa: E402
from bierasing.standins import build_sd15_folder  # noqa: E402

RANK = 4
# the one diffusers warning a UNet-only LoRA is expected to give (it looks for text-encoder keys too)
NO_TEXT_ENCODER_KEYS = "No LoRA keys associated to CLIPTextModel found"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_sd15_folder(tmp_path_factory.mktemp("sd15"), "tiny")["model"]


def fixed_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 77, 768, generator=g)
    return x, torch.tensor([10, 500]), cond


def unet_out(unet, inputs):
    x, t, cond = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


@contextlib.contextmanager
def captured_warnings():
    """Warnings of diffusers and peft (log records and ``warnings.warn``) raised inside the block.

    diffusers' root logger does not propagate to the root logger (pytest's caplog never sees it),
    so a handler goes on it directly, at WARNING level whatever DIFFUSERS_VERBOSITY says."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            messages: list[str] = []
            yield messages
        messages += [r.getMessage() for r in records] + [str(w.message) for w in caught]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        # the stand-in's DDPM config keeps steps_offset 0 (bierasing's own samplers use it as is)
        warnings.filterwarnings("ignore", message="(?s).*steps_offset", category=FutureWarning)
        return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)


def test_stand_in_is_a_complete_stable_diffusion_pipeline(folder):
    """model_index.json makes the stand-in a StableDiffusionPipeline folder diffusers loads offline."""
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.image_encoder is None
    assert pipe.config.requires_safety_checker is False
    assert (folder / "image_encoder").is_dir()  # still there for the IP-Adapter path, not a pipeline part
    lat = pipe("a photo", num_inference_steps=1, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()


@pytest.mark.parametrize("alpha", [None, 1.0], ids=["alpha=rank", "alpha=1"])
def test_erasure_file_loads_in_diffusers_with_the_same_unet_output(folder, tmp_path, alpha):
    bb = SD15Backbone.from_pretrained(folder)  # text-only is enough: the LoRA is on the UNet's attn2
    adapters = A.attach(bb.unet, "attn2", rank=RANK, alpha=alpha, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # up starts at zero (a no-op LoRA); give it small random values
        for layer in adapters.layers.values():
            layer.up.copy_(0.1 * torch.randn(layer.up.shape, generator=g))
    path = save_erasure(tmp_path / "erasure.safetensors", adapters, {"method": "test", "concept": "dog"})
    inputs = fixed_input()
    ours = unet_out(bb.unet, inputs)
    with adapters.disabled():
        assert not torch.allclose(unet_out(bb.unet, inputs), ours, atol=1e-4)  # the LoRA does something

    pipe = load_pipeline(folder)
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(path))
    assert all(NO_TEXT_ENCODER_KEYS in m for m in messages), messages  # no missing / unexpected keys
    assert messages, "captured no warning at all: is the capture still hooked into diffusers' logger?"

    # every tensor of the file reached a peft layer of the same module, unchanged
    from peft.tuners.lora import LoraLayer

    lora_layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(lora_layers) == sorted(adapters.layers)
    tensors, _ = read_erasure(path)
    scale = (alpha if alpha is not None else RANK) / RANK
    for name, layer in adapters.layers.items():
        peft_layer = lora_layers[name]
        (adapter_name,) = peft_layer.lora_A.keys()
        assert torch.equal(peft_layer.lora_A[adapter_name].weight, layer.down)
        assert torch.equal(peft_layer.lora_B[adapter_name].weight, layer.up)
        assert peft_layer.scaling[adapter_name] == layer.scale == scale
    assert len(tensors) == 3 * len(adapters.layers)  # down, up, alpha per layer: nothing else in the file

    # same weights, same operations (base(x) + scale * up(down(x)), unfused, in float32): bit-identical
    theirs = unet_out(pipe.unet, inputs)
    assert torch.equal(theirs, ours), (theirs - ours).abs().max()


def test_without_peft_diffusers_refuses_the_file(folder, tmp_path, monkeypatch):
    """Simulated: diffusers sets USE_PEFT_BACKEND from peft being importable (at import time), and
    load_lora_weights checks that flag first; clearing it is what a missing peft looks like."""
    import diffusers.utils
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    with pytest.raises(ValueError, match="PEFT backend is required"):
        # refused before the pipeline or the file are looked at
        StableDiffusionPipeline.load_lora_weights(None, str(tmp_path / "erasure.safetensors"))
