"""Measure ShapesWorld models with the detector: world quality and erasure metrics.

World quality (``bierasing world eval``):
  shape_acc / color_acc - all shape x colour prompts ("a red circle"), background left free;
  axis3_acc             - background named in the prompt ("... on a white background");
  image_steer_acc       - empty prompt + an exemplar image through the image branch: does the
                          sample show the exemplar's shape?
  text_image_shape_acc  - a shape x colour prompt together with its matching exemplar (how the
                          erasure's teacher conditions): does the sample still show the shape?

Erasure (``measure_erasure``): target prompts name the erased concept, other prompts name other
concepts of the same axis; ACC_e / ACC_p / H as in :mod:`bierasing.metrics`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..metrics import PromptScore, erasure_scores
from ..sampling import sample
from . import data
from .detector import Detection, detect_batch
from .models import ShapesWorldBackbone
from .prompts import erasure_prompts  # noqa: F401 (part of this module's interface)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def generate(backbone, prompts: Sequence[str], samples_per_prompt: int, seed: int = 0,
             steps: int = 20, guidance: float = 1.5, image_tokens: torch.Tensor | None = None,
             progress: bool = False, desc: str = "sampling", distinct_noise: bool = False) -> np.ndarray:
    """uint8 [len(prompts), samples, H, W, 3]; sample j of every prompt uses seed ``seed + j``, or
    with ``distinct_noise`` sample j of prompt i seed ``seed + i * samples_per_prompt + j``."""
    from tqdm.auto import tqdm

    n = samples_per_prompt
    flat_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + (i * n if distinct_noise else 0) + j for i in range(len(prompts)) for j in range(n)]
    tokens = None
    if image_tokens is not None:
        tokens = image_tokens.repeat_interleave(n, dim=0)
    bar = tqdm(total=len(flat_prompts), desc=desc, disable=not progress, dynamic_ncols=True)

    def cb(done, total):
        bar.update(done - bar.n)

    imgs = sample(backbone, flat_prompts, seeds, steps=steps, guidance=guidance,
                  image_tokens=tokens, batch_size=200, callback=cb)
    bar.close()
    return _to_uint8(imgs).reshape(len(prompts), n, *imgs.shape[2:], 3)


def _detect(images: np.ndarray) -> list[list[Detection]]:
    return [detect_batch(row) for row in images]


def _correct(det: Detection, want: data.Concepts) -> bool:
    return all(want.get(a) is None or getattr(det, a) == want.get(a) for a in data.AXES)


# ---- world quality ---------------------------------------------------------------------------

def world_prompt_sets() -> dict[str, list[tuple[str, data.Concepts]]]:
    sc = [(data.prompt(s, c), data.Concepts(s, c, None)) for s in data.SHAPES for c in data.COLORS]
    bgs = []
    for i, b in enumerate(data.BACKGROUNDS):
        for k, s in enumerate(data.SHAPES):
            c = data.COLORS[(k + 2 * i) % len(data.COLORS)]
            bgs.append((data.prompt(s, c, b), data.Concepts(s, c, b)))
    return {"shape_color": sc, "background": bgs}


def evaluate_world(model: str | Path | ShapesWorldBackbone | None = None, samples_per_prompt: int = 16,
                   steps: int = 20, guidance: float = 1.5, seed: int = 0, progress: bool = True,
                   grid_path: str | Path | None = None) -> dict:
    """Quality of a ShapesWorld model as measured by the detector (see module docstring)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    bb = model if isinstance(model, ShapesWorldBackbone) else ShapesWorldBackbone.load(model)
    t0 = time.time()
    sets = world_prompt_sets()
    per_prompt = {}

    sc = sets["shape_color"]
    imgs_sc = generate(bb, [p for p, _ in sc], samples_per_prompt, seed, steps, guidance,
                       progress=progress, desc="shape x colour")
    dets_sc = _detect(imgs_sc)
    shape_hits = [sum(d.shape == w.shape for d in row) for row, (_, w) in zip(dets_sc, sc)]
    color_hits = [sum(d.color == w.color for d in row) for row, (_, w) in zip(dets_sc, sc)]
    for (p, _), sh, ch in zip(sc, shape_hits, color_hits):
        per_prompt[p] = {"shape": sh / samples_per_prompt, "color": ch / samples_per_prompt}

    bg = sets["background"]
    imgs_bg = generate(bb, [p for p, _ in bg], samples_per_prompt, seed, steps, guidance,
                       progress=progress, desc="background")
    dets_bg = _detect(imgs_bg)
    bg_hits = [sum(d.background == w.background for d in row) for row, (_, w) in zip(dets_bg, bg)]
    for (p, _), h in zip(bg, bg_hits):
        per_prompt[p] = {"background": h / samples_per_prompt}

    tokens, wants = _steering_exemplars(bb, seed)
    imgs_ip = generate(bb, [""] * len(wants), samples_per_prompt, seed, steps, guidance,
                       image_tokens=tokens, progress=progress, desc="image steering")
    dets_ip = _detect(imgs_ip)
    steer_shape = [sum(d.shape == w.shape for d in row) for row, w in zip(dets_ip, wants)]
    steer_color = [sum(d.color == w.color for d in row) for row, w in zip(dets_ip, wants)]
    # text and image together, as the erasure's teacher sees them: each shape x colour prompt with
    # the exemplar of the same shape and colour (a branch that overshoots beside a caption loses it)
    imgs_joint = generate(bb, [p for p, _ in sc], samples_per_prompt, seed, steps, guidance,
                          image_tokens=tokens, progress=progress, desc="text + image")
    joint_shape = [sum(d.shape == w.shape for d in row) for row, (_, w) in zip(_detect(imgs_joint), sc)]

    n_sc, n_bg, n_ip = len(sc) * samples_per_prompt, len(bg) * samples_per_prompt, len(wants) * samples_per_prompt
    summary = {
        "shape_acc": round(sum(shape_hits) / n_sc, 4),
        "color_acc": round(sum(color_hits) / n_sc, 4),
        "axis3_acc": round(sum(bg_hits) / n_bg, 4),
        "image_steer_acc": round(sum(steer_shape) / n_ip, 4),
        "image_steer_color_acc": round(sum(steer_color) / n_ip, 4),
        "text_image_shape_acc": round(sum(joint_shape) / n_sc, 4),
        "none_rate": round(sum(d.shape == "none" for row in dets_sc for d in row) / n_sc, 4),
        "samples_per_prompt": samples_per_prompt,
        "prompts": {"shape_color": len(sc), "background": len(bg), "image_steer": len(wants)},
        "sampler": {"scheduler": "Euler" if bb.prediction_type == "flow" else "DDIM", "steps": steps, "guidance": guidance, "seed": seed},
        "seconds": round(time.time() - t0, 1),
    }
    per_shape = {s: round(sum(h for h, (_, w) in zip(shape_hits, sc) if w.shape == s)
                          / (len(data.COLORS) * samples_per_prompt), 4) for s in data.SHAPES}
    per_color = {c: round(sum(h for h, (_, w) in zip(color_hits, sc) if w.color == c)
                          / (len(data.SHAPES) * samples_per_prompt), 4) for c in data.COLORS}
    report = {"summary": summary, "per_shape": per_shape, "per_color": per_color,
              "per_prompt": per_prompt}
    if grid_path is not None:
        _world_grid(grid_path, imgs_sc, dets_sc, sc, summary)
    return report


