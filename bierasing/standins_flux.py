"""Random-weight FLUX.1 stand-ins built locally (nothing is downloaded).

``build_flux_folder(path)`` writes a diffusers ``FluxPipeline`` folder with FLUX.1's classes and
interfaces at toy widths - ``FluxTransformer2DModel`` (one double-stream and one single-stream
block, 2 heads x 16, RoPE axes 4/6/6, guidance embedding for dev), CLIP text encoder (pooled 32-d),
T5 v1.1 encoder (gated GELU, 32-d tokens = the joint attention width), a 16-channel AutoencoderKL
with FLUX's scaling and shift factors, FLUX.1's flow-matching scheduler - plus a SigLIP vision
folder and a ``flux1-redux-dev``-layout Redux file. The outputs are noise: these check plumbing,
shapes, key names and equivalence, in seconds.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .standins import clip_tokenizer

WIDTH = 32  # joint attention width = T5 width = CLIP width = pooled width of the tiny stand-in


def flux_model_index(diffusers_version: str) -> dict:
    """``model_index.json`` of a ``FluxPipeline`` of the components :func:`build_flux_folder` writes."""
    return {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def t5_tokenizer(folder: Path):
    """A T5 (Unigram, "▁" word starts) tokenizer over lower-case letters, digits and punctuation."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + ",.-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(folder)
    return tok


def build_flux_folder(path: str | Path, seed: int = 0, schnell: bool = False) -> dict[str, Path]:
    """Write the tiny FLUX.1-dev (or ``schnell``: no guidance embedding, unshifted schedule) stand-in
    under ``path``; the weights depend only on ``seed``. Returns ``{"model", "ip_adapter",
    "image_encoder"}`` (the Redux file and its SigLIP folder under the names the loaders take)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config,
                              T5EncoderModel)

    from .flux import ReduxProjector
    from .io import save_safetensors

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, ids = clip_tokenizer(root / "tokenizer")
        CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                     **ids)).save_pretrained(root / "text_encoder")
        t5 = t5_tokenizer(root / "tokenizer_2")
        T5EncoderModel(T5Config(vocab_size=len(t5), d_model=WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)).save_pretrained(root / "text_encoder_2")
        FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=WIDTH,
                               pooled_projection_dim=WIDTH, guidance_embeds=not schnell,
                               axes_dims_rope=(4, 6, 6)).save_pretrained(root / "transformer")
        AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, layers_per_block=1,
                      norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                      use_quant_conv=False, use_post_quant_conv=False).save_pretrained(root / "vae")
        shifts = ({"shift": 1.0, "use_dynamic_shifting": False} if schnell else
                  {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096})
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **shifts).save_pretrained(root / "scheduler")
        vision = SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        SiglipVisionModel(vision).save_pretrained(root / "image_encoder")
        redux = ReduxProjector(vision.hidden_size, 3 * WIDTH, WIDTH)  # 1152 -> 12288 -> 4096 in flux1-redux-dev
        save_safetensors(root / "flux1-redux-dev.safetensors", {k: v.contiguous() for k, v in redux.state_dict().items()})
    (root / "model_index.json").write_text(json.dumps(flux_model_index(diffusers.__version__), indent=2) + "\n")
    return {"model": root, "ip_adapter": root / "flux1-redux-dev.safetensors", "image_encoder": root / "image_encoder"}


def flux_transformer(double: int = 1, single: int = 1, seed: int = 0, guidance: bool = True):
    """A random ``FluxTransformer2DModel`` at FLUX.1's full width (3072, 24 heads x 128, 4096-d T5 tokens,
    768-d pooled vector, RoPE 16/56/56) and reduced depth: the smallest transformer ComfyUI detects as
    FLUX (it reads the depth from the weights but assumes the width). One block of each kind is about
    0.55 B parameters (2.2 GB in fp32)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=guidance,
                                      axes_dims_rope=(16, 56, 56))
