"""The erasure loop: one UNet, adapters toggled for the teacher, every teacher row in one forward.

    result = erase(backbone, [Concept("circle", "square", neg_images, pos_images)], EraseConfig())
    result.save("erase_circle.safetensors")
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, io
from .. import methods as registry
from ..backbone import Backbone
from . import xt as xt_sources
from .adapters import AdapterSet
from .config import AUTO, AUTO_INT, CONTEXTS_AUTO, MICRO_AUTO_PARAMS, EraseConfig
from .export import save_erasure
from .objectives import (LossWeights, branch_weights, erasure_loss, loss_targets, timestep_weights,
                         velocity_weights)


class ErasureInterrupted(RuntimeError):
    """``should_stop`` asked to stop; a checkpoint was written if a path was given."""


#: longest concept / safe-alternative text accepted (a phrase, not a paragraph)
MAX_CONCEPT_CHARS = 300


def check_concept_text(target: str, safe: str = "") -> None:
    """A concept is a non-empty short phrase; so is its safe alternative (which may be empty)."""
    if not target.strip():
        raise ValueError("the concept to erase is empty; give a word or phrase such as 'nudity'")
    for name, text in (("concept to erase", target), ("safe alternative", safe)):
        if len(text) > MAX_CONCEPT_CHARS:
            raise ValueError(f"the {name} is {len(text)} characters long (limit {MAX_CONCEPT_CHARS}); "
                             "give a short word or phrase such as 'nudity'")


def check_text_fits(backbone, text: str, what: str = "concept") -> None:
    """Refuse text the backbone's tokenizer would silently truncate (an erasure of a cut-off
    prompt would not erase what was asked). Backbones without a known limit are not checked."""
    tok = getattr(backbone, "tokenizer", None)
    limit = getattr(backbone, "max_tokens", None) or getattr(getattr(backbone, "config", None), "max_text_len", None)
    if tok is None or not limit or not text or not callable(tok):
        return
    n = len(tok(text, verbose=False).input_ids)  # with the start/end tokens the encoder also sees
    if n > int(limit):
        raise ValueError(f"the {what} {text!r} is {n} tokens but this model reads at most {int(limit)} "
                         "(start/end tokens included), so it would be silently cut off; shorten it")


@dataclass
class Concept:
    """One concept to erase and its safe alternative, with exemplar images ([N, 3, H, W] in [0, 1],
    already mask-filtered)."""

    target: str
    safe: str = ""
    negative_images: torch.Tensor | None = None
    positive_images: torch.Tensor | None = None
    #: this concept's share of the safe prediction in the negative anchor (None: the run's
    #: ``neg_anchor``; its auto value measures one per concept)
    neg_anchor: float | None = None

    def __post_init__(self):
        check_concept_text(self.target, self.safe)
        if self.neg_anchor is not None and not 0.0 <= self.neg_anchor <= 1.0:
            raise ValueError(f"neg_anchor of {self.target!r} must be in [0, 1]; got {self.neg_anchor}")
        for name in ("negative_images", "positive_images"):
            imgs = getattr(self, name)
            if imgs is not None and (imgs.ndim != 4 or imgs.shape[1] != 3 or imgs.shape[0] == 0):
                raise ValueError(f"{name} of {self.target!r} must be a non-empty [N, 3, H, W] batch, "
                                 f"got shape {tuple(imgs.shape)}")


@dataclass
class ErasureResult:
    adapters: AdapterSet
    config: EraseConfig
    concepts: list[tuple[str, str]]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    forward_rows: int = 0
    xt_forward_rows: int = 0
    adversarial: list[dict] = field(default_factory=list)
    #: peak memory allocated on the accelerator during the run (None on the CPU)
    peak_device_mb: float | None = None
    #: each concept's share of the safe prediction in its negative anchor
    neg_anchors: list[float] = field(default_factory=list)
    #: key layout of the saved file (``Backbone.lora_layout``, see :mod:`bierasing.erase.export`)
    lora_layout: str = "kohya"

    def info(self) -> dict:
        steps = max(1, self.config.steps)
        return {"library": f"bierasing {__version__}", "method": self.config.method,
                "concepts": [{"target": t, "safe": s, **({"neg_anchor": a} if a is not None else {})}
                             for (t, s), a in zip(self.concepts, self.neg_anchors or [None] * len(self.concepts))],
                "config": self.config.to_dict(), "seconds": round(self.seconds, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                **({"peak_device_mb": round(self.peak_device_mb, 1)} if self.peak_device_mb is not None else {}),
                "unet_forward_equivalents_per_step": round(self.forward_rows / steps, 2),
                "unet_forward_equivalents_per_sample": round(self.forward_rows / (steps * self.config.batch_size), 2),
                "xt_forward_rows": self.xt_forward_rows,
                "adapter_parameters": self.adapters.num_parameters(),
                "final_loss": self.history[-1]["loss"] if self.history else None,
                **({"adversarial_refreshes": len(self.adversarial),
                    "adversarial_last": self.adversarial[-1]} if self.adversarial else {})}

    def save(self, path: str | Path) -> Path:
        return save_erasure(path, self.adapters, self.info(), precision=self.config.save_precision,
                            layout=self.lora_layout)


def resolve_for_model(backbone: Backbone, cfg: EraseConfig, concepts: list[Concept]
                      ) -> tuple[EraseConfig, list[Concept]]:
    """Resolve the settings whose auto value depends on the model (the others resolve in
    ``EraseConfig``): ``preserve='auto'``, ``contexts=-1`` and the target->safe pull from the model's
    suggestions, ``micro_batch=-1`` from the UNet's size and ``neg_anchor=-1`` per concept from the
    model's predictions (a context shares its concept's). Returns the config with explicit values (what gets recorded; ``neg_anchor`` stays -1, each
    concept carries its own) and the concepts followed by their context pairs, which share the
    concept's exemplars."""
    cfg, concepts, parents = _resolve(backbone, cfg, concepts)
    return cfg, with_measured_anchors(backbone, cfg, concepts, parents)


