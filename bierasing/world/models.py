"""ShapesWorld models: SD1.5 + IP-Adapter in miniature, laid out like a diffusers pipeline folder.

    weights/
      tokenizer/tokenizer.json        word-level tokenizer (transformers PreTrainedTokenizerFast)
      text_encoder/                   CLIPTextModelWithProjection (trained contrastively)
      image_encoder/                  CLIPVisionModelWithProjection (trained contrastively)
      unet/                           UNet2DConditionModel, pixel space 32x32, v-prediction
      scheduler/scheduler_config.json DDPM training schedule
      ip_adapter.safetensors          image projector + to_k_ip/to_v_ip, ip-adapter_sd15 key layout
      model_card.md, world.json       how it was trained and measured
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..adapter import (ImageProjModel, install_decoupled_attention, ip_adapter_state_dict,
                       load_ip_adapter_state_dict)
from ..backbone import Backbone
from . import data

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

PAD, BOS, UNK, EOS = "[PAD]", "[BOS]", "[UNK]", "[EOS]"  # EOS id must not be 2 (CLIP legacy path)


@dataclass
class WorldConfig:
    """Sizes of the ShapesWorld models (the defaults are the shipped model)."""

    max_text_len: int = field(default=16, metadata={"help": "text tokens incl. BOS/EOS/padding"})
    text_width: int = field(default=64, metadata={"help": "text encoder width = cross-attention dim"})
    text_layers: int = 2
    vision_width: int = 64
    vision_layers: int = 2
    embed_dim: int = field(default=64, metadata={"help": "joint text-image embedding size"})
    unet_channels: tuple[int, ...] = (24, 48, 64)
    unet_layers_per_block: int = 1
    cross_attn_levels: int = field(default=1, metadata={
        "help": "UNet resolution levels, from the lowest, with cross-attention (and self-attention): 1 "
                "is 8x8 only; 2 adds 16x16, where outlines are drawn, at 1.9x the step time"})
    ip_tokens: int = field(default=4, metadata={"help": "image tokens per exemplar (IP-Adapter: 4)"})
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"

    def __post_init__(self):
        if not 1 <= self.cross_attn_levels <= len(self.unet_channels):
            raise ValueError(f"cross_attn_levels must be 1..{len(self.unet_channels)} (the UNet's levels), "
                             f"got {self.cross_attn_levels}")

    @classmethod
    def from_json(cls, d: dict) -> "WorldConfig":
        d = dict(d)
        d["unet_channels"] = tuple(d["unet_channels"])
        return cls(**d)


def build_tokenizer(max_len: int):
    """A real transformers fast tokenizer whose every ShapesWorld word is one token."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, UNK, EOS] + data.vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, model_max_length=max_len)


def build_encoders(cfg, tokenizer) -> dict:
    """Fresh (random) CLIP-like text and image encoders of a world config (either architecture)."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4,
        max_position_embeddings=cfg.max_text_len, projection_dim=cfg.embed_dim,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=4, image_size=data.IMAGE_SIZE,
        patch_size=4, projection_dim=cfg.embed_dim))
    return {"text_encoder": text, "image_encoder": vision}


def build_models(cfg: WorldConfig, tokenizer) -> dict:
    """Fresh (random) text encoder, image encoder, UNet with decoupled attention, projector."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    enc = build_encoders(cfg, tokenizer)
    n, k = len(cfg.unet_channels), cfg.cross_attn_levels
    unet = UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE, in_channels=3, out_channels=3,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        # by default cross-attention only at the lowest resolution and in the mid block: most of
        # the quality for a fraction of the CPU time (self-attention at 16x16 doubled step time)
        down_block_types=("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k,
        up_block_types=("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k),
        cross_attention_dim=cfg.text_width, attention_head_dim=8, norm_num_groups=8)
    install_decoupled_attention(unet)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                              beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                              clip_sample=True)
    image_proj = ImageProjModel(cfg.embed_dim, cfg.text_width, cfg.ip_tokens)
    return {**enc, "unet": unet, "scheduler": scheduler, "image_proj": image_proj}