def _steering_exemplars(bb, seed: int) -> tuple[torch.Tensor, list[data.Concepts]]:
    """Image tokens of one exemplar per shape x colour on a random background, and its concepts."""
    rng = np.random.default_rng(seed + 7)
    exemplars, wants = [], []
    for s in data.SHAPES:
        for c in data.COLORS:
            b = data.BACKGROUNDS[rng.integers(len(data.BACKGROUNDS))]
            exemplars.append(data.render(s, c, b, rng))
            wants.append(data.Concepts(s, c, b))
    ex = torch.from_numpy(np.stack(exemplars)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return bb.encode_images(ex), wants


def probe_world(bb: ShapesWorldBackbone, part: str, samples_per_prompt: int = 4, seed: int = 1000,
                steps: int = 20, guidance: float = 1.5, grid: str | Path | None = None) -> dict[str, float]:
    """A quick detector check of a model in training, on seeds the evaluation does not use.

    ``part`` "text": shape and colour accuracy over the shape x colour prompts, background
    accuracy over the background prompts; "image": image steering (shape), and the shape
    kept when a shape x colour prompt comes with its matching exemplar. Every sample starts
    from its own noise: with sample j of every prompt on the same noise (seed + j, as probes were
    until 2026-12-06), one unlucky noise weighed on every prompt at once, and the shipped flow world
    probed shape 0.91 where 16 samples read 0.96 (one of the four noises alone read 0.76).
    ``grid``: where to save the shape x colour samples as a PNG ("text" only)."""
    sets = world_prompt_sets()
    gen = functools.partial(generate, bb, samples_per_prompt=samples_per_prompt, seed=seed, steps=steps,
                            guidance=guidance, distinct_noise=True)
    if part == "text":
        sc, bg = sets["shape_color"], sets["background"]
        imgs = gen([p for p, _ in sc])
        dets = _detect(imgs)
        dets_bg = _detect(gen([p for p, _ in bg]))
        n = len(sc) * samples_per_prompt
        if grid is not None:
            _probe_grid(grid, imgs, dets, sc)
        return {"shape": round(sum(d.shape == w.shape for row, (_, w) in zip(dets, sc) for d in row) / n, 4),
                "color": round(sum(d.color == w.color for row, (_, w) in zip(dets, sc) for d in row) / n, 4),
                "background": round(sum(d.background == w.background for row, (_, w) in zip(dets_bg, bg)
                                        for d in row) / (len(bg) * samples_per_prompt), 4)}
    if part == "image":
        tokens, wants = _steering_exemplars(bb, seed)
        n = len(wants) * samples_per_prompt
        dets = _detect(gen([""] * len(wants), image_tokens=tokens))
        joint = _detect(gen([data.prompt(w.shape, w.color) for w in wants], image_tokens=tokens))
        return {"image_steer": round(sum(d.shape == w.shape for row, w in zip(dets, wants) for d in row) / n, 4),
                "text_image": round(sum(d.shape == w.shape for row, w in zip(joint, wants) for d in row) / n, 4)}
    raise ValueError(f"part must be 'text' or 'image', got {part!r}")


def _probe_grid(path, imgs, dets, prompts) -> None:
    from ..grid import make_grid, save_png

    marks = np.array([[not _correct(d, w) for d in row] for row, (_, w) in zip(dets, prompts)])
    save_png(path, make_grid(imgs, [p for p, _ in prompts], None, cell_px=48, label_px=170,
                             title=Path(path).stem, marks=marks))


def _world_grid(path, imgs, dets, prompts, summary) -> None:
    from ..grid import make_grid, save_png

    cols = min(8, imgs.shape[1])
    marks = np.array([[not _correct(d, w) for d in row[:cols]] for row, (_, w) in zip(dets, prompts)])
    title = (f"ShapesWorld: shape {summary['shape_acc']:.3f}  colour {summary['color_acc']:.3f}  "
             f"(red frame = detector disagrees with the prompt)")
    save_png(path, make_grid(imgs[:, :cols], [p for p, _ in prompts], None, cell_px=64,
                             label_px=230, title=title, marks=marks))


def write_model_card(model: str | Path | None, report: dict) -> Path:
    """(Re)write model_card.md and the measured numbers in world.json of a model folder."""
    from ..io import atomic_write_text
    from .models import world_folder

    folder = world_folder(model)
    meta = json.loads((folder / "world.json").read_text())
    meta["quality"] = report["summary"]
    meta["quality_per_shape"] = report["per_shape"]
    meta["quality_per_color"] = report["per_color"]
    atomic_write_text(folder / "world.json", json.dumps(meta, indent=2))
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    q, cfg, tr = report["summary"], meta["config"], meta.get("train", {})
    secs = meta.get("seconds", {})
    stopped = meta.get("stopped_at", {})

    def trained(stage: str, key: str) -> str:  # steps a stage ran; a probe may have ended it early
        if stage in stopped:
            return f"{stopped[stage]} (of at most {tr.get(key)}; a detector probe ended it)"
        return str(tr.get(key))

    probe_lines = [f"- probes during {st}: " + "; ".join(
        f"{step}: " + " ".join(f"{k} {v:.2f}" for k, v in q.items()) for step, q in rows)
        for st, rows in meta.get("probes", {}).items() if rows]
    lines = [
        "# ShapesWorld model card" if meta.get("arch", "unet") == "unet" else "# ShapesWorld-Flow model card", "",
        "A tiny text-to-image diffusion stack that mirrors "
        + ("SD1.5 + IP-Adapter" if meta.get("arch", "unet") == "unet" else "FLUX + Redux") + ", trained from scratch",
        "on procedural images by `bierasing world train`. It exists so that concept erasure can be",
        "trained and *measured* on a 2-core CPU with nothing to download.", "",
        "## Data",
        f"- {data.IMAGE_SIZE}x{data.IMAGE_SIZE} RGB; shapes {', '.join(data.SHAPES)}; colours "
        f"{', '.join(data.COLORS)}; backgrounds {', '.join(data.BACKGROUNDS)}.",
        "- Captions from several templates, each concept by its canonical word or a synonym;",
        "  captions mention 1-3 of the axes.", "",
        "## Models",
        f"- text encoder: CLIPTextModelWithProjection, width {cfg['text_width']}, {cfg['text_layers']} layers, "
        f"{cfg['max_text_len']} tokens (word-level tokenizer)",
        f"- image encoder: CLIPVisionModelWithProjection, width {cfg['vision_width']}, patch 4, "
        f"joint embedding {cfg['embed_dim']}",
        *_denoiser_lines(meta.get("arch", "unet"), cfg, tr, trained, size),
        "- wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items())
        + f"; total {sum(secs.values()) / 60:.1f} min", *probe_lines, "",
        f"## Measured quality ({q['sampler']['scheduler']} {q['sampler']['steps']} steps, "
        f"CFG {q['sampler']['guidance']}, "
        f"{q['samples_per_prompt']} samples per prompt, detector-scored)", "",
        "| metric | value | bar |", "|---|---|---|",
        f"| shape accuracy ({q['prompts']['shape_color']} shape x colour prompts) | {q['shape_acc']:.3f} | >= 0.90 |",
        f"| colour accuracy | {q['color_acc']:.3f} | >= 0.90 |",
        f"| background accuracy ({q['prompts']['background']} prompts) | {q['axis3_acc']:.3f} | >= 0.85 |",
        f"| image steering, shape (empty prompt + exemplar) | {q['image_steer_acc']:.3f} | >= 0.80 |",
        f"| image steering, colour | {q['image_steer_color_acc']:.3f} | - |",
        *([f"| text + matching exemplar together, shape | {q['text_image_shape_acc']:.3f} | - |"]
          if "text_image_shape_acc" in q else []),
        f"| samples the detector calls 'none' | {q['none_rate']:.3f} | - |", "",
        "Per shape: " + ", ".join(f"{k} {v:.2f}" for k, v in report["per_shape"].items()),
        "", "Per colour: " + ", ".join(f"{k} {v:.2f}" for k, v in report["per_color"].items()), "",
        "Re-measure: `bierasing world eval --json" + ("`." if meta.get("arch", "unet") == "unet"
                                                   else " --model shapesworld-flow`."), "",
    ]
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    path = folder / "model_card.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _denoiser_lines(arch: str, cfg: dict, tr: dict, trained, size: int) -> list[str]:
    """Model-card lines on the denoiser, its image branch and the recipe, by world architecture."""
    common = (f"caption dropout {tr.get('caption_dropout')}); image encoder {tr.get('vision_steps')} steps x "
              f"{tr.get('clip_batch')}; ")
    head = f"- seed {tr.get('seed')}; contrastive {tr.get('clip_steps')} steps x {tr.get('clip_batch')}; "
    if arch == "flow":
        side = data.IMAGE_SIZE // 2 ** (len(cfg["ae_channels"]) - 1)
        return [
            f"- AutoencoderKL {tuple(cfg['ae_channels'])}: 32x32 RGB <-> {cfg['latent_channels']}x{side}x{side} "
            "latents, FLUX-style shift and scaling factors",
            f"- FluxTransformer2DModel over the latents packed {cfg['patch']}x{cfg['patch']}, {cfg['double_blocks']} "
            f"double-stream + {cfg['single_blocks']} single-stream blocks, {cfg['heads']} heads x {cfg['head_dim']}, "
            f"RoPE, pooled text vector; rectified flow, sigma shift {cfg['shift']}",
            f"- image branch: Redux (redux_up {cfg['vision_width']}->{cfg['redux_hidden']}, redux_down -> "
            f"{cfg['text_width']}) " + (f"over the image encoder's class state, appended {cfg['redux_tokens']} times"
                                          if cfg.get("redux_tokens") else "over every image-encoder hidden state")
            + " after the text tokens",
            f"- weights: {size / 2**20:.2f} MiB of safetensors in total", "", "## Training (this machine: 2 CPU cores, torch threads 2)",
            head + f"autoencoder {tr.get('vae_steps')} steps x {tr.get('unet_batch')}; transformer "
            f"{trained('flow', 'unet_steps')} steps x {tr.get('unet_batch')} (flow matching, "
            f"logit-normal sigma ({tr.get('flow_t_mean')}, {tr.get('flow_t_std')}) shifted by {cfg['shift']}, AdamW lr {tr.get('lr')}, "
            f"cosine, EMA {tr.get('ema')}, edge weight {tr.get('unet_edge_weight', 0)}, pooled-vector dropout "
            f"{tr.get('flow_pooled_dropout', 0)}, " + common + f"Redux {trained('redux', 'ip_steps')} steps x "
            f"{tr.get('ip_batch')} (distill, lr {tr.get('ip_lr')}, empty prompt {tr.get('ip_empty_prompt')}); "
            f"forward passes {tr.get('precision', 'fp32')}"]
    return [
        f"- UNet2DConditionModel, pixel space, channels {tuple(cfg['unet_channels'])}, cross-attention at 8x8 + mid, "
        f"{cfg['prediction_type']}, DDPM {cfg['num_train_timesteps']} steps ({cfg['beta_schedule']})",
        f"- image branch: projector to {cfg['ip_tokens']} tokens + to_k_ip/to_v_ip in every attn2 (ip-adapter_sd15 key layout)",
        f"- weights: {size / 2**20:.2f} MiB of safetensors in total", "", "## Training (this machine: 2 CPU cores, torch threads 2)",
        head + f"UNet {trained('unet', 'unet_steps')} steps x {tr.get('unet_batch')} (AdamW lr {tr.get('lr')}, cosine, "
        f"EMA {tr.get('ema')}, Min-SNR gamma {tr.get('min_snr_gamma', 0)}, edge weight "
        f"{tr.get('unet_edge_weight', 0)}, " + common + "image branch: projector warm "
        f"start {tr.get('ip_warm_steps', 0)} steps, then {trained('ip', 'ip_steps')} steps x {tr.get('ip_batch')} "
        f"({tr.get('ip_objective', 'denoise')}, lr {tr.get('ip_lr', tr.get('lr'))}); "
        f"forward passes {tr.get('precision', 'fp32')}"]


# ---- erasure ---------------------------------------------------------------------------------

def measure_erasure(backbone, target: str, samples_per_prompt: int = 8, seed: int = 0,
                    steps: int = 20, guidance: float = 1.5, synonym: int = 0,
                    progress: bool = False, target_only: bool = False) -> dict:
    """ACC_e / ACC_p / H of ``backbone`` for an erased ShapesWorld concept; keeps the images.

    ``target_only`` samples only the target prompts (ACC_e alone; e.g. for synonym attacks)."""
    axis = data.axis_of(target)
    prompts = erasure_prompts(target, synonym)
    if target_only:
        prompts = [p for p in prompts if p[1] == "target"]
    imgs = generate(backbone, [p for p, _, _ in prompts], samples_per_prompt, seed, steps, guidance,
                    progress=progress, desc=f"eval {target}")
    dets = _detect(imgs)
    scores = []
    for (p, kind, want), row in zip(prompts, dets):
        if kind == "target":
            hits = sum(getattr(d, axis) == target for d in row)
        else:
            hits = sum(_correct(d, want) for d in row)
        scores.append(PromptScore(p, kind, len(row), hits))
    if target_only:
        result = {"acc_e": sum(s.rate for s in scores) / len(scores),
                  "per_prompt": [{"prompt": s.prompt, "rate": s.rate} for s in scores]}
    else:
        result = erasure_scores(scores)
    result.update({"target": target, "axis": axis, "samples_per_prompt": samples_per_prompt,
                   "images": imgs, "detections": dets, "prompts": prompts})
    return result
