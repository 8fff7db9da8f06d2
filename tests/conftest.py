import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("BIERASING_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def world():
    """The shipped ShapesWorld model (trained weights in bierasing/world/weights)."""
    from bierasing.world.models import ShapesWorldBackbone

    return ShapesWorldBackbone.load()


@pytest.fixture(scope="session")
def tiny_world():
    """A random, very small ShapesWorld pipeline for fast plumbing tests."""
    from bierasing.world.models import ShapesWorldBackbone, WorldConfig, build_models, build_tokenizer

    torch.manual_seed(0)
    cfg = WorldConfig(unet_channels=(8, 16, 16))
    tok = build_tokenizer(cfg.max_text_len)
    m = build_models(cfg, tok)
    return ShapesWorldBackbone(tok, m["text_encoder"], m["image_encoder"], m["unet"], m["scheduler"],
                               m["image_proj"], cfg).eval()


@pytest.fixture(scope="session")
def tiny_flow_world():
    """A random, very small ShapesWorld-Flow pipeline (FLUX-layout transformer) for plumbing tests."""
    from bierasing.world.flow import FlowWorldBackbone, FlowWorldConfig, build_flow_models
    from bierasing.world.models import build_tokenizer

    torch.manual_seed(0)
    cfg = FlowWorldConfig(heads=2, head_dim=16, double_blocks=1, single_blocks=1, redux_hidden=32,
                          ae_channels=(8, 16, 16))
    tok = build_tokenizer(cfg.max_text_len)
    m = build_flow_models(cfg, tok)
    return FlowWorldBackbone(tok, m["text_encoder"], m["image_encoder"], m["vae"], m["transformer"], m["redux"],
                             cfg).eval()
