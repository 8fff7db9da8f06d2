"""Train ShapesWorld from scratch: CLIP-like encoders, then the UNet, then the image branch.

    bierasing world train --out runs/world      (resumes from runs/world/train_state.safetensors)

Stages (each seeded, each resumable from a checkpoint written every ``checkpoint_every`` steps):
  1. clip  - text and image encoders trained contrastively; a caption is a positive for every
             image it correctly describes (captions mention only some of the three axes);
  2. unet  - v-prediction loss on DDPM-noised images, weighted towards the shapes' outlines
             (``unet_edge_weight``), frozen text encoder, 10% caption dropout
             for classifier-free guidance, EMA weights kept for sampling;
  3. vision - the image encoder of the image branch: a fresh CLIP pair (image encoder + its own
             text tower, discarded afterwards) trained contrastively for longer. As in SD1.5 +
             IP-Adapter, where the image encoder (OpenCLIP ViT-H) is not the text encoder's CLIP
             (ViT-L), the UNet's text encoder stays as it is. The short clip stage leaves shape weak
             in the pooled embeddings (shape zero-shot 0.56, shape text embeddings at cosine
             0.92-0.98), and the image branch can only pass on what the image embedding holds;
  4. ip_warm - IP-Adapter's initialisation (to_k_ip/to_v_ip copied from to_k/to_v) and a cheap
             warm start of the projector: its N image tokens regress onto the text encoder's
             hidden states of the exemplar's concept words, so the image branch starts out
             speaking the UNet's text language (no UNet forward; seconds);
  5. ip    - image projector + to_k_ip/to_v_ip in every attn2 trained on the frozen EMA UNet;
             the exemplar is a *different* render of the same concepts (so the branch carries
             concepts, not pixels), and 80% of the captions are empty (an image alone steers).
             Objective ``distill`` (default): the student (caption or empty prompt + image
             tokens) regresses onto the frozen text-only UNet given the exemplar's full caption,
             a low-variance target, with t drawn towards high noise (``ip_t_power``).

Image-branch recipes measured on the shipped UNet and image encoder (shape steering, empty
prompt + exemplar, 25 exemplars x 8 samples, DDIM 20, CFG 1.5), 600 steps each:
denoise 0.355; distill 0.46; + projector warm start 0.56; + t towards high noise 0.645 (the
default; 0.67 at 1200 steps). With ``ip_empty_prompt`` 1.0 it reaches 0.75 (0.83 at 1200 steps),
but the branch then never sees text and image together, which is how Bi-Erasing conditions: a
caption plus its matching exemplar then keeps the shape in only 0.39 of samples
(``text_image_shape_acc`` in ``bierasing world eval``). The default, 80% empty prompts for 3600
steps, measured steering 0.83 with text + image 0.89 (0.725 / 0.82 at 1200 steps, 0.785 / 0.87 at
2400); it is the shipped branch (model card). On 2026-12-03, on a from-scratch UNet: that recipe gave
0.7875 / 0.825, and a 3x higher image-stage learning rate (``ip_lr`` 3e-3) 0.8125 / 0.8625 at 1800
steps and 0.80 / 0.87 at 2400, so the default is now ip_lr 3e-3 for 1800 steps (half the time).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import io
from . import data
from .models import (SHIPPED, ShapesWorldBackbone, WorldConfig, build_encoders, build_models, build_tokenizer,
                     world_folder)

logger = logging.getLogger(__name__)

STAGES = ("clip", "unet", "vision", "ip_warm", "ip")
IP_OBJECTIVES = ("distill", "features", "hybrid", "attn", "denoise")
PRECISIONS = ("fp32", "bf16")
_AUTOCAST_STAGES = ("unet", "ip")  # the contrastive stages are cheap and shape the text encoder


class _EarlyExit(Exception):
    """Carries a block's output out of a UNet forward that need not go further."""

    def __init__(self, output: torch.Tensor):
        super().__init__("early exit")
        self.output = output


class TrainingInterrupted(RuntimeError):
    """Raised when ``should_stop`` asked to stop; the checkpoint written just before resumes it."""


ARCHS = ("unet", "flow")
#: settings whose default depends on the world (None in TrainConfig). The flow transformer learns
#: shapes later than the UNet (probes 0.76 / 0.91 at steps 8000 / 11000, docs/shapesworld.md) and
#: must read the caption from its tokens, where Redux adds the exemplar's. Its cosine schedule runs
#: over 16000 steps: over 12000 seed 1 ended at shape 0.8775; over 16000 its probe met the 0.93 stop
#: at step 11000 (shape 0.92 evaluated), the slower decay keeping the rate up while shapes form. Redux reads one state of
#: the image encoder, which must tell the shapes apart by itself: 3000 steps took that from 0.85 to
#: 0.995 (nearest class mean) and steering from 0.71 to 0.855 on seed 0.
#: The flow transformer's probes start at step 11000, so it never stops before 12000: Redux steers
#: only a transformer further along than the shape stop needs (seed 2: 0.75 / 0.795 / 0.9525 at
#: steps 10000 / 11000 / 12000; seed 3, not used to choose it: 0.9275 at 12000; docs/shapesworld.md).
ARCH_DEFAULTS = {"unet": {"unet_steps": 5500, "flow_pooled_dropout": 0.0, "vision_steps": 1500, "probe_from": 0},
                 "flow": {"unet_steps": 16000, "flow_pooled_dropout": 0.5, "vision_steps": 3000,
                          "probe_from": 11000}}


