"""Train ShapesWorld-Flow (``bierasing world train --arch flow``): the UNet world's recipe on a
FLUX-layout transformer.

Stages (seeded and resumable like the UNet world's, see :mod:`bierasing.world.train`):
  1. clip   - the same contrastive text and image encoders;
  2. flow   - rectified flow matching: x_s = (1 - s) x0 + s n, the transformer regresses the
              velocity n - x0, s drawn logit-normal (SD3); 10% caption dropout for CFG; EMA weights;
              detector probes end the stage early (``unet_steps``, ``unet_stop_at``);
  3. vision - the image branch's own CLIP pair, as in the UNet world;
  4. redux  - only the Redux projector trains (BFL trained Redux on a frozen FLUX): the student
              (caption or empty prompt + Redux tokens of a *different* render of the same concepts)
              regresses onto the frozen text-only transformer given the exemplar's full caption,
              s drawn towards high noise (``ip_t_power``), ``ip_steps`` at ``ip_lr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data
from .flow import FlowWorldBackbone, build_flow_models
from .train import WorldTrainer


class FlowWorldTrainer(WorldTrainer):
    STAGES = ("clip", "flow", "vision", "redux")
    IMAGE_STAGES = ("redux",)
    AUTOCAST_STAGES = ("flow", "redux")
    PROBED = ("flow", "redux")
    KEEP = {"clip": (), "flow": ("text", "vision"), "vision": ("text", "unet"),
            "redux": ("text", "vision", "unet")}

    def _build_backbone(self) -> FlowWorldBackbone:
        m = build_flow_models(self.wcfg, self.tokenizer)
        return FlowWorldBackbone(self.tokenizer, m["text_encoder"], m["image_encoder"], m["transformer"],
                                 m["redux"], self.wcfg)

    def _flow_state(self, images: torch.Tensor, sigma: torch.Tensor):
        x0 = self.bb.to_x(images)
        noise = torch.randn(x0.shape, generator=self.gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, noise - x0

    def _denoiser_loss(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        z = torch.randn(images.shape[0], generator=self.gen)
        sigma = torch.sigmoid(self.tcfg.flow_t_mean + self.tcfg.flow_t_std * z)
        x, v = self._flow_state(images, sigma)
        return F.mse_loss(self.bb.velocity(x, sigma, text).float(), v)

    _stage_flow = WorldTrainer._stage_unet

    def _stage_redux(self) -> None:
        bb = self.bb
        bb.unet.eval().requires_grad_(False)
        redux = bb.image_proj.train().requires_grad_(True)
        g = self.gen

        def step():
            n = self.tcfg.ip_batch
            images, caps, truths, _ = self._batch(n)
            refs = self._exemplars(truths)
            empty = torch.rand(n, generator=g) < self.tcfg.ip_empty_prompt
            caps = ["" if e else c for c, e in zip(caps, empty.tolist())]
            with torch.no_grad():
                text = bb.encode_text(caps)
                full = bb.encode_text([data.prompt(c.shape, c.color, c.background) for c in truths])
                states = bb.hidden_states_of_images(refs)
            sigma = 1 - torch.rand(n, generator=g) ** self.tcfg.ip_t_power  # towards high noise
            x, _ = self._flow_state(images, sigma)
            with torch.no_grad():  # the text-only teacher: the same transformer, no image tokens
                target = bb.velocity(x, sigma, full)
            return F.mse_loss(bb.velocity(x, sigma, text, redux(states)).float(), target)

        def probe():
            try:
                q = self._probe("image")
            finally:
                redux.train()
            return 0 < self.tcfg.ip_stop_at <= q["image_steer"] and q["text_image"] >= 0.85

        self._loop(self.tcfg.ip_steps, list(redux.parameters()), step,
                   probe=probe if self.tcfg.ip_stop_at > 0 else None)
