"""Train ShapesWorld-Flow (``bierasing world train --arch flow``): the UNet world's recipe on a
FLUX-layout transformer.

Stages (seeded and resumable like the UNet world's, see :mod:`bierasing.world.train`):
  1. clip   - the same contrastive text and image encoders;
  2. vae    - an AutoencoderKL, 32x32 RGB <-> 4x8x8 latents (reconstruction MSE + a small KL term);
              its shift and scaling factors are then set from 512 fixed renders (as FLUX's VAE has);
  3. flow   - rectified flow matching on the latents: x_s = (1 - s) x0 + s n, the transformer
              regresses the velocity n - x0, s drawn logit-normal (SD3) and time-shifted by the
              world's ``shift`` (as its sampler is); 10% caption dropout for CFG; EMA weights;
              detector probes end the stage early (``unet_steps``, ``unet_stop_at``);
  4. vision - the image branch's own CLIP pair, as in the UNet world;
  5. redux  - only the Redux projector trains (BFL trained Redux on a frozen FLUX): the student
              (caption or empty prompt + Redux tokens of a *different* render of the same concepts)
              regresses onto the frozen text-only transformer given the exemplar's full caption,
              s drawn towards high noise (``ip_t_power``), ``ip_steps`` at ``ip_lr``.

Two pixel-space attempts came first (4x4-pixel patches, 64 image tokens, same transformer): they
drew blobs of the right colour and no shape at all (detector probes: shape 0.00 at every 1000
steps to 4000 with shift 1 and to 7000 with shift 3; shift 3 lifted background from 0.53-0.67 to
0.97-1.00). Each token had to paint a 4x4x3 patch with a linear head, so edges came out at patch
granularity; a convolutional decoder from an 8x8 latent draws them, as FLUX's VAE does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import flux
from . import data
from .flow import FlowWorldBackbone, build_flow_models
from .train import WorldTrainer, weighted_mse


class FlowWorldTrainer(WorldTrainer):
    STAGES = ("clip", "vae", "flow", "vision", "redux")
    IMAGE_STAGES = ("redux",)
    AUTOCAST_STAGES = ("flow", "redux")
    PROBED = ("flow", "redux")
    KEEP = {"clip": (), "vae": ("text", "vision"), "flow": ("text", "vision", "vae"),
            "vision": ("text", "vae", "unet"), "redux": ("text", "vision", "vae", "unet")}

    _empty_pooled: torch.Tensor | None = None

    def _build_backbone(self) -> FlowWorldBackbone:
        m = build_flow_models(self.wcfg, self.tokenizer)
        return FlowWorldBackbone(self.tokenizer, m["text_encoder"], m["image_encoder"], m["vae"],
                                 m["transformer"], m["redux"], self.wcfg)

    @staticmethod
    def _modules_of(bb) -> dict:
        return {**WorldTrainer._modules_of(bb), "vae": bb.vae}

    def _stage_vae(self) -> None:
        """The autoencoder: reconstruction MSE plus a small KL term (as latent-diffusion VAEs)."""
        vae = self.bb.vae.train().requires_grad_(True)

        def step():
            images = self._batch(self.tcfg.unet_batch)[0] * 2 - 1
            post = vae.encode(images).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen)
            return F.mse_loss(vae.decode(z).sample, images) + 1e-6 * post.kl().mean()

        self._loop(self.tcfg.vae_steps, list(vae.parameters()), step)
        vae.eval().requires_grad_(False)

    def _set_latent_scale(self) -> None:
        """FLUX-style shift and scaling factors (latents ~ zero mean, unit variance), from 512 fixed
        renders: the same numbers whether the run was resumed or not."""
        vae = self.bb.vae.eval().requires_grad_(False)
        imgs, _, _, _ = data.sample_batch(512, np.random.default_rng(self.tcfg.seed + 2))
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 * 2 - 1).latent_dist.mean
        vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())

    def _flow_state(self, images: torch.Tensor, sigma: torch.Tensor):
        with torch.no_grad():
            x0 = self.bb.to_x(images)
        noise = torch.randn(x0.shape, generator=self.gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, noise - x0

    def _denoiser_loss(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        z = torch.randn(images.shape[0], generator=self.gen)
        sigma = flux.shift_sigmas(torch.sigmoid(self.tcfg.flow_t_mean + self.tcfg.flow_t_std * z), self.wcfg.shift)
        x, v = self._flow_state(images, sigma)
        p = self.tcfg.flow_pooled_dropout
        if p > 0:  # (no draw at 0: earlier runs resume on the same random stream)
            drop = torch.rand(len(text), generator=self.gen) < p
            if self._empty_pooled is None:  # the text encoder is frozen from the flow stage on
                with torch.no_grad():
                    self._empty_pooled = self.bb.encode_text([""])[0, -1]
            text = text.clone()
            text[drop, -1] = self._empty_pooled
        return weighted_mse(self.bb.velocity(x, sigma, text), v, images, self.tcfg.unet_edge_weight).mean()

    def _stage_flow(self) -> None:
        self._set_latent_scale()
        self._stage_unet()

    def _stage_redux(self) -> None:
        self._set_latent_scale()
        bb = self.bb
        bb.unet.eval().requires_grad_(False)
        redux = bb.image_proj.train().requires_grad_(True)
        g = self.gen

        def step():
            n = self.tcfg.ip_batch
            images, caps, truths, refs, _ = self._image_branch_batch(n)
            with torch.no_grad():
                text = bb.encode_text(caps)
                full = bb.encode_text([data.prompt(c.shape, c.color, c.background) for c in truths])
                states = bb.hidden_states_of_images(refs)
            sigma = 1 - torch.rand(n, generator=g) ** self.tcfg.ip_t_power  # towards high noise
            x, _ = self._flow_state(images, sigma)
            with torch.no_grad():  # the text-only teacher: the same transformer, no image tokens
                target = bb.velocity(x, sigma, full)
            return F.mse_loss(bb.velocity(x, sigma, text, bb.redux_tokens_of(states)).float(), target)

        def probe():
            try:
                q = self._probe("image")
            finally:
                redux.train()
            return 0 < self.tcfg.ip_stop_at <= q["image_steer"] and q["text_image"] >= 0.85

        self._loop(self.tcfg.ip_steps, list(redux.parameters()), step,
                   probe=probe if self.tcfg.ip_stop_at > 0 else None)