def _resolve(backbone: Backbone, cfg: EraseConfig, concepts: list[Concept]
             ) -> tuple[EraseConfig, list[Concept], list[int]]:
    """:func:`resolve_for_model` without the anchors (text only, no UNet call), and the index of the
    given concept each returned concept belongs to."""
    cfg, concepts, parents = _with_related(backbone, cfg, concepts)
    large = sum(p.numel() for p in backbone.unet.parameters()) >= MICRO_AUTO_PARAMS  # SD-size
    if cfg.micro_batch == AUTO_INT:  # one call on a small UNet, one x_t sample per call on a large one
        cfg = dataclasses.replace(cfg, micro_batch=1 if large else 0)
    if cfg.save_precision == "auto":
        cfg = dataclasses.replace(cfg, save_precision="fp16" if large else "fp32")
    if cfg.loss_weighting == "auto":
        cfg = dataclasses.replace(cfg, loss_weighting=loss_weighting_for(backbone))
    return cfg, concepts, parents


def loss_weighting_for(backbone: Backbone) -> str:
    """Bi-Erasing's loss on this model: the flow-matching loss itself (velocity MSE) on a flow model;
    on a UNet the x0 weighting, capped at ``loss_weight_cap``. The cap binds at the top 4 of a DDIM
    grid's 20 steps but at half of a shifted flow grid's, where the colour and background are decided
    (docs/flow.md has the numbers)."""
    return "velocity" if backbone.prediction_type == "flow" else "x0"


