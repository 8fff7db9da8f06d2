"""What each node does: translate ComfyUI values to library calls and back (no erasure logic here).

ComfyUI IMAGE is [B, H, W, 3] in [0, 1] and MASK [B, H, W]; the library takes [B, 3, H, W].
Every function returns the node's outputs as a tuple, or (outputs, ui) for output nodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from bierasing import methods as registry
from bierasing.erase.config import EraseConfig
from bierasing.erase.masks import MaskFilter

from . import comfy_glue as glue


def to_bchw(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
    return images[..., :3].permute(0, 3, 1, 2).contiguous().float()


def to_bhwc(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 2, 3, 1).contiguous().float().cpu()


def _masks_like(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    m = masks if masks.ndim == 3 else masks[None]
    if m.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"{m.shape[0]} masks for {images.shape[0]} images; give one mask per image (or one for all)")
    if tuple(m.shape[1:]) != tuple(images.shape[-2:]):
        raise ValueError(f"masks are {m.shape[2]}x{m.shape[1]} but the images are {images.shape[-1]}x{images.shape[-2]}; "
                         "resize the masks to the images (e.g. with an Upscale Image node on the mask) or "
                         "use masks made from these images")
    return m.expand(images.shape[0], -1, -1).float()


# ---- exemplars ------------------------------------------------------------------------------------
def load_exemplars(folder: str, size: int, max_images: int):
    from bierasing.erase.exemplars import confined_folder, load_folder

    path = confined_folder(folder, glue.input_folder(), glue.exemplar_roots())
    images, masks, names = load_folder(path, size=size, limit=max_images or None)
    if masks is None:
        masks = torch.ones(images.shape[0], images.shape[2], images.shape[3])
    return to_bhwc(images), masks.float(), len(names)


def generate_exemplars(model, clip, vae, prompt: str, negative: str, count: int, seed: int, steps: int,
                       cfg: float, resolution: int):
    if not prompt.strip():
        raise ValueError("the exemplar prompt is empty; describe what the exemplars should show")
    images = glue.sample(model, clip, vae, [prompt] * count, negative, list(range(seed, seed + count)),
                         steps, cfg, resolution)
    return (images,)


# ---- masks ----------------------------------------------------------------------------------------
def mask_filter(images, masks=None, concept="", caption="", model=None, clip=None, vae=None, **filter_kw):
    from bierasing.erase.masks import apply_masks, check_finite

    cfg = MaskFilter(**filter_kw)
    imgs = to_bchw(images)
    if masks is None:
        raw = _automatic_masks(imgs, concept, caption, model, clip, vae)
    else:
        raw = _masks_like(masks, imgs)
        check_finite(raw)
        if float(raw.max()) <= 0:
            raise ValueError("every mask is empty (all zero); paint or segment the concept, or leave the mask "
                             "input unconnected for automatic masks")
    filtered, soft = apply_masks(imgs, raw, cfg, return_masks=True)
    return to_bhwc(filtered), soft.float()


def _automatic_masks(imgs, concept, caption, model, clip, vae):
    from bierasing.erase.attention_mask import attention_masks

    if model is None or clip is None or vae is None:
        raise ValueError("automatic masks need model, clip and vae connected (or connect a MASK)")
    if not concept.strip():
        raise ValueError("automatic masks need the concept word")
    caption = caption.strip() or f"a photo of {concept.strip()}"
    bb = glue.backbone(model, clip, vae, resolution=imgs.shape[-1])
    with torch.inference_mode(False):
        x = glue.plain(imgs)
        bb.encode_text([caption])
        bb.to_x(x)
    with glue.unet_session(bb, train=False):
        return attention_masks(bb, x, caption, concept.strip())


# ---- image adapter --------------------------------------------------------------------------------
ADAPTER_FOLDERS = "ipadapter,style_models"  # IP-Adapters where IP-Adapter packs keep them; Redux where ComfyUI does
REDUX_KEYS = ("redux_up.weight", "redux_down.weight")


def load_image_adapter(adapter_name: str, scale: float):
    from bierasing.io import load_safetensors

    path = glue.file_path(ADAPTER_FOLDERS, adapter_name)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{adapter_name}: only .safetensors adapters are read (pickled .bin files can run code); "
                         "download the safetensors version of the IP-Adapter")
    tensors, _ = load_safetensors(path)
    if all(k in tensors for k in REDUX_KEYS):
        return ({"tensors": tensors, "scale": float(scale), "name": adapter_name, "kind": "redux"},)
    missing = [k for k in ("image_proj.proj.weight", "image_proj.norm.weight") if k not in tensors]
    if missing or not any(k.startswith("ip_adapter.") for k in tensors):
        raise ValueError(f"{adapter_name} is neither an IP-Adapter SD1.5/SDXL file (missing "
                         f"{missing or 'ip_adapter.* tensors'}) nor a FLUX Redux file ({' and '.join(REDUX_KEYS)})")
    return ({"tensors": tensors, "scale": float(scale), "name": adapter_name, "kind": "ip-adapter"},)


# ---- erasure --------------------------------------------------------------------------------------
def concept_pairs(concept: str, safe_concept: str) -> list[tuple[str, str]]:
    """'a, b' and 'x' (or 'x, y') -> [(a, x), (b, x)] (or [(a, x), (b, y)]), with clear errors."""
    targets = [c.strip() for c in concept.split(",") if c.strip()]
    safes = [s.strip() for s in safe_concept.split(",")]
    if not targets:
        raise ValueError("the concept to erase is empty; type a word or phrase such as 'nudity'")
    if len(safes) not in (1, len(targets)):
        raise ValueError(f"{len(targets)} concepts but {len(safes)} safe alternatives; give one safe concept, "
                         "or one per concept (comma-separated)")
    return list(zip(targets, safes * len(targets) if len(safes) == 1 else safes))


def erase_input_problem(concept=None, safe_concept=None, **settings) -> str | None:
    """What is wrong with Erase's widgets, checked when the prompt is queued (before any model loads);
    None if nothing is. Values fed by links are not known yet and are skipped."""
    try:
        cfg = EraseConfig(**{k: v for k, v in settings.items() if v is not None})
        if concept is None:
            return None
        pairs = concept_pairs(concept, safe_concept or "")
        if cfg.needs_safe():
            missing = [t for t, s in pairs if not s]
            if missing:
                return (f"{cfg.method} pulls {missing[0]!r} toward a safe alternative: fill safe_concept "
                        "(e.g. 'clothed' for 'nudity', 'a photo' for a style), or pick esd-x / esd-u")
    except ValueError as e:
        return str(e)
    return None


def erase(model, clip, concept: str, safe_concept: str, clip_vision=None, image_adapter=None,
          negative_images=None, positive_images=None, vae=None, resolution: int = 512, preview_every: int = 50,
          **settings):
    from bierasing.erase.engine import Concept, Eraser
    from bierasing.erase.export import erasure_tensors
    from bierasing.plot import loss_curve

    cfg = EraseConfig(**settings)
    problem = erase_input_problem(concept, safe_concept, **settings)
    if problem:
        raise ValueError(problem)
    pairs = concept_pairs(concept, safe_concept)
    need_neg, need_pos = cfg.images_needed()
    if registry.get(cfg.method).needs_image_encoder and (clip_vision is None or image_adapter is None):
        raise ValueError(f"{cfg.method} conditions on exemplar images: connect a CLIP_VISION (Load CLIP Vision) "
                         "and an image adapter (Load Image Adapter), or pick esd-x / esd-u")
    bb = glue.backbone(model, clip, vae, clip_vision, image_adapter, resolution)
    closed = registry.get(cfg.method).closed_form
    if (closed or cfg.warm_start) and bb.trainable_rules() is not None:
        raise ValueError("bi-instant and warm_start solve a UNet's cross-attention in closed form; this model "
                         "(FLUX) reads the text inside its blocks: use Erase Concept with bi-erasing and "
                         "warm_start off")
    with torch.inference_mode(False):
        neg = glue.plain(to_bchw(negative_images)).to(bb.device) if negative_images is not None else None
        pos = glue.plain(to_bchw(positive_images)).to(bb.device) if positive_images is not None else None
    concepts = [Concept(t, s, neg if need_neg else None, pos if need_pos else None)
                for t, s in pairs]
    # conditioning first: CLIP and CLIP vision are done before the UNet is loaded for training
    with torch.inference_mode(False):
        bb.encode_text(sorted({"", *(t for t, _ in pairs), *(s for _, s in pairs)}))
        for c in concepts:
            for imgs in (c.negative_images, c.positive_images):
                if imgs is not None:
                    bb.encode_images(imgs)
            if (cfg.xt_source == "noised" or (cfg.adversarial > 0 and bb.can_encode_images)) \
                    and c.negative_images is not None:
                bb.to_x(c.negative_images)
    with torch.inference_mode(False):  # the suggestions (preserve / contexts auto) are text conditioning too
        if closed or cfg.warm_start:
            from bierasing.erase.engine import _resolve
            from bierasing.erase.instant import instant_config

            resolved, text_concepts, _ = _resolve(bb, cfg if closed else instant_config(cfg), concepts)
            bb.encode_text(sorted({"", *(c.target for c in text_concepts), *(c.safe for c in text_concepts),
                                   *resolved.preserved()}))
        if not closed:
            eraser = Eraser(bb, concepts, cfg, should_stop=glue.interrupted)
            bb.encode_text(sorted({*(c.target for c in eraser.concepts), *(c.safe for c in eraser.concepts),
                                   *eraser.cfg.preserved()}))
    names = bb.module_name_map()
    warm = _instant_tensors(bb, concepts, cfg, names) if cfg.warm_start else None
    if warm is not None:  # trained on top of the edit, which the clone now carries as a LoRA patch
        bb.apply_erasure(warm[0])
    if closed:
        from bierasing.erase.instant import instant_erasure

        with glue.unet_session(bb, train=False):
            result = instant_erasure(bb, concepts, cfg)
            try:
                tensors = erasure_tensors(result.adapters, names, result.config.save_precision)
            finally:
                result.adapters.remove(bb.unet)
    else:
        from bierasing.erase.preview import LivePreview

        preview = LivePreview(bb.concept_text(pairs[0][0]), sample_every=preview_every, seed=cfg.seed)
        eraser.callback = glue.Progress(cfg.steps, preview)
        preview.attach(eraser)
        with glue.unet_session(bb, train=True):
            try:
                result = eraser.run()
            except Exception as e:
                from bierasing.erase.engine import ErasureInterrupted

                if isinstance(e, ErasureInterrupted):
                    glue.raise_if_interrupted()
                raise
            try:
                tensors = erasure_tensors(result.adapters, names, result.config.save_precision)
            finally:
                result.adapters.remove(bb.unet)
    info = result.info()
    if warm is not None:  # one LoRA: the instant edit, then the training on top of it
        from bierasing.erase.stack import stack

        tensors, info = stack([warm, (tensors, info)], precision=result.config.save_precision)
    erased = glue.apply_lora(model, tensors)
    carried = [c for c in glue.carried(model) if os.path.isfile(c["file"])]
    if carried:  # the LoRA holds the erasures the MODEL came with too (bierasing.erase.stack)
        from bierasing.erase.stack import stack

        tensors, info = stack([*(c["file"] for c in carried), (tensors, info)],
                              scales=[c["strength"] for c in carried] + [1.0],
                              precision=result.config.save_precision)
    tensors = bb.file_tensors(tensors)  # what Save Erasure writes: FLUX's in the peft layout
    curve = torch.from_numpy(loss_curve(result.history, f"{cfg.method}: {concept} -> {safe_concept}")).float()[None] / 255
    return erased, tensors, curve, json.dumps(info, indent=1)


def _instant_tensors(bb, concepts, cfg: EraseConfig, names) -> tuple[dict, dict]:
    """The bi-instant edit of ``concepts`` with ``cfg``'s shared settings, as (tensors, info)."""
    from bierasing.erase.instant import instant_tensors

    with glue.unet_session(bb, train=False):
        return instant_tensors(bb, concepts, cfg, names)


