"""Random-weight stand-ins for the real models, built locally from configs (nothing is downloaded).

``build_sd15_folder(path, size="tiny"|"full")`` writes a diffusers SD1.x pipeline folder (with its
``model_index.json``, so ``StableDiffusionPipeline.from_pretrained`` loads it), a CLIP vision encoder
folder and an ``ip-adapter_sd15``-layout safetensors file:
  * "full": the real SD1.5 UNet/VAE/text-encoder architecture (860 M UNet parameters);
  * "tiny": the same classes and SD1.x interface (4 latent channels, 768-d cross-attention,
    77 tokens) with few channels and layers, for fast tests.
Weights are random, so outputs are noise: these check plumbing, shapes, key names and cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_vocab(folder: Path) -> None:
    """A CLIP BPE vocabulary in which every byte is a token (no merges): real CLIPTokenizer files."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer saved in ``folder`` (77 tokens) and the special-token ids a
    ``CLIPTextConfig`` needs."""
    from transformers import CLIPTokenizer

    _byte_vocab(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    return tok, {"bos_token_id": tok.convert_tokens_to_ids("<|startoftext|>"), "eos_token_id": end,
                 "pad_token_id": end}


def model_index(diffusers_version: str) -> dict:
    """The ``model_index.json`` of the stand-in: a ``StableDiffusionPipeline`` of the components
    :func:`build_sd15_folder` writes, without a safety checker (``null`` entries, as diffusers saves a
    pipeline built with ``safety_checker=None``). ``image_encoder/`` is left out of the pipeline
    (``null``): it is the IP-Adapter's encoder, loaded by ``SD15Backbone`` or ComfyUI, not by
    ``StableDiffusionPipeline``."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_sd15_folder(path: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write random-weight SD1.x stand-ins under ``path`` (created if missing) and return their paths.

    ``size`` picks the architecture:

    * ``"tiny"`` (default): a 2-level UNet (32/64 channels, cross-attention in the first down block,
      the mid block and the last up block, 8 heads), a 1-layer 768-wide CLIP text encoder, a 2-level VAE (16/32 channels) and a
      32-px ViT image encoder with a 64-d projection; a few MB, built and loaded in seconds;
    * ``"full"``: the real SD1.5 shapes (860 M UNet parameters, 12-layer CLIP ViT-L text encoder,
      the 4-level VAE, a ViT-H/14 image encoder with a 1024-d projection); several GB on disk and
      minutes on a CPU.

    Both keep SD1.x's interface: 4 latent channels, 768-d cross-attention, 77 tokens, a byte-level
    CLIP tokenizer, a scaled-linear DDPM scheduler. Written:

    * ``path/`` as a diffusers pipeline folder: ``unet/``, ``text_encoder/``, ``tokenizer/``,
      ``vae/``, ``scheduler/`` and ``model_index.json`` (``StableDiffusionPipeline``, no safety
      checker), so ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)`` and
      ``SD15Backbone.from_pretrained(path)`` both load it offline;
    * ``path/image_encoder/`` (``CLIPVisionModelWithProjection``);
    * ``path/ip-adapter_sd15.safetensors`` (``image_proj.*`` / ``ip_adapter.*`` keys).

    The weights depend only on ``size`` and ``seed`` (the global torch RNG is left as it was).
    Returns ``{"model": path, "ip_adapter": ..., "image_encoder": ...}``.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from .adapter import ImageProjModel, install_decoupled_attention, ip_adapter_state_dict
    from .io import save_safetensors

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok, ids = clip_tokenizer(root / "tokenizer")
        if size == "full":
            unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.x's UNet
            text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu", **ids)
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                sample_size=512)
            vis_cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                       num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                                       hidden_act="gelu")
        else:
            unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8)
            text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=256,
                                      num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77, **ids)
            vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                norm_num_groups=8, sample_size=32)
            vis_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64)
        unet.save_pretrained(root / "unet")
        CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
        vae.save_pretrained(root / "vae")
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
        enc = CLIPVisionModelWithProjection(vis_cfg)
        enc.save_pretrained(root / "image_encoder")
        install_decoupled_attention(unet)
        for p in (p for n, p in unet.named_parameters() if "processor" in n):
            torch.nn.init.normal_(p, std=0.02)
        proj = ImageProjModel(vis_cfg.projection_dim, 768, 4)
        save_safetensors(root / "ip-adapter_sd15.safetensors", ip_adapter_state_dict(proj, unet))
    (root / "model_index.json").write_text(json.dumps(model_index(diffusers.__version__), indent=2) + "\n")
    return {"model": root, "ip_adapter": root / "ip-adapter_sd15.safetensors", "image_encoder": root / "image_encoder"}


def sdxl_model_index(diffusers_version: str) -> dict:
    """``model_index.json`` of a ``StableDiffusionXLPipeline`` of the components :func:`build_sdxl_folder` writes."""
    return {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def sdxl_unet_config(size: str = "tiny") -> dict:
    """``UNet2DConditionModel`` kwargs: SDXL base's shapes ("full", 2.57 B parameters) or the same
    interface with few channels ("tiny": 2 levels, 64-d cross-attention, 32-d pooled text)."""
    if size == "full":
        return dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    return dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4), cross_attention_dim=64, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                use_linear_projection=True, norm_num_groups=8)


def build_sdxl_folder(path: str | Path, seed: int = 0) -> dict[str, Path]:
    """A tiny random-weight SDXL stand-in under ``path``: a diffusers ``StableDiffusionXLPipeline``
    folder (two byte-level CLIP tokenizers, CLIP text encoders of widths 32 + 32 = the UNet's 64-d
    cross-attention, a 32-d pooled projection, SDXL's added conditions and VAE scale 0.13025), an image
    encoder folder and ``ip-adapter_sdxl_vit-h.safetensors`` in the IP-Adapter SDXL layout.
    Returns ``{"model", "ip_adapter", "image_encoder"}``."""
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from .adapter import ImageProjModel, install_decoupled_attention, ip_adapter_state_dict
    from .io import save_safetensors

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in ("tokenizer", "tokenizer_2"):
            tok, ids = clip_tokenizer(root / sub)
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, **ids)
        CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(root / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)).save_pretrained(root / "text_encoder_2")
        unet = UNet2DConditionModel(**sdxl_unet_config("tiny"))
        unet.save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                      norm_num_groups=8, sample_size=32, scaling_factor=0.13025).save_pretrained(root / "vae")
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
        vis_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, image_size=32, patch_size=8, projection_dim=48)
        CLIPVisionModelWithProjection(vis_cfg).save_pretrained(root / "image_encoder")
        install_decoupled_attention(unet)
        for p in (p for n, p in unet.named_parameters() if "processor" in n):
            torch.nn.init.normal_(p, std=0.02)
        proj = ImageProjModel(vis_cfg.projection_dim, unet.config.cross_attention_dim, 4)
        save_safetensors(root / "ip-adapter_sdxl_vit-h.safetensors", ip_adapter_state_dict(proj, unet))
    (root / "model_index.json").write_text(json.dumps(sdxl_model_index(diffusers.__version__), indent=2) + "\n")
    return {"model": root, "ip_adapter": root / "ip-adapter_sdxl_vit-h.safetensors",
            "image_encoder": root / "image_encoder"}
