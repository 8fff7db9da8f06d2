"""Every erasure method, declared once: its branches, the images it needs, its default trainable
set and how its "auto" settings resolve.  The engine, the job, the nodes and the batch runner
read this table; nothing else says which method needs what.

Torch-free on purpose: ``bierasing batch`` runs without torch installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    #: trained by the step loop (False: closed form or its own loop)
    trained: bool = True
    #: a closed-form edit the erase job runs instead of the step loop (an ``EraseConfig`` method)
    closed_form: bool = False
    #: the negative branch sees concept exemplars through the image branch
    negative_images: bool = False
    #: the positive branch (and the target->safe pull) see safe-alternative exemplars
    positive_images: bool = False
    #: the published loss is the negative term alone (lambda- = 1, lambda+ = 0)
    single_branch: bool = False
    #: which UNet layers ``trainable='attn2'`` (the default) means for this method
    default_trainable: str = "attn2"
    #: values that each AUTO setting takes for this method (before any model is consulted)
    auto: dict = field(default_factory=dict)

    @property
    def needs_image_encoder(self) -> bool:
        return self.negative_images or self.positive_images

    @property
    def text_only(self) -> bool:
        return not self.needs_image_encoder


#: ``neg_anchor`` AUTO value that measures each concept's anchor (bierasing.erase.anchor)
ANCHOR_MEASURED = "measured"

#: ``loss_weighting`` AUTO value resolved from the model's prediction: the flow-matching velocity MSE
#: on flow models, the x0 weighting on noise / v predictors (bierasing.erase.engine, docs/flow.md)
LOSS_BY_MODEL = "by-model"

#: AUTO values of our extensions to the paper's objective (docs/method.md has the evidence)
BI_ERASING_AUTO = {"adversarial": 0.3, "neg_anchor": ANCHOR_MEASURED, "loss_weighting": LOSS_BY_MODEL,
                   "map_target_to_safe": 0.15, "map_target_to_safe_keep": 0.3, "contexts": 4,
                   "preserve": "auto"}
BASELINE_AUTO = {"adversarial": 0.0, "neg_anchor": 0.0, "loss_weighting": "uniform",
                 "map_target_to_safe": 0.0, "map_target_to_safe_keep": 0.0, "contexts": 0,
                 "preserve": ""}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bi-erasing", "negative branch (concept text + concept images) pushed away, positive branch "
           "(safe text + safe images) pulled toward; the paper's method",
           negative_images=True, positive_images=True, auto=BI_ERASING_AUTO),
    Method("esd-x", "ESD, text-only negative guidance, cross-attention trained",
           single_branch=True, auto=BASELINE_AUTO),
    Method("esd-u", "ESD, text-only negative guidance, everything but cross-attention trained",
           single_branch=True, default_trainable="no_attn2", auto=BASELINE_AUTO),
    Method("co-erasing", "negative branch with concept images only (Co-Erasing, ICML 2025)",
           negative_images=True, single_branch=True, auto=BASELINE_AUTO),
    Method("bi-instant", "closed-form edit of the cross-attention keys and values with both branches' targets "
           "(seconds, text only): a preview, or a warm start for bi-erasing",
           trained=False, closed_form=True, default_trainable="attn2_kv",
           auto={**BI_ERASING_AUTO, "adversarial": 0.0, "neg_anchor": 0.5, "loss_weighting": "uniform",
                 "map_target_to_safe": 0.0, "map_target_to_safe_keep": 0.0}),
    Method("uce", "UCE: closed-form edit of every attn2 to_k / to_v (no training loop)", trained=False),
    Method("released", "a re-run of the released Bi-Erasing training loop (two UNets, for comparison)",
           trained=False, negative_images=True, positive_images=True),
)}

#: the step-loop methods
TRAINED = tuple(n for n, m in METHODS.items() if m.trained)
#: the methods ``EraseConfig.method`` accepts: the step loop's and the job's closed-form edits
JOB_METHODS = TRAINED + tuple(n for n, m in METHODS.items() if m.closed_form)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def images_needed(method: str, pos_weight: float, map_target_to_safe: float,
                  neg_anchor: float) -> tuple[bool, bool]:
    """(negative, positive): which exemplar sets a run of ``method`` with these (resolved) settings
    uses. The positive set is used by the positive branch, the target->safe pull and a negative
    anchor that leans on the safe prediction."""
    m = get(method)
    pos = m.positive_images and (pos_weight > 0 or map_target_to_safe > 0 or neg_anchor > 0)
    return m.negative_images, pos