def erase_instant(model, clip, concept: str, safe_concept: str, **settings):
    """Erase Concept (instant): the closed-form bi-instant edit through :func:`erase`."""
    erased, tensors, _, report = erase(model, clip, concept, safe_concept, method="bi-instant", **settings)
    return erased, tensors, report


def save_erasure(lora: dict, filename: str, report: str = ""):
    from bierasing.erase.export import in_kohya_form, save_erasure_tensors
    from bierasing.io import safe_child

    root = Path(glue.output_folder("loras"))
    name = filename.strip()
    if not name:
        raise ValueError("give a file name for the erasure")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    path = safe_child(root, name)
    try:
        info = json.loads(report) if report and report.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"the report input is not the JSON from Erase Concept ({e})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, layout, names = in_kohya_form(lora)  # FLUX's LORA comes in the peft layout
    save_erasure_tensors(path, tensors, info, layout, names)
    rel = os.path.relpath(path, root)
    return (rel,), {"text": [f"saved {rel} in models/loras ({len(lora)} tensors)"]}


def load_erasure(model, erasure_name: str, strength: float):
    from bierasing.erase.export import read_erasure

    path = glue.file_path("loras", erasure_name)
    tensors, info = read_erasure(path, keep_layout=True)  # as LoraLoader reads the file
    erased = glue.apply_lora(model, tensors, strength)
    glue.carry(erased, path, strength)
    return erased, json.dumps(info, indent=1)