def denoiser_bar_met(probes: list, bar: float) -> bool:
    """Whether the mean of the last two probes ([step, {metric: value}]) reaches ``bar`` in shape
    (with colour >= 0.95 and background >= 0.85). One probe's 4 samples per prompt swing by several
    hundredths (flow seed 2 read 0.91 then 0.87); two of them halve that."""
    if bar <= 0 or len(probes) < 2:
        return False
    # probes are rounded to 4 places; so is their mean, or (0.91 + 0.95) / 2 would fall short of 0.93
    mean = {k: round((probes[-2][1][k] + probes[-1][1][k]) / 2, 4) for k in ("shape", "color", "background")}
    return mean["shape"] >= bar and mean["color"] >= 0.95 and mean["background"] >= 0.85


@dataclass
class TrainConfig:
    seed: int = field(default=0, metadata={"help": "seed of every random choice in training"})
    arch: str = field(default="unet", metadata={
        "help": "'unet' (SD1.5 + IP-Adapter in miniature) or 'flow' (a FLUX-layout rectified-flow "
                "transformer + Redux, bierasing.world.flow); the unet_* and ip_* settings drive the "
                "denoiser and image-branch stages of either"})
    clip_steps: int = 400
    clip_batch: int = 128
    unet_steps: int | None = field(default=None, metadata={
        "help": "most denoiser (UNet or flow transformer) steps; default by world: 5500 UNet, 16000 flow"})
    unet_batch: int = 32
    vision_steps: int | None = field(default=None, metadata={
        "help": "image-encoder (the image branch's CLIP pair) steps; default by world: 1500 UNet, 3000 flow"})
    ip_steps: int = 1800
    ip_batch: int = 32
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the clip, unet and vision stages"})
    ip_lr: float = field(default=3e-3, metadata={
        "help": "peak learning rate of the projector warm start and the image branch. On 2026-12-03, on one "
                "from-scratch UNet: 3e-3 for 1800 steps steered 0.8125 with text + image 0.8625 in 9.3 min, "
                "where 1e-3 for 3600 steps (the earlier default) gave 0.7875 / 0.825 in 21.5 min"})
    warmup: int = 100
    ema: float = field(default=0.995, metadata={"help": "EMA decay of the UNet weights"})
    caption_dropout: float = 0.1
    min_snr_gamma: float = field(default=0.0, metadata={
        "help": "Min-SNR-gamma loss weighting (Hang et al. 2023): per-sample weight "
                "min(SNR, gamma)/(SNR+1) for v-prediction, normalised to mean 1; 0 = plain MSE. "
                "Measured here: gamma 5 with 3400 UNet steps gave shape 0.675 and background 0.65 "
                "(8 samples per prompt), worse than plain MSE; it starves the high-noise steps "
                "where the background is decided"})
    unet_t_power: float = field(default=1.0, metadata={
        "help": "UNet timesteps t = T(1 - u^p), u uniform: p = 1 is uniform, p > 1 draws more of the "
                "noisy timesteps. p 1.5 (with clip_steps 1500, 3500 UNet steps) measured shape 0.09 at step "
                "3000: the shapes were there but ragged, and precision is decided at the less noisy steps"})
    unet_curriculum: int = field(default=0, metadata={
        "help": "the first this many denoiser steps draw shapes near the image centre, their offset "
                "growing linearly to the full range; 0 = off. 1500 on seed 1 (2026-12-05): shape 0.00 "
                "at 500-1500 steps, the words did not bind sooner (docs/shapesworld.md)"})
    unet_edge_weight: float = field(default=3.0, metadata={
        "help": "denoiser loss weight per pixel 1 + this x edge, edge in [0, 1] from the clean image's "
                "Sobel gradient (max-pooled to latents in the flow world), normalised to mean 1; 0 = plain "
                "MSE. 3 (2026-12-05) met every UNet-world bar from seeds 0, 1 and 2, where plain MSE left "
                "seed 1 at shape 0.05 (docs/shapesworld.md)"})
    ip_empty_prompt: float = field(default=0.8, metadata={"help": "share of image-branch steps with an empty prompt"})
    ip_warm_steps: int = field(default=300, metadata={
        "help": "projector warm start: steps regressing image tokens onto concept-word text states"})
    ip_t_power: float = field(default=2.0, metadata={
        "help": "image-branch timesteps t = T(1 - u^p), u uniform: p = 1 is uniform, p = 2 draws 71% of "
                "t from the noisier half, where the exemplar's shape is decided"})
    ip_objective: str = field(default="distill", metadata={
        "help": "image-branch loss: 'distill' (match the text-only UNet given the full caption, at the "
                "UNet's output), 'features' (the same target at the output of the last up block with "
                "cross-attention, where the UNet stops: every later block sees only that output and "
                "unconditioned skips, so the optimum is the same; 0.51 s/step against distill's 0.75-0.89 "
                "on one host), 'hybrid' (features on the empty-prompt rows, distill on the captioned ones; "
                "0.63 s/step). Retraining the shipped branch for 3600 steps: features steered 0.80 and "
                "hybrid 0.875 (distill 0.835), but text + matching exemplar fell to 0.65 and 0.63 (distill "
                "0.90), so distill stays the default; 'attn' (the same target per attn2 layer, on the teacher's own layer "
                "inputs: one no-grad forward a step, 0.23 s/step against distill's 0.73, but on the shipped "
                "UNet it steered 0.55 at 600 steps against 0.645 and kept text + matching exemplar at "
                "0.26-0.36 against 0.90: a separate softmax cannot tell whether a caption is present) "
                "or 'denoise'"})
    probe_every: int = field(default=1000, metadata={
        "help": "every this many UNet steps, a quick detector probe of the EMA weights (4 samples per "
                "shape x colour and per background prompt, on seeds the evaluation does not use; about "
                "40 s on a slow host), logged and kept in world.json; also every this many image-branch "
                "steps when ip_stop_at is set; 0 = never"})
    probe_from: int | None = field(default=None, metadata={
        "help": "the denoiser stage's first probe step (probes only steer the early stop, never the "
                "training), so with the two-probe stop no stop comes before probe_from + probe_every; default "
                "by world: 0 UNet, 11000 flow (its image branch steered reliably only from transformer step 12000)"})
    unet_stop_at: float = field(default=0.93, metadata={
        "help": "the UNet stage ends at the first probe where the mean shape accuracy of it and the "
                "probe before reaches this (with colour >= 0.95 and background >= 0.85), unet_steps "
                "being the most it trains; 0 = always train unet_steps"})
    ip_stop_at: float = field(default=0.0, metadata={
        "help": "the image-branch stage ends at the first probe whose image steering reaches this "
                "(with text + matching exemplar keeping the shape in >= 0.85); 0 = always train ip_steps "
                "(and no probes). Probes (seeds 1000+, 4 samples) read below the 16-sample evaluation: "
                "the 2026-12-03 distill run (lr 1e-3) probed 0.71 / 0.72 at steps 1000 and 2000 and 0.76 / 0.73 "
                "at 3000, and its evaluation at 3600 gave 0.7875 / 0.825"})
    precision: str = field(default="fp32", metadata={
        "help": "forward passes of the UNet and image-branch steps: 'fp32', or 'bf16' (torch.autocast; "
                "weights, optimiser and loss stay fp32; probes and evaluation always run fp32)"})
    vae_steps: int = field(default=800, metadata={
        "help": "flow world: autoencoder steps (batch unet_batch). 600 steps x 128 reconstructed 200 fresh "
                "renders with MSE 0.001 and the detector read shape, colour and background of every one"})
    flow_t_mean: float = field(default=0.0, metadata={
        "help": "flow world: sigma = sigmoid(mean + std z), z normal (SD3's logit-normal draw), then the "
                "world's time shift; a lower mean trains more at low noise, where outlines are drawn. -0.5 on "
                "seed 2 (2026-12-06) put the shape probes about 1000 steps ahead at steps 3000-6000 and level "
                "again by 8000, so the default stays 0; the UNet world has no such draw"})
    flow_t_std: float = field(default=1.0, metadata={"help": "flow world: spread of the logit-normal sigma draw"})
    flow_pooled_dropout: float | None = field(default=None, metadata={
        "help": "flow world: share of transformer steps whose pooled text vector is the empty prompt's while "
                "the tokens keep the caption, so the concepts must be read from the tokens (where Redux adds "
                "its image tokens, as FLUX reads them from T5); default 0.5 (flow), 0 = off"})
    checkpoint_every: int = 250

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name, value in ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.unet_edge_weight < 0:
            raise ValueError(f"unet_edge_weight must be >= 0 (0 = off), got {self.unet_edge_weight}")
        for name in ("ip_t_power", "unet_t_power"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ip_objective not in IP_OBJECTIVES:
            raise ValueError(f"ip_objective must be one of {', '.join(IP_OBJECTIVES)}, got {self.ip_objective!r}")
        for name in ("clip_steps", "unet_steps", "vision_steps", "ip_warm_steps", "ip_steps", "vae_steps",
                     "unet_curriculum", "probe_from"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.flow_pooled_dropout <= 1.0:
            raise ValueError(f"flow_pooled_dropout is a share of steps in [0, 1], got {self.flow_pooled_dropout}")
        if self.arch != "flow" and self.flow_pooled_dropout:
            raise ValueError("flow_pooled_dropout sets the flow world's transformer (arch 'flow'); the UNet "
                             "world has no pooled text vector")
        if self.arch != "flow" and self.flow_t_mean:
            raise ValueError("flow_t_mean sets the flow world's noise-level draw (arch 'flow'); the UNet world "
                             "draws DDPM timesteps (unet_t_power)")
        if not 0.0 <= self.ip_empty_prompt <= 1.0:
            raise ValueError(f"ip_empty_prompt is a share of steps in [0, 1], got {self.ip_empty_prompt}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")
        if self.probe_every < 0:
            raise ValueError(f"probe_every must be >= 0 (0 = never), got {self.probe_every}")
        for name in ("unet_stop_at", "ip_stop_at"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is an accuracy in [0, 1] (0 = off), got {getattr(self, name)}")
        for name in ("lr", "ip_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("clip_batch", "unet_batch", "ip_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    # 1) linear warm-up, 2) cosine decay to 10% of the base rate
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def edge_map(images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, 1, h, w] in [0, 1]: where the clean images (in [0, 1]) have edges, dilated by a pixel.

    Sobel magnitude (max over channels) from 0.05 (above the renders' pixel noise) to full at
    0.25 (an anti-aliased step between any colour and background); max-pooled to ``size``."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
    k = torch.stack([kx, kx.T]).unsqueeze(1).repeat(images.shape[1], 1, 1, 1)
    g = F.conv2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), k, groups=images.shape[1])
    mag = g.view(g.shape[0], -1, 2, *g.shape[2:]).pow(2).sum(2).sqrt().amax(1, keepdim=True)
    edge = F.max_pool2d(((mag - 0.05) / 0.2).clamp(0, 1), 3, stride=1, padding=1)
    if size is not None and tuple(edge.shape[-2:]) != tuple(size):
        edge = F.adaptive_max_pool2d(edge, size)
    return edge


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, images: torch.Tensor, edge_weight: float
                 ) -> torch.Tensor:
    """Per-sample MSE [B]; with ``edge_weight`` > 0 each pixel weighs 1 + edge_weight x edge
    (normalised to mean 1 over the batch)."""
    err = (pred.float() - target).pow(2)
    if edge_weight <= 0:
        return err.mean((1, 2, 3))
    w = 1 + edge_weight * edge_map(images, err.shape[-2:])
    return (err * (w / w.mean())).mean((1, 2, 3))


def _consistency(mentions: list[data.Concepts], truths: list[data.Concepts]) -> torch.Tensor:
    """M[i, j] = 1 if caption i correctly describes image j."""
    m = torch.ones(len(mentions), len(truths))
    for axis in data.AXES:
        cap = [c.get(axis) for c in mentions]
        img = [t.get(axis) for t in truths]
        for i, v in enumerate(cap):
            if v is not None:
                m[i] *= torch.tensor([float(v == w) for w in img])
    return m


def _built_as(module) -> dict:
    """What a network was built as: its tensors' names and shapes (its config also holds numbers
    measured after training, such as a VAE's latent scale)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if "processor." not in k}


class WorldTrainer:
    """Owns the models, optimizers and RNGs of one training run; ``run`` does what is left."""

    STAGES = STAGES
    #: stages whose learning rate is ``ip_lr``; stages that may run under bf16 autocast
    IMAGE_STAGES = ("ip_warm", "ip")
    AUTOCAST_STAGES = _AUTOCAST_STAGES
    #: stages with detector probes
    PROBED = ("unet", "ip")
    #: ``start_from``: the networks each starting stage takes from the given model
    KEEP = {"clip": (), "unet": ("text", "vision"), "vision": ("text", "unet"),
            "ip_warm": ("text", "vision", "unet"), "ip": ("text", "vision", "unet")}

    def __init__(self, out: Path, tcfg: TrainConfig, wcfg: WorldConfig,
                 progress: bool = True, log: Callable[[str], None] = logger.info,
                 should_stop: Callable[[], bool] | None = None):
        self.out, self.tcfg, self.wcfg, self.progress, self.log = Path(out), tcfg, wcfg, progress, log
        self.should_stop = should_stop
        self.tokenizer = build_tokenizer(wcfg.max_text_len)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(tcfg.seed)
            self.bb = self._build_backbone()
            torch.manual_seed(tcfg.seed + 1)  # the image-branch CLIP pair: its own seeded init
            pair = build_models(wcfg, self.tokenizer) if self.tcfg.arch == "unet" else \
                build_encoders(wcfg, self.tokenizer)
        self.aux_text, self.vision_init = pair["text_encoder"], pair["image_encoder"].state_dict()
        self.vision_logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.np_rng = np.random.default_rng(tcfg.seed)
        self.gen = torch.Generator().manual_seed(tcfg.seed)
        self.ema = None
        self.stage, self.step = STAGES[0], 0
        self.history: dict[str, list] = {s: [] for s in self.STAGES}
        self.seconds: dict[str, float] = {s: 0.0 for s in self.STAGES}
        self.probes: dict[str, list] = {s: [] for s in self.PROBED}  # [step, {metric: value}]
        self.stopped_at: dict[str, int] = {}  # stages a probe ended early, and at which step
        self.opt = None
        self._pending_optim = None  # (tensors, meta) of a resumed optimizer, until its stage builds it
        self._word_pos: dict[str, list[int]] = {}
        self.init_from: dict | None = None  # set when the run starts at a later stage of a model

    def _build_backbone(self) -> ShapesWorldBackbone:
        m = build_models(self.wcfg, self.tokenizer)
        return ShapesWorldBackbone(self.tokenizer, m["text_encoder"], m["image_encoder"],
                                   m["unet"], m["scheduler"], m["image_proj"], self.wcfg)

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "train_state.safetensors"

    @staticmethod
    def _modules_of(bb) -> dict:
        """A world's trained networks by checkpoint name."""
        return {"text": bb.text_encoder, "vision": bb.image_encoder, "unet": bb.unet, "proj": bb.image_proj}

    def _modules(self) -> dict:
        return {**self._modules_of(self.bb), "aux_text": self.aux_text}

    def save_checkpoint(self) -> None:
        tensors = {f"{n}.{k}": v for n, mod in self._modules().items()
                   for k, v in mod.state_dict().items()}
        tensors["logit_scale"] = self.logit_scale.detach()
        tensors["vision_logit_scale"] = self.vision_logit_scale.detach()
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        meta = {"stage": self.stage, "step": self.step, "history": self.history, "init_from": self.init_from,
                "seconds": self.seconds, "probes": self.probes, "stopped_at": self.stopped_at, "tcfg": asdict(self.tcfg), "wcfg": asdict(self.wcfg)}
        if self.opt is not None:
            t, m = io.optimizer_to_tensors(self.opt)
            tensors.update(t)
            meta["optim"] = m
        t, m = io.rng_state(self.np_rng, self.gen)
        tensors.update(t)
        meta["rng"] = m
        io.save_checkpoint(self.ckpt_path, tensors, meta)

    def try_resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        tensors, meta = io.load_checkpoint(self.ckpt_path)
        # from_json: a config field added since the checkpoint was written takes its default
        try:
            same_model = type(self.wcfg).from_json(meta["wcfg"]) == self.wcfg
        except (KeyError, TypeError, ValueError):  # the other architecture's config
            same_model = False
        if meta["tcfg"]["seed"] != self.tcfg.seed or not same_model:
            raise ValueError(f"{self.ckpt_path} was written by a run with another seed or model "
                             "config; delete it or use another --out folder")
        now = asdict(self.tcfg)
        changed = {k: (v, now[k]) for k, v in meta["tcfg"].items() if k in now and now[k] != v}
        if changed:  # e.g. a default that changed since the checkpoint was written
            self.log("resuming with training settings that differ from the checkpoint's: "
                     + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        for n, mod in self._modules().items():
            own = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}
            if own or n != "aux_text":  # checkpoints from before the vision stage have no aux tower
                mod.load_state_dict(own)
        with torch.no_grad():
            self.logit_scale.copy_(tensors["logit_scale"])
            if "vision_logit_scale" in tensors:
                self.vision_logit_scale.copy_(tensors["vision_logit_scale"])
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        self.ema = ema or None
        self.stage, self.step = meta["stage"], meta["step"]
        self.history, self.seconds = meta["history"], meta["seconds"]
        self.init_from = meta.get("init_from")
        self.probes = meta.get("probes", self.probes)
        self.stopped_at = meta.get("stopped_at", {})
        for st in self.STAGES:  # checkpoints written before a stage existed
            self.history.setdefault(st, [])
            self.seconds.setdefault(st, 0.0)
        self._pending_optim = (tensors, meta.get("optim"))
        io.restore_rng(tensors, meta["rng"], self.np_rng, self.gen)
        self.log(f"resumed from {self.ckpt_path}: stage {self.stage}, step {self.step}")
        return True

    # ---- stages ------------------------------------------------------------------------------
    def start_from(self, model: str | Path | None, stage: str) -> None:
        """Begin at ``stage`` on the earlier stages' weights of a trained model folder.

        The stages from ``stage`` on start fresh (their own seeded initialisation, as in a run
        from scratch), e.g. ``stage="ip_warm"`` retrains the image branch of a shipped world."""
        if stage not in self.STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(self.STAGES)}")
        src = ShapesWorldBackbone.load(model)
        keep = self.KEEP[stage]
        theirs_by_name, ours_by_name = self._modules_of(src), self._modules_of(self.bb)
        # the retrained networks may be built differently (e.g. a deeper transformer); the kept ones may not
        differ = [n for n in keep if _built_as(theirs_by_name[n]) != _built_as(ours_by_name[n])]
        if src.arch != self.bb.arch or differ:
            raise ValueError(f"{model} was built with another architecture or another "
                             f"{', '.join(differ) or 'model'} config than this run; start at an earlier stage")
        for name in keep:
            theirs, ours = theirs_by_name[name], ours_by_name[name]
            sd = {k: v for k, v in theirs.state_dict().items() if "processor." not in k}
            missing, unexpected = ours.load_state_dict(sd, strict=False)
            assert not unexpected and all("processor." in k for k in missing), (missing, unexpected)
        src_meta = json.loads(world_folder(model).joinpath("world.json").read_text())
        for st in self.STAGES[:self.STAGES.index(stage)]:  # the reused stages keep their recorded cost
            self.seconds[st] = src_meta.get("seconds", {}).get(st, 0.0)
            self.history[st] = src_meta.get("loss_history", {}).get(st, [])
        if stage == "ip":  # skip the warm start, but keep IP-Adapter's K/V initialisation
            self._init_ip_kv_from_text()
        self.stage, self.step = stage, 0
        label = "shipped weights" if model is None else str(model)
        if label not in SHIPPED and model is not None:
            label = str(Path(model).resolve())
        self.init_from = {"model": label, "stage": stage}
        self.log(f"starting at stage {stage} from the weights of {self.init_from['model']}")

    def run(self, init_from: str | Path | None = None, start_stage: str | None = None) -> ShapesWorldBackbone:
        self._pending_optim = None
        if not self.try_resume() and start_stage is not None:
            self.start_from(init_from, start_stage)
        self.out.mkdir(parents=True, exist_ok=True)
        for stage in self.STAGES[self.STAGES.index(self.stage):]:
            if stage != self.stage:
                self.stage, self.step, self.opt, self._pending_optim = stage, 0, None, None
            getattr(self, f"_stage_{stage}")()
        self.stage, self.step = "done", 0
        return self.bb

    def _loop(self, total: int, params: list, step_fn: Callable[[], torch.Tensor],
              after_step: Callable[[], None] | None = None,
              probe: Callable[[], bool] | None = None) -> None:
        """Train to ``total`` steps; ``probe`` (every ``probe_every`` steps) returning True ends
        the stage there, and a resumed run finds it ended."""
        from tqdm.auto import tqdm

        if self.stage in self.stopped_at:
            return

        lr = self.tcfg.ip_lr if self.stage in self.IMAGE_STAGES else self.tcfg.lr
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        if self._pending_optim and self._pending_optim[1] is not None:
            io.optimizer_from_tensors(self.opt, *self._pending_optim)
        self._pending_optim = None
        bar = tqdm(total=total, initial=self.step, desc=f"world/{self.stage}",
                   disable=not self.progress, dynamic_ncols=True)
        amp = self.tcfg.precision == "bf16" and self.stage in self.AUTOCAST_STAGES
        t0 = time.time()
        while self.step < total:
            for g in self.opt.param_groups:
                g["lr"] = _lr_at(self.step, total, lr, self.tcfg.warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = step_fn().float()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.stage} loss became {loss.item()} at step {self.step}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            if after_step:
                after_step()
            self.step += 1
            if self.step % 50 == 0 or self.step == total:
                self.history[self.stage].append([self.step, round(loss.item(), 5)])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            stop = self.should_stop is not None and self.should_stop()
            if stop or self.step % self.tcfg.checkpoint_every == 0 or self.step == total:
                self.seconds[self.stage] += time.time() - t0
                t0 = time.time()
                self.save_checkpoint()
            every = self.tcfg.probe_every
            first = 0 if self.stage in self.IMAGE_STAGES else self.tcfg.probe_from
            if probe is not None and every and self.step % every == 0 and first <= self.step < total:
                done = probe()
                self.seconds[self.stage] += time.time() - t0
                t0 = time.time()
                if done:
                    self.stopped_at[self.stage] = self.step
                    self.save_checkpoint()
                    bar.close()
                    self.log(f"{self.stage}: the probe met its bar at step {self.step} of {total}; stage done")
                    return
            if stop:
                bar.close()
                raise TrainingInterrupted(f"stopped at {self.stage} step {self.step}; "
                                          f"run again with the same --out to resume from {self.ckpt_path}")
        bar.close()

    def _batch(self, n: int, spread: float = 1.0, **caption_kwargs):
        imgs, caps, truths, mentions = data.sample_batch(n, self.np_rng, caption_kwargs or None, spread)
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, caps, truths, mentions

    def _timesteps(self, n: int, power: float) -> torch.Tensor:
        """t = T(1 - u^power), u uniform; power 1 is the uniform DDPM draw."""
        T = self.bb.num_train_timesteps
        if power == 1.0:
            return torch.randint(0, T, (n,), generator=self.gen)
        u = torch.rand(n, generator=self.gen)
        return (T * (1 - u ** power)).long().clamp(0, T - 1)

    def _denoising_loss(self, images: torch.Tensor, text: torch.Tensor,
                        tokens: torch.Tensor | None = None, t_power: float = 1.0) -> torch.Tensor:
        """Diffusion loss on DDPM-noised images, in the model's own prediction type."""
        bb, g = self.bb, self.gen
        x0 = bb.to_x(images)
        noise = torch.randn(x0.shape, generator=g)
        t = self._timesteps(x0.shape[0], t_power)
        x_t = bb.add_noise(x0, noise, t)
        a = bb.alphas_cumprod[t].view(-1, 1, 1, 1)
        v_pred = bb.prediction_type == "v_prediction"
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        err = weighted_mse(bb.model_output(x_t, t, text, tokens), target, images, self.tcfg.unet_edge_weight)
        gamma = self.tcfg.min_snr_gamma
        if gamma <= 0:
            return err.mean()
        # Min-SNR-gamma: caps the weight of nearly-clean timesteps (high SNR)
        snr = (a / (1 - a)).view(-1)
        w = snr.clamp(max=gamma) / (snr + 1 if v_pred else snr)
        return (w * err).sum() / w.sum()

    def _contrastive(self, text_model, image_model, logit_scale, steps: int) -> None:
        """Multi-positive InfoNCE between captions and images (a caption is a positive for every
        image it correctly describes)."""
        params = list(image_model.parameters()) + list(text_model.parameters()) + [logit_scale]
        for mod in (text_model, image_model):
            mod.train().requires_grad_(True)

        def step():
            images, caps, truths, mentions = self._batch(self.tcfg.clip_batch)
            ids = self.bb.tokenize(caps)
            t = F.normalize(text_model(input_ids=ids).text_embeds, dim=-1)
            i = F.normalize(image_model(pixel_values=images * 2 - 1).image_embeds, dim=-1)
            logits = logit_scale.exp().clamp(max=100) * t @ i.T
            m = _consistency(mentions, truths)
            l_t2i = -(m / m.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            l_i2t = -(m.T / m.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
            return (l_t2i + l_i2t) / 2

        self._loop(steps, params, step)
        for mod in (text_model, image_model):
            mod.eval().requires_grad_(False)

    def _stage_clip(self) -> None:
        self._contrastive(self.bb.text_encoder, self.bb.image_encoder, self.logit_scale, self.tcfg.clip_steps)

    def _stage_vision(self) -> None:
        if self.step == 0:  # a fresh CLIP pair (not resumed mid-stage)
            self.bb.image_encoder.load_state_dict(self.vision_init)
        self._contrastive(self.aux_text, self.bb.image_encoder, self.vision_logit_scale, self.tcfg.vision_steps)

    def _denoiser_loss(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self._denoising_loss(images, text, t_power=self.tcfg.unet_t_power)

    def _stage_unet(self) -> None:
        """The denoiser on its own loss (``_denoiser_loss``), EMA weights kept, probed."""
        bb = self.bb
        bb.text_encoder.eval().requires_grad_(False)
        bb.image_encoder.eval().requires_grad_(False)
        unet = bb.unet.train()
        params = [p for n, p in unet.named_parameters() if "processor." not in n]
        for n, p in unet.named_parameters():
            p.requires_grad_("processor." not in n)
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        names = [n for n, _ in unet.named_parameters() if "processor." not in n]
        g = self.gen

        def step():
            ramp = self.tcfg.unet_curriculum
            spread = min(1.0, self.step / ramp) if ramp else 1.0
            images, caps, _, _ = self._batch(self.tcfg.unet_batch, spread)
            drop = torch.rand(len(caps), generator=g) < self.tcfg.caption_dropout
            caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
            with torch.no_grad():
                text = bb.encode_text(caps)
            return self._denoiser_loss(images, text)

        def ema_update():
            with torch.no_grad():
                torch._foreach_lerp_([self.ema[k] for k in names], [p.detach() for p in params],
                                     1 - self.tcfg.ema)

        def probe():
            live = {k: v.clone() for k, v in unet.state_dict().items()}
            unet.load_state_dict(self.ema)
            try:
                self._probe("text")
            finally:
                unet.load_state_dict(live)
                unet.train()
            return denoiser_bar_met(self.probes[self.stage], self.tcfg.unet_stop_at)

        self._loop(self.tcfg.unet_steps, params, step, ema_update, probe)
        unet.load_state_dict(self.ema)  # sample (and train the image branch) with the EMA weights
        self.ema = None

    def _exemplars(self, truths: list[data.Concepts]) -> torch.Tensor:
        """A fresh render of each image's concepts (new position, size and noise)."""
        refs = np.stack([data.render(c.shape, c.color, c.background, self.np_rng) for c in truths])
        return torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 255

    def _image_branch_batch(self, n: int):
        """Images, their captions (``ip_empty_prompt`` of them emptied), concepts, a fresh exemplar
        of each and the empty-caption mask: one batch of an image-branch stage."""
        images, caps, truths, _ = self._batch(n)
        refs = self._exemplars(truths)
        empty = torch.rand(n, generator=self.gen) < self.tcfg.ip_empty_prompt
        return images, ["" if e else c for c, e in zip(caps, empty.tolist())], truths, refs, empty

    def _concept_word_states(self, truths: list[data.Concepts]) -> torch.Tensor:
        """Text-encoder hidden states of each caption's concept words, [B, ip_tokens, D]."""
        bb, n_tok = self.bb, self.wcfg.ip_tokens
        caps = [data.prompt(c.shape, c.color, c.background) for c in truths]
        states = bb.encode_text(caps)
        rows = []
        for cap, c, h in zip(caps, truths, states):
            if cap not in self._word_pos:
                words = [data.COLOR_WORDS[c.color][0], data.SHAPE_WORDS[c.shape][0],
                         data.BACKGROUND_WORDS[c.background][0], "background"]
                pos = [p for w in words for p in bb.word_positions(cap, w)]
                self._word_pos[cap] = (pos * n_tok)[:n_tok]  # ip_tokens != 4: repeat or cut
            rows.append(h[self._word_pos[cap]])
        return torch.stack(rows)

    def _init_ip_kv_from_text(self) -> None:
        """IP-Adapter's initialisation: the image K/V start as copies of the text K/V."""
        unet = self.bb.unet
        with torch.no_grad():
            for name, proc in unet.attn_processors.items():
                if hasattr(proc, "to_k_ip"):
                    attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
                    proc.to_k_ip.weight.copy_(attn.to_k.weight)
                    proc.to_v_ip.weight.copy_(attn.to_v.weight)

    def _stage_ip_warm(self) -> None:
        bb = self.bb
        if self.step == 0:
            self._init_ip_kv_from_text()
        params = list(bb.image_proj.parameters())
        bb.image_proj.train().requires_grad_(True)

        def step():
            images, _, truths, _ = self._batch(self.tcfg.clip_batch)
            with torch.no_grad():
                embeds = bb.embed_images(images)
                target = self._concept_word_states(truths)
            return F.mse_loss(bb.image_proj(embeds), target)

        self._loop(self.tcfg.ip_warm_steps, params, step)

    def _stage_ip(self) -> None:
        bb = self.bb
        unet = bb.unet.eval()
        for n, p in unet.named_parameters():
            p.requires_grad_("processor." in n)
        params = [p for n, p in unet.named_parameters() if "processor." in n]
        params += list(bb.image_proj.parameters())
        bb.image_proj.train().requires_grad_(True)
        g = self.gen

        def step():
            n = self.tcfg.ip_batch
            images, caps, truths, refs, empty = self._image_branch_batch(n)
            with torch.no_grad():
                text = bb.encode_text(caps)
                embeds = bb.embed_images(refs)
            if self.tcfg.ip_objective == "denoise":
                return self._denoising_loss(images, text, bb.image_proj(embeds))
            x0 = bb.to_x(images)
            noise = torch.randn(x0.shape, generator=g)
            t = self._timesteps(n, self.tcfg.ip_t_power)
            x_t = bb.add_noise(x0, noise, t)
            with torch.no_grad():
                full = bb.encode_text([data.prompt(c.shape, c.color, c.background) for c in truths])
            if self.tcfg.ip_objective == "attn":
                return self._attn_distill_loss(x_t, t, full, text, bb.image_proj(embeds))
            if self.tcfg.ip_objective in ("features", "hybrid"):
                by_features = empty if self.tcfg.ip_objective == "hybrid" else torch.ones_like(empty)
                return self._hybrid_loss(x_t, t, full, text, bb.image_proj(embeds), by_features)
            with torch.no_grad():  # the text-only teacher: the same UNet, no image tokens
                target = bb.model_output(x_t, t, full)
            return F.mse_loss(bb.model_output(x_t, t, text, bb.image_proj(embeds)).float(), target)

        def probe():
            try:
                q = self._probe("image")
            finally:
                bb.image_proj.train()
            return 0 < self.tcfg.ip_stop_at <= q["image_steer"] and q["text_image"] >= 0.85

        self._loop(self.tcfg.ip_steps, params, step, probe=probe if self.tcfg.ip_stop_at > 0 else None)

    def _probe(self, part: str) -> dict:
        from .evaluate import probe_world

        self.bb.unet.eval()
        self.bb.image_proj.eval()
        with torch.no_grad():
            grid = self.out / "probes" / f"{self.stage}_{self.step:05d}.png" if part == "text" else None
            q = probe_world(self.bb, part, grid=grid)
        self.probes[self.stage].append([self.step, q])
        self.log(f"probe at {self.stage} step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
        return q

    def _hybrid_loss(self, x_t, t, full, text, tokens, by_features: torch.Tensor) -> torch.Tensor:
        """'features' on the rows ``by_features`` marks (hybrid: those with an empty prompt; all of
        them for 'features'), 'distill' on the others; each a relative error (MSE over the
        target's variance), weighted by its share of rows."""
        bb, n = self.bb, len(by_features)
        loss = x_t.new_zeros(())
        for rows, run in ((by_features, self._last_cross_attn_features), (~by_features, bb.model_output)):
            idx = rows.nonzero().flatten()
            if len(idx) == 0:
                continue
            with torch.no_grad():
                target = run(x_t[idx], t[idx], full[idx])
            student = run(x_t[idx], t[idx], text[idx], tokens[idx])
            loss = loss + len(idx) / n * (student - target).pow(2).mean() / target.var().clamp_min(1e-8)
        return loss

    def _last_cross_attn_features(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                                  tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The output of the last up block with cross-attention; the UNet stops there.

        Every later up block takes only that output and skip connections from down blocks
        without cross-attention, which neither the text nor the image tokens reach, so matching
        the teacher here matches the whole network, at a fraction of the cost: the full-
        resolution up blocks, most of a step's time, are neither run nor back-propagated."""
        unet = self.bb.unet
        last = max(i for i, b in enumerate(unet.up_blocks) if getattr(b, "has_cross_attention", False))
        n_skips = sum(len(b.resnets) for b in unet.up_blocks[:last + 1])
        # up blocks take skips from the end of the down path; the ones left for the blocks after
        # `last` must all come from before the first cross-attention down block
        first = min(i for i, b in enumerate(unet.down_blocks) if getattr(b, "has_cross_attention", False))
        free = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks[:first])
        total = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
        if total - n_skips > free:
            raise RuntimeError("the up blocks after the last cross-attention one see conditioned skips")

        def stop(module, args, output):
            raise _EarlyExit(output)

        hook = unet.up_blocks[last].register_forward_hook(stop)
        try:
            self.bb.model_output(x_t, t, text, tokens)
        except _EarlyExit as e:
            return e.output
        finally:
            hook.remove()
        raise RuntimeError("the UNet returned without running its last cross-attention up block")

    def _attn_distill_loss(self, x_t: torch.Tensor, t: torch.Tensor, full: torch.Tensor,
                           text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Layer-local distillation of the image branch, without a backward through the UNet.

        One no-grad forward of the text-only UNet given the full caption records, at every attn2
        layer, its input (the queries' source) and its output.  The student is the same layer on
        the same input, with the student's text (mostly empty) plus the image tokens; its output
        regresses onto the recorded one (MSE relative to the output's variance, averaged over
        layers).  The first attn2 layer's input does not depend on the text at all, and each
        later one's does only through the layers before it, so matching every layer on the
        teacher's inputs matches the whole network."""
        layers = list(self.bb.attn2_modules().values())
        seen: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
                 for m in layers]
        try:
            with torch.no_grad():
                self.bb.model_output(x_t, t, full)
        finally:
            for h in hooks:
                h.remove()
        if len(seen) != len(layers):
            raise RuntimeError(f"recorded {len(seen)} attn2 calls for {len(layers)} layers")
        loss = x_t.new_zeros(())
        for m, h, target in seen:
            out = m(h, encoder_hidden_states=text, ip_hidden_states=tokens)
            loss = loss + (out - target).pow(2).mean() / target.var().clamp_min(1e-8)
        return loss / len(layers)


def train_world(out: str | Path, tcfg: TrainConfig | None = None, wcfg: WorldConfig | None = None,
                progress: bool = True, log: Callable[[str], None] = logger.info,
                should_stop: Callable[[], bool] | None = None, init_from: str | Path | None = None,
                start_stage: str | None = None) -> ShapesWorldBackbone:
    """Train (or resume) a ShapesWorld model into ``out``/model; returns the trained backbone.

    ``start_stage`` (with ``init_from``, a model folder or None for the shipped weights) skips
    the stages before it and takes their weights from that model."""
    tcfg = tcfg or TrainConfig()
    if tcfg.arch == "flow":
        from .flow import FlowWorldConfig
        from .flow_train import FlowWorldTrainer as trainer_cls

        wcfg = wcfg or FlowWorldConfig()
    else:
        trainer_cls, wcfg = WorldTrainer, wcfg or WorldConfig()
    trainer = trainer_cls(Path(out), tcfg, wcfg, progress, log, should_stop)
    bb = trainer.run(init_from, start_stage).eval()
    meta = {"train": asdict(tcfg), "seconds": trainer.seconds, "loss_history": trainer.history,
            "probes": trainer.probes, "stopped_at": trainer.stopped_at,
            "init_from": trainer.init_from,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    bb.save(Path(out) / "model", extra=meta)
    return bb
