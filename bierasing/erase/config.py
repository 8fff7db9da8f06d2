"""Erasure settings: one dataclass, validated once; each field's help text is the node tooltip and
the ``--help`` line (at most 300 characters: what it does and when to change it; the evidence
behind each default is in docs/method.md).

Model-free "auto" values resolve here, from the method registry (:mod:`bierasing.methods`); the
two that depend on the model (``preserve``/``contexts`` and ``micro_batch``) resolve in
:func:`bierasing.erase.engine.resolve_for_model`. The resolved numbers are what gets recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .. import methods as registry
from .adapters import TRAINABLE_SETS

METHODS = {name: registry.METHODS[name].help for name in registry.JOB_METHODS}
XT_SOURCES = {
    "cache": "DDIM trajectories of the frozen model for the concept, sampled once and reused",
    "esd": "a fresh partial DDIM from noise down to step t each step (ESD's way)",
    "noised": "q(x_t | x_0) of the concept exemplars: no sampling at all",
    "reproduce": "the released Bi-Erasing code's x_t (ascending timesteps, trainable model, empty prompt)",
}

#: "choose for me" value of numeric settings whose best value depends on the method
AUTO = -1.0
_BI = registry.BI_ERASING_AUTO
#: adversarial weight that ``adversarial=AUTO`` gives Bi-Erasing
ADVERSARIAL_AUTO = _BI["adversarial"]
#: target->safe pull weights that ``map_target_to_safe=AUTO`` gives Bi-Erasing without / with a preserve set
MAP_AUTO, MAP_AUTO_KEEP = _BI["map_target_to_safe"], _BI["map_target_to_safe_keep"]
#: contexts per concept that ``contexts=-1`` gives Bi-Erasing where the model can suggest them
CONTEXTS_AUTO = _BI["contexts"]
#: names ``neg_anchor`` took before it was a number (workflows saved before 2026-11-25)
NEG_ANCHOR_NAMES = {"empty": 0.0, "safe": 1.0}
#: "choose for me" value of integer settings resolved against the model
AUTO_INT = -1
#: UNets at least this large get ``micro_batch=AUTO_INT`` = 1 (one x_t sample per call)
MICRO_AUTO_PARAMS = 100_000_000
#: ``preserve`` value that asks the model for its suggestion
PRESERVE_AUTO = "auto"
#: longest help text (node tooltip, --help line)
MAX_HELP_CHARS = 300


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EraseConfig:
    method: str = _f("bi-erasing", "erasure objective: bi-erasing (the paper: push away from the concept, pull "
                     "toward the safe alternative, both with exemplar images); bi-instant (closed form, seconds, "
                     "text only: a preview, or three or more concepts at once); or a baseline: esd-x, esd-u "
                     "(text only), co-erasing (concept images only)",
                     choices=registry.JOB_METHODS)
    steps: int = _f(200, "optimisation steps; more erases harder and costs more of everything else", min=1,
                    max=100000)
    lr: float = _f(1e-3, "Adam learning rate of the adapter weights; lower it if the loss jumps or the "
                   "model breaks", min=1e-7, max=1.0)
    batch_size: int = _f(8, "x_t samples per step", min=1, max=256)
    micro_batch: int = _f(AUTO_INT, "UNet rows per call (gradients summed: the same update, less memory). "
                          "0 = all rows at once; -1 = auto: all at once on small UNets, 1 on SD-size ones. "
                          "Lower it when a step runs out of memory", min=-1, max=256)
    trainable: str = _f("attn2", "layers to train: attn2 = what reads the text (UNet cross-attention, ESD-x; a FLUX "
                        "transformer's text-side attention projections; default), attn2_kv = their keys and "
                        "values, attn = all attention, no_attn2 = the rest (ESD-u), full = every layer",
                        choices=tuple(TRAINABLE_SETS))
    rank: int = _f(4, "LoRA rank; 0 trains full weight deltas of the chosen layers (larger file)", min=0,
                   max=1024)
    neg_weight: float = _f(0.6, "lambda-: weight of the negative (suppression) loss", min=0.0, max=10.0)
    pos_weight: float = _f(0.4, "lambda+: weight of the positive (safe alternative) loss", min=0.0, max=10.0)
    neg_guidance: float = _f(1.0, "eta-: negative guidance strength (ESD's eta); higher erases harder",
                             min=0.0, max=20.0)
    pos_guidance: float = _f(1.0, "eta+: positive guidance strength", min=0.0, max=20.0)
    map_target_to_safe: float = _f(AUTO, "weight of a loss that maps the concept prompt to the safe "
                                   f"branch's target (our extension). -1 = auto: {MAP_AUTO_KEEP:g} with a preserve "
                                   f"set, {MAP_AUTO:g} without, 0 for the baselines; 0 = the paper's objective",
                                   min=AUTO, max=10.0)
    map_text_only: bool = _f(True, "the target->safe row sees the concept prompt alone, as prompts are at "
                             "inference; off: with the safe exemplars' image tokens")
    preserve: str = _f("auto", "prompts the erasure must leave intact, comma-separated ('a dog, a cat'). auto: "
                       "the concept's nearest phrases by the model's own text encoder, alone and in context; "
                       "empty: none. Name neighbours that drift after erasing")
    preserve_weight: float = _f(1.0, "weight of the preservation loss (when preserve names prompts); raise "
                                "it if other concepts change, lower it if the concept survives",
                                min=0.0, max=10.0)
    preserve_xt: str = _f("target", "x_t of the preservation rows: target = the erasure rows' x_t; own = "
                          "the frozen model's trajectories of the preserved prompts", choices=("target", "own"))
    contexts: int = _f(-1, "extra contexts the concept is also erased in ('a photo of a dog' -> 'a photo of a "
                       f"cat'). -1 = auto: {CONTEXTS_AUTO} for bi-erasing when a safe concept is given, else 0",
                       min=-1, max=64)
    schedule: str = _f("joint", "joint: both branches every step; guide-then-erase: positive only for the first "
                       "stage_threshold of the steps, then negative only (the released --dynamic_weights)",
                       choices=("joint", "guide-then-erase"))
    stage_threshold: float = _f(0.8, "share of steps in the guide stage of guide-then-erase", min=0.0, max=1.0)
    loss_weighting: str = _f("auto", "how each x_t's error counts: uniform = plain noise MSE (the paper); x0 = "
                             "the error in the predicted image, so noisy steps (colour, layout) count too; "
                             "velocity = flow-matching velocity MSE (EraseAnything); auto = bi-erasing: "
                             "velocity on flow models (FLUX), x0 on UNets; uniform for the baselines",
                             choices=("auto", "uniform", "x0", "velocity"))
    loss_weight_cap: float = _f(10.0, "largest x0 weight (loss_weighting x0), before scaling to mean 1", min=1.0,
                                max=1000.0)
    neg_anchor: float = _f(AUTO, "share a of the safe prediction in the negative branch's anchor: 0 = the "
                           "empty prompt (ESD, the paper), 1 = the safe alternative. -1 = auto: for bi-erasing "
                           "measured per concept, 0.5 unless the model draws the concept unprompted (then up "
                           "to 1); 0 for the baselines", min=AUTO, max=1.0)
    text_uncond: bool = _f(False, "co-erasing: unconditional teacher term without the image (Co-Erasing's option)")
    xt_source: str = _f("cache", "where x_t comes from: cache = the frozen model's trajectories, sampled once "
                        "(default); esd = fresh each step; noised = noised exemplars (fastest); reproduce = "
                        "the released code's", choices=tuple(XT_SOURCES))
    xt_steps: int = _f(20, "DDIM grid for x_t (t is drawn from its steps)", min=2, max=1000)
    xt_guidance: float = _f(1.5, "CFG scale when sampling x_t trajectories", min=1.0, max=20.0)
    cache_size: int = _f(64, "trajectories per concept in the x_t cache", min=1, max=100000)
    adversarial: float = _f(AUTO, "weight of adversarial rows: every adversarial_every steps a bounded attack "
                            "on the concept's text conditioning is refreshed and erased too. -1 = auto: "
                            f"{ADVERSARIAL_AUTO:g} for bi-erasing, 0 for the baselines. Against white-box "
                            "attacks: 1, with adversarial_steps 40, adversarial_every 10 (~1.5x time)",
                            min=AUTO, max=10.0)
    adversarial_every: int = _f(20, "steps of a concept between refreshes of its adversarial conditioning (each "
                                "context is a concept of its own, refreshed on the steps that draw it)", min=1,
                                max=100000)
    adversarial_steps: int = _f(10, "optimisation steps of each adversarial refresh", min=1, max=1000)
    adversarial_budget: float = _f(0.5, "largest adversarial offset of a token, relative to its norm", min=0.0, max=10.0)
    save_precision: str = _f("auto", "precision of the saved LoRA weights: auto = fp16 for SD-size models (what "
                             "LoRA users expect), fp32 for small ones; fp32 keeps every bit of training",
                             choices=("auto", "fp16", "bf16", "fp32"))
    warm_start: bool = _f(False, "train on top of the instant closed-form edit (bi-instant): erased from the first "
                          "step, but the edit's loss of preservation stays (no gain measured on ShapesWorld); the "
                          "file holds both (ComfyUI loads it, diffusers skips its full deltas)")
    seed: int = _f(0, "seed of every random choice (exemplars, t, noise, adapter init)", min=0, max=2**31 - 1)
    checkpoint_every: int = _f(0, "write a resumable checkpoint every N steps (0: only when stopped)", min=0, max=100000)

    def __post_init__(self):
        if isinstance(self.neg_anchor, str):
            if self.neg_anchor not in NEG_ANCHOR_NAMES:
                raise ValueError(f"neg_anchor must be a number in [0, 1] or one of {', '.join(NEG_ANCHOR_NAMES)}; "
                                 f"got {self.neg_anchor!r}")
            self.neg_anchor = NEG_ANCHOR_NAMES[self.neg_anchor]
        for f in fields(self):
            v, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and v not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}; got {v!r}")
            if "min" in meta and not (meta["min"] <= v <= meta["max"]):
                raise ValueError(f"{f.name} must be in [{meta['min']}, {meta['max']}]; got {v}")
        m = registry.get(self.method)
        auto = m.auto
        self._resolve_auto("adversarial", auto["adversarial"])
        if auto["neg_anchor"] != registry.ANCHOR_MEASURED:  # else measured per concept (resolve_for_model)
            self._resolve_auto("neg_anchor", auto["neg_anchor"])
        self._is_auto("neg_anchor")
        if self.loss_weighting == "auto" and auto["loss_weighting"] != registry.LOSS_BY_MODEL:
            self.loss_weighting = auto["loss_weighting"]  # else by the model (resolve_for_model)
        if self.auto_preserve and auto["preserve"] != PRESERVE_AUTO:
            self.preserve = auto["preserve"]
        if self.contexts < 0 and auto["contexts"] == 0:
            self.contexts = 0
        self._is_auto("map_target_to_safe")  # checked now even where it is resolved later
        if not self.auto_preserve:  # else resolved with the model's suggestion (resolve_for_model)
            self.resolve_map_target_to_safe()
        if m.single_branch:  # the published loss is the negative term alone
            self.neg_weight, self.pos_weight, self.map_target_to_safe = 1.0, 0.0, 0.0
        if self.trainable == "attn2":
            self.trainable = m.default_trainable
        if self.schedule == "guide-then-erase" and (self.pos_weight == 0 or self.neg_weight == 0):
            raise ValueError("guide-then-erase alternates the two branches; it needs both neg_weight and "
                             f"pos_weight > 0 (method {self.method!r} has only one branch)")
        if self.neg_weight == 0 and self.pos_weight == 0:
            raise ValueError("neg_weight and pos_weight are both 0: nothing would be trained")
        if self.warm_start and not m.trained:
            raise ValueError(f"warm_start starts a trained method from the instant edit; {self.method} is not "
                             "trained: turn warm_start off or choose bi-erasing")

    def resolve_map_target_to_safe(self) -> None:
        """AUTO -> the method's pull weight, stronger where a preserve set holds the neighbours."""
        auto = registry.get(self.method).auto
        self._resolve_auto("map_target_to_safe",
                           auto["map_target_to_safe_keep"] if self.preserved() else auto["map_target_to_safe"])

    def needs_safe(self) -> bool:
        """Whether a run leans on the safe alternative (positive branch, target->safe pull or a negative
        anchor on it), so every concept must name one."""
        return self.pos_weight > 0 or self.map_target_to_safe != 0 or self.neg_anchor > 0

    def images_needed(self) -> tuple[bool, bool]:
        """(negative, positive): which exemplar sets this run uses (see :func:`bierasing.methods.images_needed`)."""
        return registry.images_needed(self.method, self.pos_weight, abs(self.map_target_to_safe),
                                      abs(self.neg_anchor))  # AUTO: measured, may lean on the safe images

    def exemplars_to_load(self) -> tuple[bool, bool]:
        """(negative, positive): the exemplar sets worth making for this run: those the method needs,
        plus concept images for noised x_t and for the adversarial attack (which can otherwise
        attack the trajectory cache's samples)."""
        neg, pos = self.images_needed()
        return neg or self.xt_source == "noised" or self.adversarial > 0, pos

    def _is_auto(self, name: str) -> bool:
        """Whether an auto-valued setting is AUTO; any other negative value is refused."""
        v = getattr(self, name)
        if v < 0 and v != AUTO:
            raise ValueError(f"{name} must be {AUTO:g} (auto) or >= 0; got {v}")
        return v == AUTO

    def _resolve_auto(self, name: str, value: float) -> None:
        """Replace AUTO by ``value`` (the resolved number is what gets recorded)."""
        if self._is_auto(name):
            setattr(self, name, value)

    @property
    def auto_preserve(self) -> bool:
        return self.preserve.strip().lower() == PRESERVE_AUTO

    def preserved(self) -> list[str]:
        """The preserve list, split and stripped (``auto`` must be resolved first)."""
        if self.auto_preserve:
            raise ValueError("preserve 'auto' is resolved against a model: use resolve_for_model(backbone, ...)")
        return [p.strip() for p in self.preserve.split(",") if p.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}