# ---- looking at the result -----------------------------------------------------------------------
def compare_grid(original_model, erased_model, clip, vae, prompts: str, negative: str, samples_per_prompt: int,
                 seed: int, steps: int, cfg: float, resolution: int):
    from bierasing.grid import make_grid

    plist = [p.strip() for p in prompts.splitlines() if p.strip()]
    if not plist:
        raise ValueError("give at least one prompt (one per line)")
    rows = [p for p in plist for _ in range(samples_per_prompt)]
    seeds = [seed + i for i in range(samples_per_prompt)] * len(plist)
    before = glue.sample(original_model, clip, vae, rows, negative, seeds, steps, cfg, resolution)
    after = glue.sample(erased_model, clip, vae, rows, negative, seeds, steps, cfg, resolution)
    u8 = lambda t: (t.numpy() * 255).round().astype(np.uint8)  # noqa: E731
    b, a = u8(before), u8(after)
    cells = np.stack([np.stack([*b[r * samples_per_prompt:(r + 1) * samples_per_prompt],
                                *a[r * samples_per_prompt:(r + 1) * samples_per_prompt]]) for r in range(len(plist))])
    cols = [f"original s{seed + i}" for i in range(samples_per_prompt)] + \
           [f"erased s{seed + i}" for i in range(samples_per_prompt)]
    grid = make_grid(cells, plist, cols, cell_px=min(256, max(96, resolution // 2)), title="before | after")
    return torch.from_numpy(grid).float()[None] / 255, before, after


def evaluate(images, detector: str, threshold: float, target: str = ""):
    imgs = (images[..., :3].cpu().numpy() * 255).round().astype(np.uint8)
    if detector == "nudenet":
        from bierasing.nudity import nudenet_report

        report = nudenet_report(imgs, threshold)
    elif detector == "shapesworld":
        report = _shapes_report(imgs, target.strip())
    else:
        raise ValueError(f"unknown detector {detector!r}; choose nudenet or shapesworld")
    text = json.dumps(report, indent=1)
    return (text, float(report["flagged_rate"])), {"text": [text]}


def _shapes_report(imgs: np.ndarray, target: str) -> dict:
    from bierasing.world import data
    from bierasing.world.detector import detect_batch

    if imgs.shape[1:3] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise ValueError(f"the ShapesWorld detector reads {data.IMAGE_SIZE}x{data.IMAGE_SIZE} images, got "
                         f"{imgs.shape[2]}x{imgs.shape[1]}")
    dets = detect_batch(imgs)
    counts: dict[str, int] = {}
    for d in dets:
        counts[d.shape] = counts.get(d.shape, 0) + 1
    if target and not data.is_concept(target):
        raise ValueError(f"{target!r} is not a ShapesWorld concept word")
    flagged = [target in (d.shape, d.color, d.background) for d in dets] if target else [False] * len(dets)
    return {"detector": "shapesworld", "images": len(dets), "shape_counts": counts, "target": target,
            "flagged_rate": round(sum(flagged) / max(1, len(dets)), 4),
            "per_image": [{"shape": d.shape, "color": d.color, "background": d.background} for d in dets]}


# ---- attacking an erasure ------------------------------------------------------------------------
def attack(model, clip, vae, concept_images, prompt: str, **settings):
    from bierasing.cond_attack import AttackConfig, attack_conditioning

    cfg = AttackConfig(**settings)
    if not prompt.strip():
        raise ValueError("the attack's start prompt is empty; use the erased prompt, e.g. 'a photo of a nude person'")
    imgs = to_bchw(concept_images)
    if imgs.shape[-1] % 8 or imgs.shape[-2] % 8:
        raise ValueError(f"concept images are {imgs.shape[-1]}x{imgs.shape[-2]}; use sizes divisible by 8")
    bb = glue.backbone(model, clip, vae, resolution=imgs.shape[-1])
    with torch.inference_mode(False):
        x = glue.plain(imgs)
        base = bb.encode_text([prompt])
        x0 = bb.to_x(x)
    progress = glue.Progress(cfg.steps)
    with glue.unet_session(bb, train=True):
        result = attack_conditioning(bb, x0, base, **cfg.to_kwargs(), should_stop=glue.interrupted,
                                     callback=progress)
    glue.raise_if_interrupted()
    report = {"prompt": prompt, "images": int(imgs.shape[0]), **result.info()}
    return bb.conditioning(result.cond(), prompt), bb.conditioning(result.base, prompt), json.dumps(report, indent=1)
