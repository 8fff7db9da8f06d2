"""Train ShapesWorld from scratch: CLIP-like encoders, then the UNet, then the image branch.

    bierasing world train --out runs/world      (resumes from runs/world/train_state.safetensors)

Stages (each seeded, each resumable from a checkpoint written every ``checkpoint_every`` steps):
  1. clip  - text and image encoders trained contrastively; a caption is a positive for every
             image it correctly describes (captions mention only some of the three axes);
  2. unet  - v-prediction loss on DDPM-noised images, frozen text encoder, 10% caption dropout
             for classifier-free guidance, EMA weights kept for sampling;
  3. vision - the image encoder of the image branch: a fresh CLIP pair (image encoder + its own
             text tower, discarded afterwards) trained contrastively for longer. As in SD1.5 +
             IP-Adapter, where the image encoder (OpenCLIP ViT-H) is not the text encoder's CLIP
             (ViT-L), the UNet's text encoder stays as it is. The short clip stage leaves shape weak
             in the pooled embeddings (shape zero-shot 0.56, shape text embeddings at cosine
             0.92-0.98), and the image branch can only pass on what the image embedding holds;
  4. ip    - image projector + to_k_ip/to_v_ip in every attn2 trained on the frozen EMA UNet;
             the exemplar is a *different* render of the same concepts (so the branch carries
             concepts, not pixels), and half of the captions are empty (an image alone steers).
"""

from __future__ import annotations

import json
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
from .models import ShapesWorldBackbone, WorldConfig, build_models, build_tokenizer

STAGES = ("clip", "unet", "vision", "ip")


class TrainingInterrupted(RuntimeError):
    """Raised when ``should_stop`` asked to stop; the checkpoint written just before resumes it."""


