"""A whole erasure job: exemplars -> masks -> erase -> LoRA file -> before/after grid and report.

This is what ``bierasing erase`` runs; it writes into one output folder:
  erasure.safetensors   the LoRA (ComfyUI LoraLoader; diffusers load_lora_weights for rank > 0)
  before_after.png      the same prompts and seeds before and after (ShapesWorld models)
  report.md / .json     ACC_e, ACC_p, H before and after, time, memory, every setting
  checkpoint.safetensors while running; a re-run resumes from it, it is removed when done
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io import atomic_write_text
from .config import EraseConfig
from .engine import Concept, Eraser, check_concept_text, check_text_fits, peak_rss_mb
from .masks import MaskFilter, apply_masks


AUTO_MASKS = ("auto", "attention", "none")
#: words that make a concept phrase a whole-image concept for auto masks
WHOLE_IMAGE_WORDS = ("style", "background")


def whole_image_concept(backbone, concept: str) -> bool:
    """A concept that is the whole picture (a background, a style), not a thing in it.

    Masking its exemplars would keep the foreground and paint over the concept itself with the
    image's mean colour: ShapesWorld's "black" exemplars came out tinted by their shapes' colours.
    On ShapesWorld the background axis is whole-image; elsewhere a phrase naming a style or a
    background is (an artist's name alone is not recognised: pass auto_mask "none" for it)."""
    from ..world import data

    if _is_world(backbone) and data.is_concept(concept):
        return data.axis_of(concept) == "background"
    words = concept.lower().replace(",", " ").split()
    return any(w in words for w in WHOLE_IMAGE_WORDS)


@dataclass
class ExemplarSpec:
    """Where a branch's exemplars come from: a folder, or ``generate`` (the model draws them)."""

    source: str = "generate"
    count: int = 16
    prompt: str | None = None  # for generate; default: the concept's own prompt
    auto_mask: str = "auto"  # images without a mask file: one of AUTO_MASKS

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"exemplar count must be >= 1, got {self.count}")
        if self.auto_mask not in AUTO_MASKS:
            raise ValueError(f"auto_mask must be one of {', '.join(AUTO_MASKS)}; got {self.auto_mask!r}")


@dataclass
class ConceptSpec:
    target: str
    safe: str = ""
    negative: ExemplarSpec = field(default_factory=ExemplarSpec)
    positive: ExemplarSpec = field(default_factory=ExemplarSpec)

    def __post_init__(self):
        check_concept_text(self.target, self.safe)


def _is_world(backbone) -> bool:
    from ..world.models import ShapesWorldBackbone

    return isinstance(backbone, ShapesWorldBackbone)


def concept_text(backbone, concept: str) -> str:
    """The text condition for a concept: ShapesWorld words become its canonical prompt."""
    from ..world import data

    if _is_world(backbone) and data.is_concept(concept):
        return data.concept_prompt(concept)
    return concept


def load_exemplars(backbone, spec: ExemplarSpec, concept: str, seed: int,
                   mask_filter: MaskFilter | None, log: Callable[[str], None]) -> torch.Tensor:
    from . import exemplars

    prompt = spec.prompt or concept_text(backbone, concept)
    if spec.source == "generate":
        log(f"generating {spec.count} exemplars of {prompt!r}")
        with torch.no_grad():
            images, masks = exemplars.generate(backbone, prompt, spec.count, seed=seed), None
    else:
        images, masks, names = exemplars.load_folder(spec.source, size=backbone.sample_shape[-1]
                                                     if _is_world(backbone) else None, limit=spec.count)
        log(f"loaded {len(names)} exemplars from {spec.source}" + (" with masks" if masks is not None else ""))
    auto = spec.auto_mask
    if auto == "auto":
        auto = "none" if whole_image_concept(backbone, concept) else "attention"
        if masks is None and auto == "none":
            log(f"not masking the exemplars of {concept!r}: it is the whole image (a style or background)")
    if masks is None and auto == "attention":
        from .attention_mask import attention_masks

        word = concept if concept.lower() in prompt.lower() else prompt
        masks = attention_masks(backbone, images, prompt, word, seed=seed)
        log(f"masked {len(images)} exemplars by the model's attention to {word!r}")
    if masks is not None:
        images = apply_masks(images, masks, mask_filter)
    return images


