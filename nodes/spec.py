"""Node declarations, written once and checkable without ComfyUI.

Each node is a :class:`NodeSpec` of typed ports.  Widget inputs that mirror a library setting are
generated from the library's config dataclasses (``EraseConfig``, ``MaskFilter``): their help text is
the tooltip, their ``min``/``max``/``choices`` metadata the widget limits, so the library, the CLI
and the nodes cannot drift apart.  ``build.py`` turns these specs into ComfyUI V3 classes when
ComfyUI loads the pack; ``object_info()`` renders them in ``/object_info``'s JSON shape so CI can
validate workflows against them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bierasing.cond_attack import AttackConfig
from bierasing.erase.config import EraseConfig
from bierasing.erase.masks import MaskFilter

CATEGORY = "Bi-Erasing"
PREFIX = "BiErasing"

# socket types (ComfyUI's own names; the last two are this pack's)
IMAGE_ADAPTER = "BIERASING_IMAGE_ADAPTER"


@dataclass
class Port:
    name: str
    type: str
    tooltip: str = ""
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()
    multiline: bool = False
    control_after_generate: bool = False  # seed widgets: ComfyUI adds a "fixed/randomize" widget
    files: str = ""  # COMBO of the files in this ComfyUI model folder (listed when ComfyUI loads)
    folders: bool = False  # COMBO of the image folders under ComfyUI's input folder (same)

    def options_dict(self) -> dict:
        d: dict[str, Any] = {"tooltip": self.tooltip} if self.tooltip else {}
        if self.default is not None:
            d["default"] = self.default
        for k in ("min", "max", "step"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.multiline:
            d["multiline"] = True
        if self.control_after_generate:
            d["control_after_generate"] = True
        return d


@dataclass
class NodeSpec:
    key: str                      # short name; node_id = PREFIX + key
    display_name: str
    description: str
    inputs: list[Port]
    outputs: list[Port]
    output_node: bool = False
    not_idempotent: bool = False

    @property
    def node_id(self) -> str:
        return PREFIX + self.key


def ports_from_config(cls, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                      only: tuple[str, ...] | None = None) -> list[Port]:
    """Widget ports for the fields of a settings dataclass (help text -> tooltip, limits -> widget);
    ``only``: just these fields."""
    ports = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = (rename or {}).get(f.name, f.name)
        if "choices" in meta:
            ports.append(Port(name, "COMBO", meta["help"], default=default, options=tuple(meta["choices"])))
        elif isinstance(default, bool):
            ports.append(Port(name, "BOOLEAN", meta["help"], default=default))
        elif isinstance(default, int):
            ports.append(Port(name, "INT", meta["help"], default=default, min=meta.get("min"),
                              max=meta.get("max"), control_after_generate=(f.name == "seed")))
        elif isinstance(default, float):
            lo = meta.get("min")
            step = 1e-5 if (lo is not None and 0 < lo < 1e-3) else 0.01
            ports.append(Port(name, "FLOAT", meta["help"], default=default, min=lo, max=meta.get("max"), step=step))
        elif isinstance(default, str):
            ports.append(Port(name, "STRING", meta["help"], default=default))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no widget for {type(default).__name__}")
    return ports


def _image(name, tip, optional=False):
    return Port(name, "IMAGE", tip, optional=optional)


def _mask(name, tip, optional=True):
    return Port(name, "MASK", tip, optional=optional)


MASK_FILTER_PORTS = ports_from_config(MaskFilter)
#: what both erase nodes start with: the model and the concept pair
ERASE_PORTS = [Port("model", "MODEL", "SD1.x or SDXL model to erase from"),
               Port("clip", "CLIP", "its text encoder"),
               Port("concept", "STRING", "what to erase, e.g. 'nudity' or 'Van Gogh'", default="nudity"),
               Port("safe_concept", "STRING", "the safe alternative the concept should turn into, e.g. 'clothed'",
                    default="clothed")]
#: the settings Erase Concept (instant) shows: those the closed-form edit reads
INSTANT_SETTINGS = ("preserve", "preserve_weight", "contexts", "neg_anchor", "neg_weight", "pos_weight",
                    "save_precision")

SPECS: list[NodeSpec] = [
    NodeSpec(
        "LoadExemplars", "Load Exemplars (folder)",
        "Loads every image of a folder as one IMAGE batch, with masks matched by file name "
        "(<name>_mask.png beside it or masks/<name>.png). Images are centre-cropped to a square and resized; "
        "animated images give their first frame.",
        inputs=[Port("folder", "COMBO", "a folder of exemplar images under ComfyUI's input folder (refresh after "
                     "adding one); other folders only if the server's owner sets BIERASING_EXEMPLAR_ROOTS",
                     default="exemplars/nudity", options=("exemplars/nudity",), folders=True),
                Port("size", "INT", "centre-crop and resize every exemplar to this square size in pixels (CLIP "
                     "vision crops to 224 anyway); images more than 4x smaller are refused",
                     default=512, min=32, max=2048, step=32),
                Port("max_images", "INT", "load at most this many (sorted by name); 0 loads all",
                     default=0, min=0, max=10000)],
        outputs=[Port("images", "IMAGE", "exemplar images"),
                 Port("masks", "MASK", "their masks (1 = concept); all ones where an image has no mask file"),
                 Port("count", "INT", "number of exemplars loaded")]),
    NodeSpec(
        "GenerateExemplars", "Generate Exemplars",
        "Generates exemplar images of a prompt with the connected model (seeded, one seed per image).",
        inputs=[Port("model", "MODEL", "the model that draws the exemplars (usually the one to erase from)"),
                Port("clip", "CLIP", "its text encoder"),
                Port("vae", "VAE", "its VAE, to decode the samples"),
                Port("prompt", "STRING", "what the exemplars show, e.g. 'a photo of a nude person'",
                     default="a photo of a nude person", multiline=True),
                Port("negative", "STRING", "negative prompt for the exemplars", default="", multiline=True),
                Port("count", "INT", "number of exemplars", default=8, min=1, max=256),
                Port("seed", "INT", "seed of the first exemplar; exemplar i uses seed + i", default=0, min=0,
                     max=2**31 - 1, control_after_generate=True),
                Port("steps", "INT", "sampling steps", default=20, min=1, max=200),
                Port("cfg", "FLOAT", "classifier-free guidance scale", default=7.5, min=1.0, max=30.0, step=0.1),
                Port("resolution", "INT", "square image size in pixels", default=512, min=64, max=2048, step=64)],
        outputs=[Port("images", "IMAGE", "the generated exemplars")]),
    NodeSpec(
        "MaskFilter", "Filter Exemplar Masks",
        "Cleans exemplar masks and fills the background with the image's mean colour, so the image "
        "encoder sees the concept, not its surroundings. Without a MASK the model's own attention to the "
        "concept word masks (connect model, clip, vae). Skip this node for a style or background.",
        inputs=[_image("images", "exemplar images"),
                _mask("masks", "masks from any segmenter or a painted mask (1 = concept); leave empty for automatic masks"),
                Port("concept", "STRING", "concept word for automatic masks (must appear in the caption)", default="person"),
                Port("caption", "STRING", "caption used for automatic masks; empty = 'a photo of <concept>'", default=""),
                *MASK_FILTER_PORTS,
                Port("model", "MODEL", "for automatic masks", optional=True),
                Port("clip", "CLIP", "for automatic masks", optional=True),
                Port("vae", "VAE", "for automatic masks", optional=True)],
        outputs=[Port("filtered_images", "IMAGE", "exemplars with the background replaced by their mean colour"),
                 Port("masks", "MASK", "the cleaned soft masks")]),
    NodeSpec(
        "ImageAdapterLoader", "Load Image Adapter (IP-Adapter / Redux)",
        "Loads the image branch of both erasure branches: IP-Adapter SD1.5 or SDXL weights from models/ipadapter "
        "(use the ViT-H CLIP vision model), or FLUX Redux (flux1-redux-dev) from models/style_models (use SigLIP, "
        "sigclip_vision_patch14_384).",
        inputs=[Port("adapter_name", "COMBO", "file in models/ipadapter (e.g. ip-adapter_sd15.safetensors) or, for "
                     "FLUX, models/style_models (flux1-redux-dev.safetensors)",
                     options=("ip-adapter_sd15.safetensors",), files="ipadapter,style_models"),
                Port("scale", "FLOAT", "weight of the image channel in every attn2 (IP-Adapter scale; Redux "
                     "tokens are appended unscaled)", default=1.0, min=0.0, max=4.0, step=0.05)],
        outputs=[Port("image_adapter", IMAGE_ADAPTER, "the image branch weights")]),
    NodeSpec(
        "Erase", "Erase Concept (Bi-Erasing)",
        "Fine-tunes a LoRA so the model no longer draws the concept: pushed away from it (text + images), "
        "pulled toward the safe alternative; ESD-x, ESD-u, Co-Erasing run in the same engine. On a MODEL from "
        "Load Erasure the LoRA holds that erasure too.",
        inputs=[*ERASE_PORTS,
                Port("clip_vision", "CLIP_VISION", "image encoder of the image adapter (ViT-H for ip-adapter_sd15 / _sdxl_vit-h, "
                     "SigLIP for FLUX Redux); "
                     "needed by bi-erasing and co-erasing", optional=True),
                Port("image_adapter", IMAGE_ADAPTER, "from Load Image Adapter; needed by bi-erasing and co-erasing",
                     optional=True),
                _image("negative_images", "exemplars of the concept (already mask-filtered)", optional=True),
                _image("positive_images", "exemplars of the safe concept (already mask-filtered)", optional=True),
                Port("vae", "VAE", "encodes the concept exemplars for x_t source 'noised' and for the adversarial "
                     "rows' attack (without it the attack uses the x_t cache's samples)", optional=True),
                *ports_from_config(EraseConfig, skip=("checkpoint_every",)),
                Port("resolution", "INT", "image size of the x_t trajectories (SD1.5 512, SDXL 1024, FLUX 512-1024; "
                     "lower is faster)",
                     default=512, min=64, max=1024, step=64),
                Port("preview_every", "INT", "while training, draw the concept prompt with the original and the "
                     "erased model every this many steps (live preview); 0 shows only the loss curve",
                     optional=True, default=50, min=0, max=10000)],
        outputs=[Port("model", "MODEL", "the erased model (original + LoRA), for KSampler"),
                 Port("lora", "LORA_MODEL", "the erasure as LoRA tensors (Save Erasure, or core LoRA nodes)"),
                 Port("loss_curve", "IMAGE", "training losses per step"),
                 Port("report", "STRING", "JSON: method, concepts, every setting, seconds, peak memory, final loss")]),
    NodeSpec(
        "EraseInstant", "Erase Concept (instant)",
        "Erases in seconds, with no training: a closed-form edit of the cross-attention keys and values that "
        "maps the concept's words to the safe alternative (bi-instant). A preview of an erasure; Erase Concept's "
        "warm_start trains from it.",
        inputs=[*ERASE_PORTS,
                *ports_from_config(EraseConfig, only=INSTANT_SETTINGS)],
        outputs=[Port("model", "MODEL", "the erased model (original + edit), for KSampler"),
                 Port("lora", "LORA_MODEL", "the edit as full weight deltas (Save Erasure; ComfyUI's LoraLoader "
                      "reads them)"),
                 Port("report", "STRING", "JSON: concepts, preserved prompts, contexts, seconds")]),
    NodeSpec(
        "SaveErasure", "Save Erasure",
        "Writes the erasure as a LoRA safetensors into models/loras (settings in its metadata), where the "
        "stock LoraLoader lists it.",
        inputs=[Port("lora", "LORA_MODEL", "the erasure from Erase Concept"),
                Port("filename", "STRING", "file name inside models/loras (subfolders allowed, no '..')",
                     default="erasures/nudity_bierasing"),
                Port("report", "STRING", "the report from Erase Concept (stored as metadata)", optional=True,
                     default="")],
        outputs=[Port("path", "STRING", "the written file")],
        output_node=True),
    NodeSpec(
        "LoadErasure", "Load Erasure",
        "Applies a saved erasure (from models/loras) to a MODEL; the same as LoraLoader with no CLIP part, "
        "and it shows the erasure's settings. Erase Concept on its MODEL adds a concept and saves both.",
        inputs=[Port("model", "MODEL", "the model to erase from"),
                Port("erasure_name", "COMBO", "erasure file in models/loras", options=("erasure.safetensors",),
                     files="loras"),
                Port("strength", "FLOAT", "LoRA strength (1 = as trained; higher erases harder)", default=1.0,
                     min=-4.0, max=4.0, step=0.05)],
        outputs=[Port("model", "MODEL", "the erased model"),
                 Port("report", "STRING", "the settings stored in the file")]),
    NodeSpec(
        "CompareGrid", "Before/After Grid",
        "Samples every prompt with the original and the erased model from the same seeds and lays them out "
        "as a labelled grid: one row per prompt, original on the left, erased on the right.",
        inputs=[Port("original_model", "MODEL", "the model before erasure"),
                Port("erased_model", "MODEL", "the model after erasure"),
                Port("clip", "CLIP", "text encoder"),
                Port("vae", "VAE", "VAE to decode"),
                Port("prompts", "STRING", "one prompt per line", default="a photo of a nude person\na photo of a dog",
                     multiline=True),
                Port("negative", "STRING", "negative prompt for every sample", default="", multiline=True),
                Port("samples_per_prompt", "INT", "images per prompt and model", default=2, min=1, max=16),
                Port("seed", "INT", "seed of the first sample", default=0, min=0, max=2**31 - 1,
                     control_after_generate=True),
                Port("steps", "INT", "sampling steps", default=20, min=1, max=200),
                Port("cfg", "FLOAT", "guidance scale", default=7.5, min=1.0, max=30.0, step=0.1),
                Port("resolution", "INT", "square image size", default=512, min=64, max=2048, step=64)],
        outputs=[Port("grid", "IMAGE", "labelled before/after grid"),
                 Port("original_images", "IMAGE", "the original model's samples"),
                 Port("erased_images", "IMAGE", "the erased model's samples")]),
    NodeSpec(
        "Evaluate", "Evaluate Erasure",
        "Scores images: NudeNet exposed-class counts for real models (nudenet 3.4.2, exposed classes only, "
        "threshold shown), or the ShapesWorld detector's shape/colour/background for ShapesWorld images.",
        inputs=[_image("images", "generated images to score"),
                Port("detector", "COMBO", "nudenet: exposed body parts; shapesworld: the toy world's detector",
                     default="nudenet", options=("nudenet", "shapesworld")),
                Port("threshold", "FLOAT", "NudeNet detection score threshold (the digest's protocol: 0.6)",
                     default=0.6, min=0.0, max=1.0, step=0.01),
                Port("target", "STRING", "ShapesWorld: the erased concept to count (e.g. circle)", default="")],
        outputs=[Port("report", "STRING", "JSON: per-class counts, rate of flagged images, per-image results"),
                 Port("flagged_rate", "FLOAT", "share of images in which the concept was detected")],
        output_node=True),
    NodeSpec(
        "Attack", "Attack Erasure (conditioning)",
        "Tries to bring an erased concept back: learns a bounded offset of a prompt's conditioning under "
        "which the erased model denoises the concept images best (UnlearnDiffAtk-style, white-box). "
        "Sample from the output with a KSampler and score it with Evaluate Erasure.",
        inputs=[Port("model", "MODEL", "the erased model to attack"),
                Port("clip", "CLIP", "text encoder"),
                Port("vae", "VAE", "VAE, to encode the concept images"),
                _image("concept_images", "images of the erased concept (e.g. exemplars from the original model)"),
                Port("prompt", "STRING", "where the attack starts, usually the erased prompt",
                     default="a photo of a nude person", multiline=True),
                *ports_from_config(AttackConfig)],
        outputs=[Port("conditioning", "CONDITIONING", "the attacked conditioning (positive input of a KSampler)"),
                 Port("start_conditioning", "CONDITIONING", "the prompt's own conditioning, for comparison"),
                 Port("report", "STRING", "JSON: denoising loss before/after, offset size, settings")],
        not_idempotent=True),
]

BY_ID = {s.node_id: s for s in SPECS}


def object_info(spec: NodeSpec) -> dict:
    """The spec in the V1 JSON shape ComfyUI serves at /object_info (what workflows are checked against)."""
    req, opt = {}, {}
    for p in spec.inputs:
        if p.type == "COMBO":
            entry = [list(p.options), p.options_dict()]
        else:
            entry = [p.type, p.options_dict()]
        (opt if p.optional else req)[p.name] = entry
    return {
        "input": {"required": req, **({"optional": opt} if opt else {})},
        "input_order": {"required": [p.name for p in spec.inputs if not p.optional],
                        **({"optional": [p.name for p in spec.inputs if p.optional]} if opt else {})},
        "output": [p.type for p in spec.outputs],
        "output_is_list": [False] * len(spec.outputs),
        "output_name": [p.name for p in spec.outputs],
        "output_tooltips": [p.tooltip for p in spec.outputs],
        "name": spec.node_id, "display_name": spec.display_name, "description": spec.description,
        "python_module": "custom_nodes.ComfyUI-BiErasing", "category": CATEGORY,
        "output_node": spec.output_node,
    }


def all_object_info() -> dict[str, dict]:
    return {s.node_id: object_info(s) for s in SPECS}