def _with_related(backbone: Backbone, cfg: EraseConfig, concepts: list[Concept]
                  ) -> tuple[EraseConfig, list[Concept], list[int]]:
    n = CONTEXTS_AUTO if cfg.contexts < 0 else cfg.contexts
    own = list(range(len(concepts)))
    if not cfg.auto_preserve and n == 0:
        return dataclasses.replace(cfg, contexts=0), concepts, own
    keep, pairs = backbone.suggest_related([(c.target, c.safe) for c in concepts], n)
    if cfg.contexts > 0 and not any(pairs):
        raise ValueError(f"contexts {cfg.contexts}: this model cannot suggest contexts for "
                         f"{', '.join(repr(c.target) for c in concepts)}; set contexts 0 (or -1, auto) and give "
                         "the concept in context as extra concept / safe pairs instead")
    extra = [Concept(t, s, c.negative_images, c.positive_images, c.neg_anchor)
             for c, ps in zip(concepts, pairs) for t, s in ps]
    cfg = dataclasses.replace(cfg, preserve=", ".join(keep) if cfg.auto_preserve else cfg.preserve,
                              contexts=max((len(p) for p in pairs), default=0))
    return cfg, concepts + extra, own + [i for i, ps in enumerate(pairs) for _ in ps]


def with_measured_anchors(backbone: Backbone, cfg: EraseConfig, concepts: list[Concept], parents: list[int]
                          ) -> list[Concept]:
    """With ``neg_anchor`` auto, each concept without an anchor gets the one measured for the given
    concept it belongs to (``parents``; :func:`bierasing.erase.anchor.measured_anchors`)."""
    if cfg.neg_anchor != AUTO:
        return concepts
    from .anchor import measured_anchors

    todo = sorted({p for c, p in zip(concepts, parents) if c.neg_anchor is None})
    measured = dict(zip(todo, (a for a, _ in measured_anchors(
        backbone, [(concepts[p].target, concepts[p].safe) for p in todo]))))
    return [c if c.neg_anchor is not None else dataclasses.replace(c, neg_anchor=measured[p])
            for c, p in zip(concepts, parents)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device since the last reset (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class Eraser:
    """Holds one run's state so it can be checkpointed, stopped and resumed exactly."""

    def __init__(self, backbone: Backbone, concepts: list[Concept], cfg: EraseConfig,
                 callback: Callable[[int, int, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 checkpoint_path: str | Path | None = None):
        if not concepts:
            raise ValueError("give at least one concept to erase")
        if not registry.get(cfg.method).trained:
            raise ValueError(f"{cfg.method} is a closed-form edit, not trained: run it with "
                             "bierasing.erase.instant.instant_erasure (the erase job does)")
        # text only here (suggestions); the anchors need the UNet and are measured in prepare()
        cfg, concepts, self.parents = _resolve(backbone, cfg, concepts)
        need_neg, need_pos = cfg.images_needed()
        for c in concepts:
            if need_neg and c.negative_images is None:
                raise ValueError(f"{cfg.method} needs negative exemplar images of {c.target!r}: "
                                 "give an exemplar folder or let the model generate them")
            if need_pos and c.positive_images is None:
                raise ValueError(f"{cfg.method} needs positive exemplar images of {c.safe or 'the safe concept'!r}")
            if (cfg.pos_weight > 0 or cfg.map_target_to_safe > 0) and not c.safe.strip():
                raise ValueError(f"{cfg.method} needs a safe alternative for {c.target!r} (e.g. 'clothed' for 'nudity')")
            if self._anchor(c, cfg) > 0 and not c.safe.strip():
                raise ValueError(f"neg_anchor {self._anchor(c, cfg):g} needs a safe alternative for {c.target!r}; "
                                 "give one or use neg_anchor 0 (the empty prompt)")
            if cfg.xt_source == "noised" and c.negative_images is None:
                raise ValueError("xt_source 'noised' needs negative exemplar images")
            if cfg.adversarial > 0 and (c.negative_images is None or not backbone.can_encode_images) \
                    and cfg.xt_source != "cache":
                raise ValueError("adversarial training attacks with images of the concept: give negative "
                                 "exemplars (in ComfyUI also connect a VAE to encode them), use xt_source "
                                 "'cache' (its trajectories' last states), or set adversarial 0")
            check_text_fits(backbone, c.target, "concept to erase")
            check_text_fits(backbone, c.safe, "safe alternative")
        targets = {c.target.strip().lower() for c in concepts}
        for text in cfg.preserved():
            check_concept_text(text)
            if text.lower() in targets:
                raise ValueError(f"{text!r} is both erased and preserved; remove it from preserve")
            check_text_fits(backbone, text, "concept to preserve")
        self.bb, self.concepts, self.cfg = backbone, concepts, cfg
        self.callback, self.should_stop = callback, should_stop
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self.forward_rows = 0
        self.seconds = 0.0
        self.prepare_seconds: float | None = None  # set by prepare()

    @staticmethod
    def _anchor(c: Concept, cfg: EraseConfig) -> float:
        return cfg.neg_anchor if c.neg_anchor is None else c.neg_anchor

    # ---- setup: everything constant is computed once ------------------------------------------
    def prepare(self) -> None:
        """Text and image embeddings, adapters, optimiser and the frozen model's trajectories; ``run``
        calls it unless it was called first (to report the setup before the training loop starts)."""
        t_prep = time.time()
        bb, cfg = self.bb, self.cfg
        self.concepts = with_measured_anchors(bb, cfg, self.concepts, self.parents)
        if bb.device.type == "cuda":  # the run's peak, reported as peak_device_mb
            torch.cuda.reset_peak_memory_stats(bb.device)
        with torch.no_grad():
            keep = cfg.preserved() if cfg.preserve_weight > 0 else []
            texts = sorted({"", *(c.target for c in self.concepts), *(c.safe for c in self.concepts), *keep})
            emb = dict(zip(texts, bb.encode_text(texts)))
            self.uncond = emb[""]
            self.c_keep = torch.stack([emb[k] for k in keep]) if keep else None
            self.c_neg = [emb[c.target] for c in self.concepts]
            self.c_pos = [emb[c.safe] for c in self.concepts]
            self.tok_neg = [bb.encode_images(c.negative_images) if c.negative_images is not None else None
                            for c in self.concepts]
            self.tok_pos = [bb.encode_images(c.positive_images) if c.positive_images is not None else None
                            for c in self.concepts]
            self.x0_neg = [bb.to_x(c.negative_images.to(bb.device)) if cfg.xt_source == "noised" else None
                           for c in self.concepts]
        self.adapters = bb.attach_adapters(cfg.trainable, cfg.rank, self.gen)
        self.opt = torch.optim.Adam(self.adapters.parameters(), lr=cfg.lr)
        # fp16 models: scale the loss so small gradients survive the fp16 backward (bf16 and fp32 need none)
        fp16 = next(bb.unet.parameters()).dtype == torch.float16
        self.scaler = torch.amp.GradScaler(bb.device.type if fp16 else "cpu", enabled=fp16)
        self.cache = None
        self.xt_forward_rows = 0
        if cfg.xt_source == "cache":
            with self.adapters.disabled():
                self.cache = xt_sources.TrajectoryCache(bb, self.c_neg, self.uncond, cfg.cache_size,
                                                        cfg.xt_steps, cfg.xt_guidance, self.gen)
            self.xt_forward_rows = self.cache.forwards
        self.keep_cache = None
        if self.c_keep is not None and cfg.preserve_xt == "own" and cfg.xt_source == "cache":
            size = max(8, cfg.cache_size // self.c_keep.shape[0])
            with self.adapters.disabled():
                self.keep_cache = xt_sources.TrajectoryCache(bb, list(self.c_keep), self.uncond, size,
                                                             cfg.xt_steps, cfg.xt_guidance, self.gen)
            self.xt_forward_rows += self.keep_cache.forwards
        self.t_grid = bb.sampling_timesteps(cfg.xt_steps)
        self.adv_delta: list[torch.Tensor | None] = [None] * len(self.concepts)
        self.adv_draws = [0] * len(self.concepts)  # steps each concept was drawn with adversarial rows on
        self.adv_log: list[dict] = []
        if cfg.adversarial > 0:  # attack on the exemplars, or on the cache's samples where they cannot be encoded
            self.x0_attack = [bb.to_x(c.negative_images.to(bb.device))
                              if c.negative_images is not None and bb.can_encode_images else self.cache.states[i][:, -1]
                              for i, c in enumerate(self.concepts)]
        self.prepare_seconds = time.time() - t_prep

    # ---- adversarial conditioning ---------------------------------------------------------------
    def refresh_adversary(self, ci: int) -> None:
        """Attack the model being erased (adapters on) for concept ``ci``, warm-started."""
        from ..cond_attack import attack_conditioning

        cfg = self.cfg
        a = attack_conditioning(self.bb, self.x0_attack[ci], self.c_neg[ci][None], steps=cfg.adversarial_steps,
                                batch=cfg.batch_size, budget=cfg.adversarial_budget, generator=self.gen,
                                init_delta=self.adv_delta[ci], eval_batch=cfg.batch_size,
                                micro_batch=cfg.micro_batch)
        self.adv_delta[ci] = a.delta.to(self.bb.device)
        self.forward_rows += cfg.batch_size * (3 * cfg.adversarial_steps + 2)
        self.adv_log.append({"step": self.step, "concept": ci, "initial_loss": round(a.initial_loss, 6),
                             "final_loss": round(a.final_loss, 6)})

    # ---- one step -----------------------------------------------------------------------------
    def _draw_xt(self, ci: int):
        cfg, bb, B = self.cfg, self.bb, self.cfg.batch_size
        if cfg.xt_source == "cache":
            return self.cache.draw(ci, B, self.gen)
        if cfg.xt_source == "noised":
            return xt_sources.noised_exemplars(bb, self.x0_neg[ci], B, self.gen)
        if cfg.xt_source == "esd":
            with self.adapters.disabled():
                return xt_sources.partial_ddim(bb, self.c_neg[ci], self.uncond, B, cfg.xt_steps,
                                               cfg.xt_guidance, self.gen)
        return xt_sources.released_code_xt(bb, self.uncond, B, cfg.xt_steps, self.gen)

    def _t_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.loss_weighting == "uniform":
            return None
        if self.cfg.loss_weighting == "velocity":
            return velocity_weights(self.bb.alphas_cumprod, t)
        return timestep_weights(self.bb.alphas_cumprod, t, self.t_grid, self.cfg.loss_weight_cap)

    def _tokens(self, table, ci: int, B: int):
        toks = table[ci]
        if toks is None:
            return None
        return toks[torch.randint(0, toks.shape[0], (B,), generator=self.gen)]

    def loss_weights(self, ci: int = 0) -> LossWeights:
        """This step's weights for concept ``ci``: the schedule's branch weights and the settings' extra rows."""
        cfg = self.cfg
        lam_neg, lam_pos = branch_weights(cfg.schedule, self.step / cfg.steps, cfg.neg_weight,
                                          cfg.pos_weight, cfg.stage_threshold)
        return LossWeights(neg=lam_neg, pos=lam_pos, map=cfg.map_target_to_safe,
                           adv=cfg.adversarial if lam_neg > 0 else 0.0,
                           keep=cfg.preserve_weight if self.c_keep is not None else 0.0,
                           neg_guidance=cfg.neg_guidance, pos_guidance=cfg.pos_guidance,
                           neg_anchor=self._anchor(self.concepts[ci], cfg))

    def training_step(self) -> dict:
        bb, cfg = self.bb, self.cfg
        B = cfg.batch_size
        ci = int(torch.randint(0, len(self.concepts), (1,), generator=self.gen))
        x, t, fw = self._draw_xt(ci)
        self.xt_forward_rows += fw
        x, t = x.to(bb.device), t.to(bb.device)
        w = self._t_weight(t)
        lw = self.loss_weights(ci)
        rep = lambda e: e.expand(B, -1, -1)  # noqa: E731
        teacher_names = lw.teacher_rows()
        i_neg = self._tokens(self.tok_neg, ci, B)
        i_pos = self._tokens(self.tok_pos, ci, B) if "safe" in teacher_names else None
        text_only = registry.get(cfg.method).text_only
        if lw.adv > 0:  # each concept's attack is refreshed on its own draws, so contexts cost no more
            if self.adv_draws[ci] % cfg.adversarial_every == 0 or self.adv_delta[ci] is None:
                self.refresh_adversary(ci)  # also when the negative branch first switches on (guide-then-erase)
            self.adv_draws[ci] += 1

        # each row group: B rows of (x_t, t, text, image tokens or None); a row without image gets
        # zero image tokens, which makes its image channel exactly zero
        c_neg, c_pos, u = rep(self.c_neg[ci]), rep(self.c_pos[ci]), rep(self.uncond)
        img_neg = None if text_only else i_neg
        xk, tk, wk = x, t, w  # preservation rows: the erasure rows' x_t, or a preserved prompt's own
        keep = None
        if lw.keep > 0:
            if self.keep_cache is None:
                keep = self.c_keep[torch.randint(0, self.c_keep.shape[0], (B,), generator=self.gen)]
            else:
                ki = int(torch.randint(0, self.c_keep.shape[0], (1,), generator=self.gen))
                xk, tk, _ = self.keep_cache.draw(ki, B, self.gen)
                xk, tk = xk.to(bb.device), tk.to(bb.device)
                keep, wk = rep(self.c_keep[ki]), self._t_weight(tk)
        teacher_rows = {
            "uncond-": (x, t, u, None if (text_only or cfg.text_uncond) else i_neg),
            "concept": (x, t, c_neg, img_neg),
            "uncond+": (x, t, u, i_pos),
            "safe": (x, t, c_pos, i_pos),
            "adv_uncond": (x, t, u, None),
            "adv_concept": (x, t, c_neg, None),
            "keep": (xk, tk, keep, None),
        }
        alias = {"adv_uncond": "uncond-", "adv_concept": "concept"} if text_only else {}
        teacher_names = [n for n in teacher_names if n not in alias]
        student_rows = {
            "neg": (x, t, c_neg, img_neg),
            "pos": (x, t, c_pos, i_pos),
            "map": (x, t, c_neg, None if cfg.map_text_only else i_pos),
            "adv": (x, t, None if lw.adv == 0 else rep(self.c_neg[ci] + self.adv_delta[ci]), None),
            "keep": (xk, tk, keep, None),
        }
        student_names = lw.student_rows()

        with torch.no_grad(), self.adapters.disabled():
            eps = dict(zip(teacher_names, self._teacher([teacher_rows[n] for n in teacher_names])))
        eps.update({a: eps[n] for a, n in alias.items()})
        targets = loss_targets(eps, lw)
        weights = {k: (wk if k == "keep" else w) for k in student_names}
        if "pos" in student_names and "map" in student_names and B > 1:
            # one target, eps*(c+, I+)-guided, for both: they split the x_t samples instead of each taking all
            h = (B + 1) // 2
            for k, sl in (("pos", slice(0, h)), ("map", slice(h, B))):
                student_rows[k] = tuple(None if v is None else v[sl] for v in student_rows[k])
                targets[k] = (targets[k][0], targets[k][1][sl])
                weights[k] = None if weights[k] is None else weights[k][sl]
        student = [student_rows[k] for k in student_names]
        sizes = [len(r[0]) for r in student]
        self.forward_rows += B * len(teacher_names) + 3 * sum(sizes)  # backward ~ 2 forwards

        # the student rows m at a time (micro_batch): each chunk's loss is its share of the step's
        # loss, so the summed gradients are the whole step's (one chunk = one plain backward)
        self.opt.zero_grad(set_to_none=True)
        total, parts = 0.0, {k: 0.0 for k in student_names}
        for segs in self._chunks(sizes):
            preds = self._call(student, segs)
            kinds = [student_names[g] for g, _ in segs]
            loss, chunk_parts = erasure_loss(
                dict(zip(kinds, preds)), {k: (targets[k][0], targets[k][1][sl]) for k, (_, sl) in zip(kinds, segs)},
                {k: None if weights[k] is None else weights[k][sl] for k, (_, sl) in zip(kinds, segs)},
                {k: (sl.stop - sl.start) / sizes[g] for k, (g, sl) in zip(kinds, segs)})
            for k, part in chunk_parts.items():
                parts[k] += part.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the erasure loss became {loss.item()} at step {self.step}; "
                                         f"lower the learning rate (now {cfg.lr}) or the guidance strengths"
                                         + ("; an fp16 model can overflow: load it in bf16 or fp32" if
                                            self.scaler.is_enabled() else ""))
            self.scaler.scale(loss).backward()
            total += loss.item()
        self.scaler.step(self.opt)
        self.scaler.update()
        return {"step": self.step + 1, "loss": round(total, 6), **{k: round(v, 6) for k, v in parts.items()}}

    def _chunks(self, sizes: list[int]) -> list[list[tuple[int, slice]]]:
        """The rows of groups of ``sizes`` rows, group-major, in chunks of ``micro_batch`` rows (0: one
        chunk); each chunk is a list of (group, slice of its rows)."""
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        total = sum(sizes)
        m = total if self.cfg.micro_batch <= 0 else self.cfg.micro_batch
        out = []
        for start in range(0, total, m):
            stop = min(total, start + m)
            out.append([(g, slice(max(start, s0) - s0, min(stop, s0 + n) - s0))
                        for g, (s0, n) in enumerate(zip(starts, sizes)) if s0 < stop and start < s0 + n])
        return out

    def _teacher(self, groups: list) -> list[torch.Tensor]:
        """Every group's prediction, ``micro_batch`` rows per UNet call."""
        pieces: list[list[torch.Tensor]] = [[] for _ in groups]
        for segs in self._chunks([self.cfg.batch_size] * len(groups)):
            for (g, _), out in zip(segs, self._call(groups, segs)):
                pieces[g].append(out)
        return [p[0] if len(p) == 1 else torch.cat(p) for p in pieces]

    def _call(self, groups: list, segs: list[tuple[int, slice]]) -> tuple[torch.Tensor, ...]:
        """One batched UNet call on the rows of ``segs`` (groups of (x_t, t, text, image tokens or
        None)), split back per segment; a row without image gets zero image tokens, which makes its
        image channel exactly zero (K = V = 0)."""
        rows = [(x[sl], t[sl], text[sl], None if tok is None else tok[sl])
                for (g, sl) in segs for x, t, text, tok in [groups[g]]]
        toks = [r[3] for r in rows]
        tokens = None
        if any(tk is not None for tk in toks):
            ref = next(tk for tk in toks if tk is not None)
            tokens = torch.cat([tk if tk is not None else ref.new_zeros((r[0].shape[0], *ref.shape[1:]))
                                for tk, r in zip(toks, rows)])
        out = self.bb.predict_noise(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]),
                                    torch.cat([r[2] for r in rows]), tokens)
        return out.split([sl.stop - sl.start for _, sl in segs])

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        tensors = {f"adapter.{k}": v for k, v in self.adapters.state_tensors().items()}
        t, om = io.optimizer_to_tensors(self.opt)
        tensors.update(t)
        g, _ = io.rng_state(None, self.gen)
        tensors.update(g)
        tensors.update({f"adv.{i}": d.cpu() for i, d in enumerate(self.adv_delta) if d is not None})
        meta = {"config": self.cfg.to_dict(), "concepts": [[c.target, c.safe] for c in self.concepts],
                "step": self.step, "history": self.history, "optim": om,
                "forward_rows": self.forward_rows, "xt_forward_rows": self.xt_forward_rows,
                "seconds": self.seconds, "adversarial": self.adv_log, "adv_draws": self.adv_draws,
                "scaler": self.scaler.state_dict(), "neg_anchors": [self._anchor(c, self.cfg) for c in self.concepts]}
        io.save_checkpoint(self.checkpoint_path, tensors, meta)

    def _try_resume(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        tensors, meta = io.load_checkpoint(self.checkpoint_path)
        same = lambda c: {k: v for k, v in c.items() if k != "lr"}  # noqa: E731 (a lower lr may resume)
        if same(meta["config"]) != same(self.cfg.to_dict()) \
                or meta["concepts"] != [[c.target, c.safe] for c in self.concepts]:
            raise ValueError(f"{self.checkpoint_path} belongs to a run with other settings; delete it "
                             "to start over or resume with the same settings (only lr may change)")
        self.adapters.load_state_tensors({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        io.optimizer_from_tensors(self.opt, tensors, meta["optim"])
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        io.restore_rng(tensors, {}, None, self.gen)
        self.step, self.history = meta["step"], meta["history"]
        self.forward_rows, self.xt_forward_rows = meta["forward_rows"], meta["xt_forward_rows"]
        self.seconds = meta["seconds"]
        for i in range(len(self.concepts)):
            if f"adv.{i}" in tensors:
                self.adv_delta[i] = tensors[f"adv.{i}"].to(self.bb.device)
        self.adv_log = meta.get("adversarial", [])
        self.adv_draws = meta.get("adv_draws", self.adv_draws)
        if "neg_anchors" in meta:  # the run's own objective, even where a new measurement would round otherwise
            self.concepts = [dataclasses.replace(c, neg_anchor=a) if a >= 0 else c
                             for c, a in zip(self.concepts, meta["neg_anchors"])]
        return True

    def run(self) -> ErasureResult:
        t0 = time.time()
        if self.prepare_seconds is None:
            self.prepare()
        else:
            t0 -= self.prepare_seconds
        try:
            return self._loop(t0)
        except BaseException:
            self.adapters.remove(self.bb.unet)  # never leave a half-erased model behind
            raise

    def _loop(self, t0: float) -> ErasureResult:
        self._try_resume()
        self.bb.unet.train(False)
        while self.step < self.cfg.steps:
            try:
                rec = self.training_step()
            except FloatingPointError as e:  # nothing was updated this step: keep what was learnt
                if self.checkpoint_path is None or self.step == 0:
                    raise
                self.seconds += time.time() - t0
                self.save_checkpoint()
                raise FloatingPointError(f"{e}. Step {self.step} is saved in {self.checkpoint_path}: run again "
                                         "with a lower lr to resume from it") from None
            self.step += 1
            self.history.append(rec)
            if self.callback is not None:
                self.callback(self.step, self.cfg.steps, rec)
            stop = self.should_stop is not None and self.should_stop()
            periodic = self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0
            if self.checkpoint_path is not None and (stop or periodic):
                self.seconds += time.time() - t0
                t0 = time.time()
                self.save_checkpoint()
            if stop and self.step < self.cfg.steps:
                where = f"; resume from {self.checkpoint_path}" if self.checkpoint_path else ""
                raise ErasureInterrupted(f"erasure stopped at step {self.step} of {self.cfg.steps}{where}")
        self.seconds += time.time() - t0
        return ErasureResult(self.adapters, self.cfg, [(c.target, c.safe) for c in self.concepts],
                             self.history, self.seconds, peak_rss_mb(), self.forward_rows,
                             self.xt_forward_rows, self.adv_log, peak_device_mb(self.bb.device),
                             [self._anchor(c, self.cfg) for c in self.concepts], self.bb.lora_layout)


def erase(backbone: Backbone, concepts: list[Concept], cfg: EraseConfig | None = None, **kw) -> ErasureResult:
    """Train an erasure (adapters stay attached to ``backbone.unet``; see ``ErasureResult``)."""
    return Eraser(backbone, concepts, cfg or EraseConfig(), **kw).run()