def run_erase_job(backbone, specs: list[ConceptSpec], cfg: EraseConfig, out: str | Path,
                  name: str = "erasure", eval_samples: int = 8, mask_filter: MaskFilter | None = None,
                  progress: bool = True, should_stop: Callable[[], bool] | None = None,
                  log: Callable[[str], None] = print) -> dict:
    from tqdm.auto import tqdm

    out = Path(out)
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"output name {name!r} must be a plain file name (no folders, not hidden)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot use {out} as the output folder ({e.strerror or e}); choose a folder "
                         "that can be created and written to") from e
    if not os.access(out, os.W_OK | os.X_OK):  # fail now, not after the whole erasure has run
        raise ValueError(f"the output folder {out} is not writable; choose another folder or fix its permissions")
    for s in specs:  # before any exemplar is made: a cut-off prompt would erase the wrong thing
        check_text_fits(backbone, concept_text(backbone, s.target), "concept to erase")
        check_text_fits(backbone, concept_text(backbone, s.safe), "safe alternative")
    t_start = time.time()
    concepts = []
    for i, s in enumerate(specs):
        neg = load_exemplars(backbone, s.negative, s.target, cfg.seed + 1000 * i, mask_filter, log)
        pos = None
        if cfg.method == "bi-erasing" and (cfg.pos_weight > 0 or cfg.map_target_to_safe != 0):
            pos = load_exemplars(backbone, s.positive, s.safe, cfg.seed + 1000 * i + 500, mask_filter, log)
        concepts.append(Concept(concept_text(backbone, s.target),
                                concept_text(backbone, s.safe) if s.safe else "", neg, pos))

    bar = None

    def cb(step, total, rec):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")

    ckpt = out / "checkpoint.safetensors"
    eraser = Eraser(backbone, concepts, cfg, callback=cb, should_stop=should_stop, checkpoint_path=ckpt)
    if eraser.cfg.xt_source == "cache":
        log("sampling the frozen model's trajectories of the prompts to erase and preserve "
            "(once, before the first step)")
    eraser.prepare()
    log(f"prepared in {eraser.prepare_seconds:.0f} s ({eraser.xt_forward_rows} UNet rows of sampling)")
    bar = tqdm(total=cfg.steps, desc=f"erase ({cfg.method})", disable=not progress, dynamic_ncols=True)
    try:
        result = eraser.run()
    finally:
        bar.close()
    path = result.save(out / f"{name}.safetensors")
    if ckpt.exists():
        ckpt.unlink()
    report = {"output": str(path), "method": cfg.method, "concepts": [[s.target, s.safe] for s in specs],
              "config": result.config.to_dict(), "erase_seconds": round(result.seconds, 2),
              "unet_forward_equivalents_per_sample": result.info()["unet_forward_equivalents_per_sample"],
              "adapter_parameters": result.adapters.num_parameters(),
              "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"]}
    if _is_world(backbone) and eval_samples > 0:
        report.update(_evaluate_world_erasure(backbone, result, specs, eval_samples, out, progress))
    report["seconds"] = round(time.time() - t_start, 2)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def _evaluate_world_erasure(backbone, result, specs, samples, out: Path, progress: bool) -> dict:
    from ..grid import make_grid, save_png
    from ..world import data
    from ..world.evaluate import measure_erasure

    rows, per_concept = [], []
    for s in specs:
        if not data.is_concept(s.target):
            continue
        with result.adapters.disabled():
            before = measure_erasure(backbone, s.target, samples, progress=progress)
        after = measure_erasure(backbone, s.target, samples, progress=progress)
        syn = measure_erasure(backbone, s.target, samples, synonym=1, progress=progress)
        per_concept.append({"target": s.target, "safe": s.safe,
                            "before": {k: round(before[k], 4) for k in ("acc_e", "acc_p", "h")},
                            "after": {k: round(after[k], 4) for k in ("acc_e", "acc_p", "h")},
                            "acc_e_synonyms": round(syn["acc_e"], 4)})
        axis = data.axis_of(s.target)
        pick = [i for i, (_, kind, _) in enumerate(after["prompts"]) if kind == "target"][:3]
        pick += [i for i, (_, kind, _) in enumerate(after["prompts"]) if kind == "other"][:3]
        cols = min(6, samples)
        for i in pick:
            p = after["prompts"][i][0]
            cells = np.concatenate([before["images"][i, :cols], after["images"][i, :cols]])
            marks = [getattr(d, axis) == s.target for d in before["detections"][i][:cols]] + \
                    [getattr(d, axis) == s.target for d in after["detections"][i][:cols]]
            rows.append((p, cells, marks))
    if not per_concept:
        return {}
    cells = np.stack([r[1] for r in rows])
    marks = np.array([r[2] for r in rows])
    ncol = cells.shape[1] // 2
    grid = make_grid(cells, [r[0] for r in rows], [f"before {j}" for j in range(ncol)] + [f"after {j}" for j in range(ncol)],
                     cell_px=72, label_px=230, marks=marks,
                     title=f"{result.config.method}: erase {', '.join(s.target for s in specs)} (red frame = concept detected)")
    save_png(out / "before_after.png", grid)
    mean = lambda k: float(np.mean([c["after"][k] for c in per_concept]))  # noqa: E731
    return {"acc_e": round(mean("acc_e"), 4), "acc_p": round(mean("acc_p"), 4), "h": round(mean("h"), 4),
            "per_concept": per_concept, "grid": str(out / "before_after.png"), "eval_samples_per_prompt": samples}


def _markdown(r: dict) -> str:
    lines = [f"# Erasure report: {', '.join(t for t, _ in r['concepts'])}", "",
             f"- method: **{r['method']}**, output `{Path(r['output']).name}`",
             f"- erase time {r['erase_seconds']} s, whole job {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB",
             f"- trained parameters: {r['adapter_parameters']}; UNet forward-equivalents per x_t sample: "
             f"{r['unet_forward_equivalents_per_sample']}",
             f"- loss {r['loss_first']} -> {r['loss_last']}", ""]
    if "per_concept" in r:
        lines += ["| concept | safe | ACC_e before | ACC_e after | ACC_e synonyms | ACC_p before | ACC_p after | H before | H after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in r["per_concept"]:
            b, a = c["before"], c["after"]
            lines.append(f"| {c['target']} | {c['safe']} | {b['acc_e']:.3f} | {a['acc_e']:.3f} | {c['acc_e_synonyms']:.3f} | "
                         f"{b['acc_p']:.3f} | {a['acc_p']:.3f} | {b['h']:.3f} | {a['h']:.3f} |")
        lines += ["", f"ACC_e: share of target-prompt samples where the detector still finds the concept; "
                  f"ACC_p: share of other prompts generated correctly; H: harmonic mean of 1-ACC_e and ACC_p "
                  f"({r['eval_samples_per_prompt']} samples per prompt, DDIM 20, CFG 1.5).", "",
                  "![before/after](before_after.png)", ""]
    lines += ["## Settings", "", "```json", json.dumps(r["config"], indent=2), "```", ""]
    return "\n".join(lines)
