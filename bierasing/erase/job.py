"""A whole erasure job: exemplars -> masks -> erase -> LoRA file -> before/after grid and report.

This is what ``bierasing erase`` runs; it writes into one output folder:
  erasure.safetensors   the LoRA (ComfyUI LoraLoader; diffusers load_lora_weights for rank > 0)
  before_after.png      the same prompts and seeds before and after
  report.md / .json     time, memory, every setting; what the model's scorer measured (ShapesWorld:
                        ACC_e, ACC_p, H before and after; nudity: NudeNet counts)
  checkpoint.safetensors while running; a re-run resumes from it, it is removed when done
Built ``on`` earlier erasures, the LoRA holds them too (one file, each erasure's record in its metadata).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..io import atomic_write_text
from .. import methods as registry
from .config import EraseConfig
from .engine import Concept, Eraser, check_concept_text, check_text_fits, peak_rss_mb
from .masks import MaskFilter, apply_masks

logger = logging.getLogger(__name__)


AUTO_MASKS = ("auto", "attention", "none")


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


def load_exemplars(backbone, spec: ExemplarSpec, concept: str, seed: int,
                   mask_filter: MaskFilter | None, log: Callable[[str], None] = logger.info) -> torch.Tensor:
    from . import exemplars

    prompt = spec.prompt or backbone.concept_text(concept)
    if spec.source == "generate":
        log(f"generating {spec.count} exemplars of {prompt!r}")
        with torch.no_grad():
            images, masks = exemplars.generate(backbone, prompt, spec.count, seed=seed), None
    else:
        images, masks, names = exemplars.load_folder(spec.source, size=backbone.exemplar_size, limit=spec.count)
        log(f"loaded {len(names)} exemplars from {spec.source}" + (" with masks" if masks is not None else ""))
    auto = spec.auto_mask
    if auto == "auto":
        auto = "none" if backbone.is_whole_image(concept) else "attention"
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
                  log: Callable[[str], None] = logger.info, on: list[str | Path] = ()) -> dict:
    """``on``: erasure files the model already carries, in the order they were made. The new
    erasure is trained on the model with them merged (so it cannot bring their concepts back) and
    the saved file holds them all (:mod:`bierasing.erase.stack`); ``backbone`` is left as given."""
    from .stack import carrying

    output = (Path(out) / f"{name}.safetensors").resolve()
    for p in on:
        if Path(p).resolve() == output:
            raise ValueError(f"{output.name} is both an erasure to build on and this run's output; give another "
                             "--name or --out")
        if not Path(p).is_file():
            raise ValueError(f"erasure to build on {str(p)!r} does not exist; give the .safetensors an earlier "
                             "erasure wrote")
    with carrying(backbone.unet, list(on)):
        warm = [_instant_start(backbone, specs, cfg, log)] if cfg.warm_start else []
        with carrying(backbone.unet, warm):
            return _run(backbone, specs, cfg, Path(out), name, eval_samples, mask_filter, progress, should_stop,
                        log, list(on) + warm)


def _instant_start(backbone, specs: list[ConceptSpec], cfg: EraseConfig, log) -> tuple[dict, dict]:
    """The bi-instant edit of ``specs`` with ``cfg``'s shared settings, as (tensors, info)."""
    from .instant import instant_tensors

    warm = instant_tensors(backbone, [Concept(backbone.concept_text(s.target), backbone.concept_text(s.safe))
                                      for s in specs], cfg)
    log(f"warm start: the instant closed-form edit took {warm[1]['seconds']} s; training on top of it")
    return warm