@dataclass
class TrainConfig:
    seed: int = field(default=0, metadata={"help": "seed of every random choice in training"})
    clip_steps: int = 400
    clip_batch: int = 128
    unet_steps: int = 5500
    unet_batch: int = 32
    vision_steps: int = 1500
    ip_steps: int = 1000
    ip_batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = field(default=0.995, metadata={"help": "EMA decay of the UNet weights"})
    caption_dropout: float = 0.1
    ip_empty_prompt: float = field(default=0.5, metadata={"help": "share of image-branch steps with an empty prompt"})
    checkpoint_every: int = 500

    def __post_init__(self):
        for name in ("clip_steps", "unet_steps", "vision_steps", "ip_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip_batch", "unet_batch", "ip_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    # 1) linear warm-up, 2) cosine decay to 10% of the base rate
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


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


class WorldTrainer:
    """Owns the models, optimizers and RNGs of one training run; ``run`` does what is left."""

    def __init__(self, out: Path, tcfg: TrainConfig, wcfg: WorldConfig,
                 progress: bool = True, log: Callable[[str], None] = print,
                 should_stop: Callable[[], bool] | None = None):
        self.out, self.tcfg, self.wcfg, self.progress, self.log = Path(out), tcfg, wcfg, progress, log
        self.should_stop = should_stop
        self.tokenizer = build_tokenizer(wcfg.max_text_len)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(tcfg.seed)
            m = build_models(wcfg, self.tokenizer)
            torch.manual_seed(tcfg.seed + 1)  # the image-branch CLIP pair: its own seeded init
            pair = build_models(wcfg, self.tokenizer)
        self.aux_text, self.vision_init = pair["text_encoder"], pair["image_encoder"].state_dict()
        self.vision_logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.bb = ShapesWorldBackbone(self.tokenizer, m["text_encoder"], m["image_encoder"],
                                      m["unet"], m["scheduler"], m["image_proj"], wcfg)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.np_rng = np.random.default_rng(tcfg.seed)
        self.gen = torch.Generator().manual_seed(tcfg.seed)
        self.ema = None
        self.stage, self.step = STAGES[0], 0
        self.history: dict[str, list] = {s: [] for s in STAGES}
        self.seconds: dict[str, float] = {s: 0.0 for s in STAGES}
        self.opt = None

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "train_state.safetensors"

    def _modules(self) -> dict:
        return {"text": self.bb.text_encoder, "vision": self.bb.image_encoder,
                "unet": self.bb.unet, "proj": self.bb.image_proj, "aux_text": self.aux_text}

    def save_checkpoint(self) -> None:
        tensors = {f"{n}.{k}": v for n, mod in self._modules().items()
                   for k, v in mod.state_dict().items()}
        tensors["logit_scale"] = self.logit_scale.detach()
        tensors["vision_logit_scale"] = self.vision_logit_scale.detach()
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        meta = {"stage": self.stage, "step": self.step, "history": self.history,
                "seconds": self.seconds, "tcfg": asdict(self.tcfg), "wcfg": asdict(self.wcfg)}
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
        if meta["tcfg"]["seed"] != self.tcfg.seed or meta["wcfg"] != json.loads(json.dumps(asdict(self.wcfg))):
            raise ValueError(f"{self.ckpt_path} was written by a run with another seed or model "
                             "config; delete it or use another --out folder")
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
        self._pending_optim = (tensors, meta.get("optim"))
        io.restore_rng(tensors, meta["rng"], self.np_rng, self.gen)
        self.log(f"resumed from {self.ckpt_path}: stage {self.stage}, step {self.step}")
        return True

    # ---- stages ------------------------------------------------------------------------------
    def run(self) -> ShapesWorldBackbone:
        self.out.mkdir(parents=True, exist_ok=True)
        self._pending_optim = None
        self.try_resume()
        for stage in STAGES[STAGES.index(self.stage):]:
            if stage != self.stage:
                self.stage, self.step, self.opt, self._pending_optim = stage, 0, None, None
            getattr(self, f"_stage_{stage}")()
        self.stage, self.step = "done", 0
        return self.bb

    def _loop(self, total: int, params: list, step_fn: Callable[[], torch.Tensor],
              after_step: Callable[[], None] | None = None) -> None:
        from tqdm.auto import tqdm

        self.opt = torch.optim.AdamW(params, lr=self.tcfg.lr, weight_decay=0.0)
        if self._pending_optim and self._pending_optim[1] is not None:
            io.optimizer_from_tensors(self.opt, *self._pending_optim)
        self._pending_optim = None
        bar = tqdm(total=total, initial=self.step, desc=f"world/{self.stage}",
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.time()
        while self.step < total:
            for g in self.opt.param_groups:
                g["lr"] = _lr_at(self.step, total, self.tcfg.lr, self.tcfg.warmup)
            loss = step_fn()
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
            if stop:
                bar.close()
                raise TrainingInterrupted(f"stopped at {self.stage} step {self.step}; "
                                          f"run again with the same --out to resume from {self.ckpt_path}")
        bar.close()

    def _batch(self, n: int, **caption_kwargs):
        imgs, caps, truths, mentions = data.sample_batch(n, self.np_rng, caption_kwargs or None)
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, caps, truths, mentions

    def _denoising_loss(self, images: torch.Tensor, text: torch.Tensor,
                        tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on DDPM-noised images, in the model's own prediction type."""
        bb, g = self.bb, self.gen
        x0 = bb.to_x(images)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, bb.num_train_timesteps, (x0.shape[0],), generator=g)
        x_t = bb.add_noise(x0, noise, t)
        a = bb.alphas_cumprod[t].view(-1, 1, 1, 1)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if bb.prediction_type == "v_prediction" else noise
        return F.mse_loss(bb.model_output(x_t, t, text, tokens).float(), target)

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

    def _stage_unet(self) -> None:
        bb = self.bb
        bb.text_encoder.eval().requires_grad_(False)
        bb.image_encoder.eval().requires_grad_(False)
        unet = bb.unet.train()
        params = [p for n, p in unet.named_parameters() if "processor." not in n]
        for n, p in unet.named_parameters():
            p.requires_grad_("processor." not in n)
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        named = dict(unet.named_parameters())
        g = self.gen

        def step():
            images, caps, _, _ = self._batch(self.tcfg.unet_batch)
            drop = torch.rand(len(caps), generator=g) < self.tcfg.caption_dropout
            caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
            with torch.no_grad():
                text = bb.encode_text(caps)
            return self._denoising_loss(images, text)

        def ema_update():
            d = self.tcfg.ema
            with torch.no_grad():
                for k, p in named.items():
                    if "processor." not in k:
                        self.ema[k].mul_(d).add_(p.detach(), alpha=1 - d)

        self._loop(self.tcfg.unet_steps, params, step, ema_update)
        unet.load_state_dict(self.ema)  # sample (and train the image branch) with the EMA weights
        self.ema = None

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
            images, caps, truths, _ = self._batch(n)
            refs = np.stack([data.render(c.shape, c.color, c.background, self.np_rng) for c in truths])
            refs = torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 255
            empty = torch.rand(n, generator=g) < self.tcfg.ip_empty_prompt
            caps = ["" if e else c for c, e in zip(caps, empty.tolist())]
            with torch.no_grad():
                text = bb.encode_text(caps)
                embeds = bb.embed_images(refs)
            tokens = bb.image_proj(embeds)
            return self._denoising_loss(images, text, tokens)

        self._loop(self.tcfg.ip_steps, params, step)


def train_world(out: str | Path, tcfg: TrainConfig | None = None, wcfg: WorldConfig | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                should_stop: Callable[[], bool] | None = None) -> ShapesWorldBackbone:
    """Train (or resume) a ShapesWorld model into ``out``/model; returns the trained backbone."""
    tcfg, wcfg = tcfg or TrainConfig(), wcfg or WorldConfig()
    trainer = WorldTrainer(Path(out), tcfg, wcfg, progress, log, should_stop)
    bb = trainer.run().eval()
    meta = {"train": asdict(tcfg), "seconds": trainer.seconds, "loss_history": trainer.history,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    bb.save(Path(out) / "model", extra=meta)
    return bb