class ShapesWorldBackbone(Backbone):
    """The ShapesWorld model behind the :class:`~bierasing.backbone.Backbone` interface."""

    clip_sample = True

    def __init__(self, tokenizer, text_encoder, image_encoder, unet, scheduler, image_proj,
                 config: WorldConfig):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.unet = unet
        self.scheduler = scheduler
        self.image_proj = image_proj
        self.config = config
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.prediction_type
        self.sample_shape = (3, data.IMAGE_SIZE, data.IMAGE_SIZE)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_text_len, return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(input_ids=self.tokenize(prompts)).last_hidden_state

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Joint-space text embeddings [B, embed_dim] (CLIP's text_embeds)."""
        return self.text_encoder(input_ids=self.tokenize(prompts)).text_embeds

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Joint-space image embeddings [B, embed_dim] (CLIP's image_embeds)."""
        pixels = images.to(self.device) * 2 - 1  # [0,1] -> [-1,1], mean/std 0.5 as Bi-Erasing's code
        return self.image_encoder(pixel_values=pixels).image_embeds

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.embed_images(images))

    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def from_x(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)

    exemplar_size = data.IMAGE_SIZE

    def concept_text(self, concept: str) -> str:
        """A world concept word becomes its canonical prompt ("circle" -> "a circle")."""
        return data.concept_prompt(concept) if data.is_concept(concept) else concept

    def is_whole_image(self, concept: str) -> bool:
        """The background axis is the whole image; other world words are things in it."""
        if data.is_concept(concept):
            return data.axis_of(concept) == "background"
        return super().is_whole_image(concept)

    def default_safe(self, concept: str) -> str:
        return data.DEFAULT_SAFE.get(concept, "")

    def erasure_scorer(self):
        from .scoring import WorldScorer

        return WorldScorer()

    def related_vocabulary(self, concept: str):
        from .related import world_vocabulary

        return world_vocabulary(concept)

    def networks(self) -> tuple:
        """The trained networks (what ``eval`` freezes and ``load`` moves to a device)."""
        return self.text_encoder, self.image_encoder, self.unet, self.image_proj

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write the pipeline folder atomically (a temp folder renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        self.text_encoder.save_pretrained(tmp / "text_encoder")
        self.image_encoder.save_pretrained(tmp / "image_encoder")
        self._save_denoiser(tmp)
        meta = {"arch": self.arch, "config": asdict(self.config), **(extra or {})}
        (tmp / "world.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            _rmtree(old)

    #: world.json "arch" of this kind of world (absent in folders written before flow worlds)
    arch = "unet"

    def _save_denoiser(self, folder: Path) -> None:
        from safetensors.torch import save_file

        unet_sd = {k: v for k, v in self.unet.state_dict().items() if "processor." not in k}
        self.unet.save_config(folder / "unet")
        save_file({k: v.contiguous() for k, v in unet_sd.items()},
                  str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        self.scheduler.save_config(folder / "scheduler")
        ip = {k: v.detach().contiguous() for k, v in ip_adapter_state_dict(self.image_proj, self.unet).items()}
        save_file(ip, str(folder / "ip_adapter.safetensors"))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "cpu") -> "ShapesWorldBackbone":
        """Load a ShapesWorld model folder of either architecture (default: the shipped UNet world;
        'shapesworld-flow' names the shipped flow world)."""
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, PreTrainedTokenizerFast

        path = world_folder(path)
        if not (path / "world.json").is_file():
            raise FileNotFoundError(f"{path} is not a ShapesWorld model folder (no world.json); "
                                    "train one with `bierasing world train`")
        meta = json.loads((path / "world.json").read_text())
        kind = ShapesWorldBackbone
        if meta.get("arch", "unet") == "flow":
            from .flow import FlowWorldBackbone as kind
        elif meta.get("arch", "unet") != "unet":
            raise ValueError(f"{path}: unknown world architecture {meta['arch']!r}; a newer bierasing wrote it")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
        text = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder")
        vision = CLIPVisionModelWithProjection.from_pretrained(path / "image_encoder")
        bb = kind._load_denoiser(path, meta["config"], tokenizer, text, vision)
        for m in bb.networks():
            m.to(device)
        return bb.eval()

    @classmethod
    def _load_denoiser(cls, path: Path, config: dict, tokenizer, text, vision) -> "ShapesWorldBackbone":
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        cfg = WorldConfig.from_json(config)
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        install_decoupled_attention(unet)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        image_proj = ImageProjModel(cfg.embed_dim, cfg.text_width, cfg.ip_tokens)
        load_ip_adapter_state_dict(load_file(str(path / "ip_adapter.safetensors")), image_proj, unet)
        return cls(tokenizer, text, vision, unet, scheduler, image_proj, cfg)


#: names of the shipped worlds for ``--model``
SHIPPED = {"shapesworld": WEIGHTS_DIR, "shapesworld-flow": WEIGHTS_DIR.with_name("weights_flow")}


def world_folder(model: str | os.PathLike | None) -> Path:
    """The folder of a world: a shipped name (``SHIPPED``; None = 'shapesworld') or a path."""
    if model is None:
        return WEIGHTS_DIR
    return SHIPPED.get(str(model), Path(model).expanduser())


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p)