def _run(backbone, specs, cfg, out: Path, name, eval_samples, mask_filter, progress, should_stop, log, on) -> dict:
    from tqdm.auto import tqdm

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
        check_text_fits(backbone, backbone.concept_text(s.target), "concept to erase")
        check_text_fits(backbone, backbone.concept_text(s.safe), "safe alternative")
    load_neg, load_pos = cfg.exemplars_to_load()
    t_start = time.time()
    concepts = []
    for i, s in enumerate(specs):
        neg = pos = None
        if load_neg:
            neg = load_exemplars(backbone, s.negative, s.target, cfg.seed + 1000 * i, mask_filter, log)
        if load_pos:
            pos = load_exemplars(backbone, s.positive, s.safe, cfg.seed + 1000 * i + 500, mask_filter, log)
        concepts.append(Concept(backbone.concept_text(s.target),
                                backbone.concept_text(s.safe) if s.safe else "", neg, pos))

    bar = None

    def cb(step, total, rec):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")

    ckpt = out / "checkpoint.safetensors"
    if registry.get(cfg.method).closed_form:
        from .instant import instant_erasure

        result = instant_erasure(backbone, concepts, cfg)
        log(f"closed-form edit of {len(result.adapters.layers)} layers in {result.seconds:.1f} s")
    else:
        if len(concepts) >= 3:
            log(f"{len(concepts)} concepts in one training run: each adds its own drag on what should stay, and "
                "bi-instant (closed form, text only) kept more of it at 3 to 8 concepts in the many-concepts "
                "benchmark (docs/benchmarks.md); compare with method bi-instant")
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
    if on:  # one file, written once: the carried erasures, then this one
        from .export import erasure_tensors, save_erasure_tensors
        from .stack import stack

        precision = result.config.save_precision
        names = [n for n, _ in backbone.unet.named_modules()] if result.lora_layout == "peft" else None
        path = save_erasure_tensors(out / f"{name}.safetensors", *stack(
            [*on, (erasure_tensors(result.adapters, precision=precision), result.info())], precision=precision),
            result.lora_layout, names)
        log(f"{path.name} holds {', '.join(_source_name(p) for p in on)} and this run's erasure")
    else:
        path = result.save(out / f"{name}.safetensors")
    if ckpt.exists():
        ckpt.unlink()
    report = {"output": str(path), "method": cfg.method, "concepts": [[s.target, s.safe] for s in specs],
              "on": [_source_name(p) for p in on],
              "erased": result.info()["concepts"],  # with the contexts and each one's negative anchor
              "config": result.config.to_dict(), "erase_seconds": round(result.seconds, 2),
              "unet_forward_equivalents_per_sample": result.info()["unet_forward_equivalents_per_sample"],
              "adapter_parameters": result.adapters.num_parameters(),
              "loss_first": result.history[0]["loss"] if result.history else None,
              "loss_last": result.history[-1]["loss"] if result.history else None}
    if eval_samples > 0:
        log(f"scoring the erasure: {eval_samples} samples per prompt before and after")
        report.update(backbone.erasure_scorer().score(backbone, result.adapters, [(s.target, s.safe) for s in specs],
                                                      eval_samples, out, progress=progress))
    result.adapters.remove(backbone.unet)  # the model as it came (the erasure is in the file)
    report["seconds"] = round(time.time() - t_start, 2)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if result.peak_device_mb is not None:
        report["peak_device_mb"] = round(result.peak_device_mb, 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def _source_name(source) -> str:
    return f"the {source[1].get('method', 'earlier')} edit" if isinstance(source, tuple) else Path(source).name


def _markdown(r: dict) -> str:
    lines = [f"# Erasure report: {', '.join(t for t, _ in r['concepts'])}", "",
             f"- method: **{r['method']}**, output `{Path(r['output']).name}`",
             f"- erase time {r['erase_seconds']} s, whole job {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB"
             + (f", peak GPU memory {r['peak_device_mb']} MB" if "peak_device_mb" in r else ""),
             f"- adapter parameters: {r['adapter_parameters']}; UNet forward-equivalents per x_t sample: "
             f"{r['unet_forward_equivalents_per_sample']}",
             f"- loss {r['loss_first']} -> {r['loss_last']}" if r["loss_first"] is not None else
             "- closed form: no training loop",
             "- erased (target -> safe, negative anchor): " + "; ".join(
                 f"{e['target']} -> {e['safe'] or '(none)'}" + (f", {e['neg_anchor']:g}" if "neg_anchor" in e else "")
                 for e in r.get("erased", [])),
             f"- held unchanged: {r['config']['preserve'] or '(nothing)'}"]
    if r.get("on"):
        lines.append(f"- trained on the model carrying {', '.join(r['on'])}; the file holds them too "
                     "(\"before\" below is that model)")
    lines.append("")
    if "acc_e" in r:
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
    elif "grid" in r:
        for c in r.get("per_concept", []):
            for when, n in c.get("nudenet", {}).items():
                lines.append(f"- NudeNet {when}: {n['flagged']} flagged images of {r['eval_samples_per_prompt']} "
                             f"for {c['target']!r} ({n['class_counts']})")
        lines += ["", f"Same prompts and seeds before and after ({r['eval_samples_per_prompt']} per prompt):", "",
                  "![before/after](before_after.png)", ""]
    lines += ["## Settings", "", "```json", json.dumps(r["config"], indent=2), "```", ""]
    return "\n".join(lines)
