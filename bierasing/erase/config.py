"""Erasure settings: one dataclass, validated once; each field's help text is the node tooltip."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .adapters import TRAINABLE_SETS

METHODS = {
    "bi-erasing": "negative branch (concept text + concept images) pushed away, positive branch "
                  "(safe text + safe images) pulled toward; the paper's method",
    "esd-x": "ESD, text-only negative guidance, cross-attention trained",
    "esd-u": "ESD, text-only negative guidance, everything but cross-attention trained",
    "co-erasing": "negative branch with concept images only (Co-Erasing, ICML 2025)",
}
XT_SOURCES = {
    "cache": "DDIM trajectories of the frozen model for the concept, sampled once and reused (fast, ESD-correct)",
    "esd": "a fresh partial DDIM from noise down to step t with the frozen model each step (ESD's way)",
    "noised": "q(x_t | x_0) of the concept exemplars: no sampling at all",
    "reproduce": "the released Bi-Erasing code: ascending timesteps, trainable model, empty prompt (labelled bug)",
}


#: "choose for me" value of numeric settings whose best value depends on the method
AUTO = -1.0
#: adversarial weight that ``adversarial=AUTO`` gives Bi-Erasing (best mean H on the benchmark)
ADVERSARIAL_AUTO = 0.3
#: target->safe pull weights that ``map_target_to_safe=AUTO`` gives Bi-Erasing without / with a preserve set
MAP_AUTO, MAP_AUTO_KEEP = 0.15, 0.3
#: contexts per concept that ``contexts=-1`` gives Bi-Erasing where the model can suggest them
CONTEXTS_AUTO = 4
#: share of the safe prediction in the negative anchor that ``neg_anchor=AUTO`` gives Bi-Erasing
NEG_ANCHOR_AUTO = 0.5
#: names ``neg_anchor`` took before it was a number (session 12 workflows and batch templates)
NEG_ANCHOR_NAMES = {"empty": 0.0, "safe": 1.0}
#: "choose for me" value of integer settings resolved against the model
AUTO_INT = -1
#: UNets at least this large get ``micro_batch=AUTO_INT`` = 1 (one x_t sample per call)
MICRO_AUTO_PARAMS = 100_000_000
#: ``preserve`` value that asks the model for its suggestion
PRESERVE_AUTO = "auto"


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EraseConfig:
    method: str = _f("bi-erasing", "erasure objective: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()),
                     choices=tuple(METHODS))
    steps: int = _f(200, "optimisation steps", min=1, max=100000)
    lr: float = _f(1e-3, "Adam learning rate of the adapter weights", min=1e-7, max=1.0)
    batch_size: int = _f(8, "x_t samples per step", min=1, max=256)
    micro_batch: int = _f(AUTO_INT, "UNet rows per call: a step runs up to 7 teacher and 5 student rows per x_t "
                          "sample; they go through the UNet this many rows at a time and the gradients are "
                          "summed, the same update with the activations of this many rows. 0 = all rows of a "
                          "step at once (fastest where memory allows); -1 (default) = auto: 0 for a UNet under "
                          f"{MICRO_AUTO_PARAMS // 10**6} M parameters (ShapesWorld), 1 otherwise (SD1.5: one "
                          "row with gradients at a time instead of 40 at batch_size 8)", min=-1, max=256)
    trainable: str = _f("attn2", "which UNet layers are trained: " + "; ".join(f"{k}: {v}" for k, v in TRAINABLE_SETS.items()),
                        choices=tuple(TRAINABLE_SETS))
    rank: int = _f(4, "LoRA rank; 0 trains full weight deltas of the chosen layers", min=0, max=1024)
    neg_weight: float = _f(0.6, "lambda-: weight of the negative (suppression) loss", min=0.0, max=10.0)
    pos_weight: float = _f(0.4, "lambda+: weight of the positive (safe alternative) loss", min=0.0, max=10.0)
    neg_guidance: float = _f(1.0, "eta-: negative guidance strength (ESD's eta)", min=0.0, max=20.0)
    pos_guidance: float = _f(1.0, "eta+: positive guidance strength", min=0.0, max=20.0)
    map_target_to_safe: float = _f(AUTO, "our extension (not in the released code; 0 gives the paper's objective): "
                                   "weight of a loss that maps the concept prompt to the safe branch's target "
                                   "(safe text + safe images). With an image branch that steers well, the paper's "
                                   "negative target eps(empty, concept image) still draws the concept, so erasure "
                                   "needs this pull (ShapesWorld benchmark, bench/results/erasure.md). -1 (default) "
                                   f"= auto: {MAP_AUTO_KEEP} when preserve names concepts, {MAP_AUTO} without (a "
                                   "stronger pull costs other concepts unless they are held), 0 for the baselines",
                                   min=AUTO, max=10.0)
    map_text_only: bool = _f(True, "the target->safe row's student sees the concept prompt alone (no image), as "
                             "prompts are at inference; off (the session-5 form): with the safe exemplars' image "
                             "tokens, which a strongly steering image branch satisfies without changing the text "
                             "path (ShapesWorld, red: H 0.22 with, 0.75 without)")
    preserve: str = _f("auto", "prompts the erasure must leave intact, comma-separated (e.g. 'a dog, a cat'); "
                       "each step the erased model is also held to the frozen model's prediction for some of them, "
                       "with no image. auto (default): what the model suggests for bi-erasing where it knows its "
                       "concept vocabulary (ShapesWorld: the other concepts of the target's axis, alone, in "
                       "contexts its evaluation never samples and in the contexts the target is erased in), "
                       "nothing for other models (SD1.5: name them) and for the baselines. Empty: no "
                       "preservation rows")
    preserve_weight: float = _f(1.0, "weight of the preservation loss (used only when preserve names concepts). "
                                "ShapesWorld, eight targets: mean H 0.925 / 0.902 (training seeds 0 / 1) at 1.0, "
                                "0.894 / 0.876 at 0.5 (the default before session 15)",
                                min=0.0, max=10.0)
    preserve_xt: str = _f("target", "x_t of the preservation rows: target = the same x_t as the erasure rows; own = "
                          "the frozen model's DDIM trajectories of the preserved prompts (with xt_source 'cache', "
                          "sampled once). ShapesWorld, red / white: H 0.847 / 0.838 with target, 0.812 / 0.787 "
                          "with own", choices=("target", "own"))
    contexts: int = _f(-1, "extra contexts each concept is also erased in, with the concept's exemplars: the concept and "
                       "its safe alternative in one shared context ('a red square on a white background' -> 'a "
                       "green square on a white background'). Without them an erasure of 'red' can still draw red "
                       "in prompts that name more than the concept (ShapesWorld white: 'a purple star on a white "
                       f"background'). -1 (default) = auto: {CONTEXTS_AUTO} for bi-erasing where the model can "
                       "suggest contexts (ShapesWorld), 0 otherwise", min=-1, max=64)
    schedule: str = _f("joint", "joint: both branches every step; guide-then-erase: positive only for the first "
                       "stage_threshold of the steps, then negative only (the released --dynamic_weights)",
                       choices=("joint", "guide-then-erase"))
    stage_threshold: float = _f(0.8, "share of steps in the guide stage of guide-then-erase", min=0.0, max=1.0)
    loss_weighting: str = _f("auto", "how each x_t's error counts: uniform = plain noise-prediction MSE (the paper, "
                             "ESD); x0 = weighted by min(1/alpha_bar_t, loss_weight_cap), the error in the predicted "
                             "image, so the noisy steps where colour, background and layout are decided count as much "
                             "as the detailed ones; auto (default) = x0 for bi-erasing, uniform for the baselines. "
                             "ShapesWorld benchmark (eight targets, 200 steps): mean H 0.872 with x0, 0.832 uniform",
                             choices=("auto", "uniform", "x0"))
    loss_weight_cap: float = _f(10.0, "largest x0 weight (loss_weighting x0), before scaling to mean 1", min=1.0,
                                max=1000.0)
    neg_anchor: float = _f(AUTO, "where the negative branch pushes away from the concept: the anchor is (1 - a) * "
                           "eps(x_t, {}, I-) + a * eps(x_t, c+, I+) for this a. 0 = the empty prompt (ESD, the "
                           "paper); 1 = the safe alternative's prediction; 0.5 = halfway, where the target becomes "
                           "eps({}) + eps(c+) - eps(c-), the concept's contribution swapped for the safe one's. "
                           f"-1 (default) = auto: {NEG_ANCHOR_AUTO:g} for bi-erasing, 0 for the baselines. A concept "
                           "the model draws with no prompt at all (ShapesWorld gray, the data's mean colour) has "
                           "eps(c-) ~ eps({}), so around the empty prompt there is nothing to push away from; at 1 "
                           "the push overshoots past the safe concept and damages its neighbours. ShapesWorld, eight "
                           "targets at preservation weight 0.5: mean H 0.872 at 0, 0.894 at 0.5, 0.860 at 1; gray 0.000 / 0.668 / 0.779; "
                           "at weight 1.0 (the default): gray 0.216 at 0.5, 0.840 at 1 (use 1 for such concepts). "
                           f"Legacy names: {', '.join(f'{k} = {v:g}' for k, v in NEG_ANCHOR_NAMES.items())}",
                           min=AUTO, max=1.0)
    text_uncond: bool = _f(False, "co-erasing: unconditional teacher term without the image (Co-Erasing's option)")
    xt_source: str = _f("cache", "where x_t comes from: " + "; ".join(f"{k}: {v}" for k, v in XT_SOURCES.items()),
                        choices=tuple(XT_SOURCES))
    xt_steps: int = _f(20, "DDIM grid for x_t (t is drawn from its steps)", min=2, max=1000)
    xt_guidance: float = _f(1.5, "CFG scale when sampling x_t trajectories", min=1.0, max=20.0)
    cache_size: int = _f(64, "trajectories per concept in the x_t cache", min=1, max=100000)
    adversarial: float = _f(AUTO, "weight of adversarial rows; -1 (default) = auto: "
                            f"{ADVERSARIAL_AUTO} for bi-erasing, 0 (off) for the baselines. Every "
                            "adversarial_every steps a bounded offset of the concept's text conditioning is "
                            "optimised so that the model being erased draws the concept again (a white-box attack "
                            "in conditioning space); the erasure is then also trained to suppress the concept "
                            "under it (AdvUnlearn's idea). ShapesWorld benchmark (session 5, earlier image branch): "
                            "weight 0.3 gave mean H 0.866 vs 0.699 without, at 1.3x the time",
                            min=AUTO, max=10.0)
    adversarial_every: int = _f(20, "steps between refreshes of the adversarial conditioning", min=1, max=100000)
    adversarial_steps: int = _f(10, "optimisation steps of each adversarial refresh", min=1, max=1000)
    adversarial_budget: float = _f(0.5, "largest adversarial offset of a token, relative to its norm", min=0.0, max=10.0)
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
        self._resolve_auto("adversarial", ADVERSARIAL_AUTO if self.method == "bi-erasing" else 0.0)
        self._resolve_auto("neg_anchor", NEG_ANCHOR_AUTO if self.method == "bi-erasing" else 0.0)
        if self.loss_weighting == "auto":
            self.loss_weighting = "x0" if self.method == "bi-erasing" else "uniform"
        if self.method != "bi-erasing":  # the baselines as published: no preserve set, no contexts
            self.preserve = "" if self.auto_preserve else self.preserve
            self.contexts = 0 if self.contexts < 0 else self.contexts
        self._is_auto("map_target_to_safe")  # checked now even where it is resolved later
        if not self.auto_preserve:  # else resolved with the model's suggestion (see ``with_related``)
            self._resolve_auto("map_target_to_safe", MAP_AUTO_KEEP if self.preserved() else MAP_AUTO)
        if self.method in ("esd-x", "esd-u", "co-erasing"):
            # single-direction baselines: their published loss is the negative term alone
            self.neg_weight, self.pos_weight, self.map_target_to_safe = 1.0, 0.0, 0.0
        if self.method == "esd-u" and self.trainable == "attn2":
            self.trainable = "no_attn2"
        if self.schedule == "guide-then-erase" and (self.pos_weight == 0 or self.neg_weight == 0):
            raise ValueError("guide-then-erase alternates the two branches; it needs both neg_weight and "
                             f"pos_weight > 0 (method {self.method!r} has only one branch)")
        if self.neg_weight == 0 and self.pos_weight == 0:
            raise ValueError("neg_weight and pos_weight are both 0: nothing would be trained")

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
            raise ValueError("preserve 'auto' is resolved against a model: use with_related(backbone, ...)")
        return [p.strip() for p in self.preserve.split(",") if p.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}
