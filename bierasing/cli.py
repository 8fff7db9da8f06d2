"""Command line: ``bierasing world train|eval``.

Every command sets torch's thread count explicitly (``--threads``, default 2): on small CPUs an
oversubscribed torch runs many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class _CtrlC:
    """First Ctrl-C asks the running loop to checkpoint and stop; a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        import signal

        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self._old)
        return False

    def __call__(self) -> bool:
        return self.requested


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _cmd_world_train(args) -> int:
    from .world.train import TrainConfig, TrainingInterrupted, train_world

    _threads(args.threads)
    given = {k: getattr(args, k) for k in ("clip_steps", "unet_steps", "vision_steps", "ip_warm_steps",
                                            "ip_steps", "checkpoint_every", "ip_empty_prompt", "ip_objective",
                                            "unet_batch", "ip_batch", "lr", "probe_every", "probe_from",
                                            "unet_stop_at", "ip_stop_at", "precision", "ip_lr",
                                            "unet_edge_weight", "unet_curriculum", "flow_pooled_dropout",
                                            "flow_t_mean")
             if getattr(args, k) is not None}
    tcfg = TrainConfig(seed=args.seed, arch=args.arch, **given)
    wcfg = None
    if args.cross_attn_levels is not None:
        if args.arch != "unet":
            raise ValueError("--cross-attn-levels sets the UNet world; the flow transformer attends everywhere")
        from .world.models import WorldConfig

        wcfg = WorldConfig(cross_attn_levels=args.cross_attn_levels)
    if args.flow_blocks is not None:
        if args.arch != "flow":
            raise ValueError("--flow-blocks sets the flow world's transformer (--arch flow)")
        from .world.flow import FlowWorldConfig

        try:
            double, single = (int(n) for n in args.flow_blocks.split(","))
        except ValueError:
            raise ValueError(f"--flow-blocks takes two counts, double-stream,single-stream (e.g. 4,2), "
                             f"got {args.flow_blocks!r}") from None
        if double < 1 or single < 0:
            raise ValueError(f"--flow-blocks needs at least one double-stream block and no negative count, "
                             f"got {args.flow_blocks!r}")
        wcfg = FlowWorldConfig(double_blocks=double, single_blocks=single)
    if args.init_from and not args.start_stage:
        raise ValueError("--init-from needs --start-stage (the stage to begin at)")
    out = Path(args.out)
    try:
        with _CtrlC() as stop:
            train_world(out, tcfg, wcfg, progress=not args.quiet, should_stop=stop,
                        init_from=args.init_from, start_stage=args.start_stage)
    except TrainingInterrupted as e:
        print(f"bierasing: {e}", file=sys.stderr)
        return 130
    model = out / "model"
    if not args.skip_eval:
        from .world.evaluate import evaluate_world, write_model_card

        report = evaluate_world(model, samples_per_prompt=args.eval_samples, progress=not args.quiet)
        write_model_card(model, report)
        print(json.dumps(report["summary"]))
    print(f"wrote {model}")
    return 0


def _cmd_world_eval(args) -> int:
    from .world.evaluate import evaluate_world, write_model_card

    _threads(args.threads)
    report = evaluate_world(args.model, samples_per_prompt=args.samples, steps=args.steps,
                            guidance=args.guidance, seed=args.seed, progress=not args.json,
                            grid_path=args.grid)
    if args.write_card:
        write_model_card(args.model, report)
    if args.json:
        print(json.dumps(report["summary"]))
    else:
        for k, v in report["summary"].items():
            print(f"{k:>22}: {v}")
    return 0


def _load_backbone(args, method: str | None = None):
    """The model named by --model (with --ip-adapter / --image-encoder), checked before loading."""
    from . import methods
    from .loading import load_backbone, model_kind

    kind = model_kind(args.model)
    ip, enc = getattr(args, "ip_adapter", None), getattr(args, "image_encoder", None)
    if kind != "world" and method and methods.get(method).needs_image_encoder and not (ip and enc):
        raise ValueError(f"{method} conditions on exemplar images through an image branch: give --ip-adapter "
                         "(ip-adapter_sd15 or ip-adapter_sdxl_vit-h .safetensors; FLUX: flux1-redux-dev) and "
                         "--image-encoder (its CLIP vision folder; FLUX: SigLIP), or use --method esd-x / esd-u "
                         "(text only)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file "Loading weights" bars say nothing to act on
    resolution = getattr(args, "resolution", None) or (1024 if kind in ("sdxl", "sdxl_file") else 512)
    return load_backbone(args.model, ip, enc, resolution=resolution, device=getattr(args, "device", None),
                         config=getattr(args, "model_config", None), dtype=getattr(args, "dtype", "auto"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (shipped), a ShapesWorld model folder, a diffusers SD1.x, SDXL or FLUX.1 "
                        "pipeline folder, or a single-file SD1.x or SDXL .safetensors checkpoint")
    p.add_argument("--model-config", default=None,
                   help="diffusers config folder for a single-file checkpoint whose sizes differ from SD1.5's or "
                        "SDXL base's (default: those configs, shipped with the package)")
    p.add_argument("--ip-adapter", default=None,
                   help="image branch of a real model (bi-erasing, co-erasing): ip-adapter_sd15 or "
                        "ip-adapter_sdxl(_vit-h) .safetensors; for FLUX.1 the Redux file (flux1-redux-dev)")
    p.add_argument("--image-encoder", default=None,
                   help="the vision encoder folder the --ip-adapter was trained with (ViT-H/14; bigG for "
                        "ip-adapter_sdxl; SigLIP so400m-patch14-384 for Redux)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size of a real model's samples and exemplars (default: SD1.x and FLUX 512, SDXL 1024)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="a real model's weights; the trained adapters stay fp32. auto: fp32, but bf16 for FLUX on "
                        "a GPU (fp32 FLUX needs about 48 GB for the transformer alone)")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")] if text else []


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per EraseConfig field, help text from the dataclass (declared once)."""
    from dataclasses import MISSING, fields

    from .erase.config import EraseConfig

    g = p.add_argument_group("erasure settings")
    for f in fields(EraseConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": f.metadata["help"], "default": f.default if f.default is not MISSING else None}
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=kw["help"])
            continue
        kw["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        g.add_argument(flag, **kw)


def _config_from_args(args):
    from dataclasses import fields

    from .erase.config import EraseConfig

    return EraseConfig(**{f.name: getattr(args, f.name) for f in fields(EraseConfig)})


def _cmd_erase(args) -> int:
    from .erase.job import ConceptSpec, ExemplarSpec, run_erase_job
    from .erase.masks import MaskFilter

    _threads(args.threads)
    cfg = _config_from_args(args)
    targets, safes = _split(args.concept), _split(args.safe)
    if not targets:
        raise ValueError("give the concept(s) to erase with --concept (comma-separated for several)")
    if safes and len(safes) != len(targets):
        raise ValueError(f"{len(targets)} concepts but {len(safes)} safe alternatives; give one per concept")
    bb = _load_backbone(args, cfg.method)
    if not safes:
        safes = [bb.default_safe(t) for t in targets]
    negs, poss = _split(args.neg_exemplars) or ["generate"], _split(args.pos_exemplars) or ["generate"]
    pick = lambda lst, i: lst[i] if len(lst) > 1 else lst[0]  # noqa: E731
    specs = [ConceptSpec(t, s, ExemplarSpec(pick(negs, i), args.exemplars, auto_mask=args.auto_mask),
                         ExemplarSpec(pick(poss, i), args.exemplars, auto_mask=args.auto_mask))
             for i, (t, s) in enumerate(zip(targets, safes))]
    with _CtrlC() as stop:
        from .erase.engine import ErasureInterrupted

        try:
            report = run_erase_job(bb, specs, cfg, args.out, name=args.name, eval_samples=args.eval_samples,
                                   mask_filter=MaskFilter(threshold=args.mask_threshold),
                                   progress=not args.json, should_stop=stop,
                                   log=(lambda m: print(m, file=sys.stderr)), on=_split(args.on))
        except ErasureInterrupted as e:
            print(f"bierasing: {e}", file=sys.stderr)
            return 130
    summary = {k: report.get(k) for k in ("acc_e", "acc_p", "h", "seconds", "peak_rss_mb", "output")}
    summary.update({"grid": report.get("grid"), "report": str(Path(args.out) / "report.md")})
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>12}: {v}")
    return 0


def _cmd_eval(args) -> int:
    from .erase.adapters import AdapterSet
    from .erase.export import load_erasure

    _threads(args.threads)
    bb = _load_backbone(args)
    scorer = bb.erasure_scorer()
    if args.attack and not scorer.can_attack:
        raise ValueError("--attack scores attacks with a detector of the concept, which this model does not have "
                         "(ShapesWorld has one); drop --attack")
    adapters = load_erasure(bb.unet, args.erasure, args.strength)[0] if args.erasure else AdapterSet({})
    out = {}
    try:
        for target in _split(args.concept):
            r = scorer.score(bb, adapters, [(target, "")], args.samples, out=args.out, seed=args.seed,
                             before=args.baseline)
            entry = r["per_concept"][0] if r.get("per_concept") else {}
            res = {k: v for k, v in entry.items() if k not in ("target", "safe")}
            res.update(res.pop("after", {}))
            if r.get("grid"):
                res["grid"] = r["grid"]
            if args.attack:
                res["attacks"] = scorer.attack(bb, target, samples=args.samples, seed=args.seed,
                                               steps=args.attack_steps)
            out[target] = res
    finally:
        adapters.remove(bb.unet)
    result = {"erasure": args.erasure, "samples_per_prompt": args.samples, "concepts": out}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _cmd_suggest(args) -> int:
    from . import related

    _threads(args.threads)
    targets, safes = _split(args.concept), _split(args.safe)
    if safes and len(safes) != len(targets):
        raise ValueError(f"{len(targets)} concepts but {len(safes)} safe alternatives; give one per concept")
    bb = _load_backbone(args)
    safes = safes or [bb.default_safe(t) for t in targets]
    pairs = list(zip(targets, safes))
    vocabs = [bb.related_vocabulary(t) for t in targets]
    cache: dict = {}
    near = [related.nearest(bb, t, v, len(v.phrases), related.related_excluded(pairs, i), cache=cache)
            for i, (t, v) in enumerate(zip(targets, vocabs))]
    keep, contexts = related.suggest(bb, pairs, args.contexts, hold=args.hold, neighbours=near)
    out = {"concepts": [{"target": t, "safe": s, "nearest": n[:args.hold]} for (t, s), n in zip(pairs, near)]}
    out.update(preserve=keep, contexts=contexts)
    if args.json:
        print(json.dumps(out))
        return 0
    for c in out["concepts"]:
        print(f"{c['target']} (safe: {c['safe'] or 'none'}) nearest: "
              + ", ".join(f"{p} {cos:.2f}" for p, cos in c["nearest"]))
    print("preserve: " + ", ".join(keep))
    for (t, _), ctx in zip(pairs, contexts):
        print(f"contexts of {t}: " + "; ".join(f"{a} -> {b}" for a, b in ctx))
    return 0


def _cmd_fuse(args) -> int:
    from .erase.fuse import fuse_single_file

    erasures = _split(args.erasure)
    strengths = [float(v) for v in _split(args.strength)] or None
    if strengths is not None and len(strengths) == 1:
        strengths = strengths * len(erasures)
    fused = fuse_single_file(args.model, erasures, args.out, strengths, args.model_config)
    if args.json:
        print(json.dumps({"output": args.out, **fused}))
    else:
        print(f"wrote {args.out}: {len(fused['erasures'])} erasure(s) merged into {fused['layers']} UNet layers")
    return 0


def _cmd_merge(args) -> int:
    from .erase.export import file_layout, save_erasure_tensors
    from .erase.stack import stack

    _threads(args.threads)
    erasures = _split(args.erasure)
    if len(erasures) < 2:
        raise ValueError("give at least two erasure files to merge, comma-separated, with --erasure")
    out = Path(args.out).resolve()
    if any(Path(e).resolve() == out for e in erasures):
        raise ValueError(f"{out.name} is both an erasure to merge and the output; give another --out")
    if args.precision == "auto":  # the first file's own
        from .erase.export import SAVE_DTYPES, read_erasure

        dt = next(v.dtype for k, v in read_erasure(erasures[0])[0].items() if not k.endswith(".alpha"))
        args.precision = next((n for n, d in SAVE_DTYPES.items() if d == dt), "fp32")
    if args.how == "kv":
        from .erase.merge import merge_kv

        tensors, info = merge_kv(_load_backbone(args), erasures, precision=args.precision)
    else:
        tensors, info = stack(erasures, precision=args.precision)
    path = save_erasure_tensors(out, tensors, info, *file_layout(erasures))
    summary = {"output": str(path), "how": args.how, "concepts": [c["target"] if isinstance(c, dict) else c
                                                                  for c in info.get("concepts", [])]}
    print(json.dumps(summary) if args.json else f"wrote {path}: {len(erasures)} erasures merged ({args.how})")
    return 0


def _cmd_standins(args) -> int:
    from . import comfy_standins

    if args.remove:
        removed = comfy_standins.remove_standins(args.comfyui)
        print(f"removed {len(removed)} stand-in files")
        return 0
    written = comfy_standins.write_standins(args.comfyui, seed=args.seed, vision=not args.no_vision,
                                            sdxl=not args.no_sdxl)
    print(f"wrote {len(written)} stand-in files (random weights: the images are noise); "
          "remove them with: bierasing standins --remove --comfyui " + args.comfyui)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bierasing", description="Bi-Erasing: concept erasure for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)

    world = sub.add_parser("world", help="ShapesWorld: the tiny text-to-image world shipped with bierasing")
    wsub = world.add_subparsers(dest="world_cmd", required=True)

    t = wsub.add_parser("train", help="train ShapesWorld from scratch (resumable)")
    t.add_argument("--out", default="runs/world", help="output folder; re-running resumes from its checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", default="unet", choices=("unet", "flow"),
                   help="unet: SD1.5 + IP-Adapter in miniature (the shipped 'shapesworld'); flow: a FLUX-layout "
                        "rectified-flow transformer + Redux ('shapesworld-flow'). --unet-* and --ip-* set "
                        "the denoiser and image-branch stages of either")
    for name in ("clip_steps", "unet_steps", "vision_steps", "ip_warm_steps", "ip_steps", "checkpoint_every"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help="default: TrainConfig in bierasing/world/train.py")
    t.add_argument("--ip-empty-prompt", type=float, default=None,
                   help="share of image-branch steps with an empty prompt (default: TrainConfig); more steers "
                        "harder from the image alone but overshoots beside a caption (see the model card)")
    for name in ("unet_batch", "ip_batch", "probe_every", "probe_from"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help="default: TrainConfig in bierasing/world/train.py")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the clip, unet and vision stages (default: TrainConfig)")
    t.add_argument("--ip-lr", type=float, default=None,
                   help="peak learning rate of the ip_warm and ip stages (default: TrainConfig)")
    t.add_argument("--unet-curriculum", type=int, default=None,
                   help="denoiser steps over which shapes move from the image centre to anywhere "
                        "(default: TrainConfig; 0 = anywhere from the start)")
    t.add_argument("--unet-edge-weight", type=float, default=None,
                   help="weight the denoiser loss towards the shapes' outlines: each pixel 1 + this x edge "
                        "(default: TrainConfig; 0 = plain MSE)")
    t.add_argument("--flow-pooled-dropout", type=float, default=None,
                   help="flow world: share of steps where the transformer sees the empty prompt's pooled "
                        "vector beside the caption's tokens, so it reads the concepts from the tokens "
                        "(default 0.5; 0 = off)")
    t.add_argument("--flow-t-mean", type=float, default=None,
                   help="flow world: mean of the logit-normal noise-level draw before the time shift; lower "
                        "trains more at low noise, where outlines (shapes) are drawn (default: TrainConfig)")
    t.add_argument("--flow-blocks", default=None,
                   help="flow world: double-stream,single-stream transformer blocks (default 4,2). Double-stream "
                        "blocks give the caption's tokens their own layers; a start stage after flow needs the "
                        "source model's counts")
    t.add_argument("--cross-attn-levels", type=int, default=None,
                   help="UNet levels with text cross-attention, from 8x8 up (default 1 = 8x8 only; 2 adds "
                        "16x16 at about twice the step time)")
    t.add_argument("--unet-stop-at", type=float, default=None,
                   help="end the UNet stage at the first detector probe with this shape accuracy "
                        "(default: TrainConfig; 0 = always train --unet-steps)")
    t.add_argument("--ip-stop-at", type=float, default=None,
                   help="end the image-branch stage at the first probe with this image steering (0 = off)")
    t.add_argument("--ip-objective", default=None, choices=("distill", "features", "hybrid", "attn", "denoise"),
                   help="image-branch loss (default: TrainConfig; its help says what each measured)")
    t.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="UNet and image-branch forward passes (default: TrainConfig; bf16 = torch.autocast)")
    t.add_argument("--start-stage", default=None, choices=("unet", "vision", "ip_warm", "ip", "flow", "redux"),
                   help="begin at this stage, taking the earlier stages' weights from --init-from (e.g. "
                        "ip_warm, or redux for --arch flow, retrains only the image branch)")
    t.add_argument("--init-from", default=None,
                   help="model folder for --start-stage (default: the shipped ShapesWorld weights)")
    t.add_argument("--eval-samples", type=int, default=16, help="samples per prompt for the model card")
    t.add_argument("--skip-eval", action="store_true", help="do not measure quality after training")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_world_train)

    e = wsub.add_parser("eval", help="measure a ShapesWorld model with the detector")
    e.add_argument("--model", default=None,
                   help="'shapesworld' (default), 'shapesworld-flow' or a model folder")
    e.add_argument("--samples", type=int, default=16, help="samples per prompt (>= 16 for the quality bar)")
    e.add_argument("--steps", type=int, default=20, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--grid", default=None, help="write a labelled sample grid PNG here")
    e.add_argument("--write-card", action="store_true", help="rewrite the model card with these numbers")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_cmd_world_eval)

    er = sub.add_parser("erase", help="erase concept(s) from a model; writes a LoRA, a grid and a report")
    _add_model_args(er)
    er.add_argument("--concept", required=True, help="concept(s) to erase, comma-separated (e.g. circle,red)")
    er.add_argument("--safe", default="", help="safe alternative per concept, comma-separated (default: the "
                    "model's suggestion where it has one, e.g. a ShapesWorld neighbour)")
    er.add_argument("--neg-exemplars", default="generate", help="'generate' or folder(s) of concept images (+ *_mask.png)")
    er.add_argument("--pos-exemplars", default="generate", help="'generate' or folder(s) of safe-alternative images")
    er.add_argument("--exemplars", type=int, default=16, help="exemplars per branch")
    er.add_argument("--mask-threshold", type=float, default=0.4, help="binarisation threshold of masks")
    er.add_argument("--auto-mask", choices=("auto", "attention", "none"), default="auto",
                    help="exemplars without a mask file: attention = mask by the model's cross-attention to the "
                         "concept word; none = unmasked; auto = attention, except for whole-image concepts "
                         "(a style or background: a phrase naming one, or a ShapesWorld background), which "
                         "stay unmasked. Use none for an artist's style")
    er.add_argument("--out", default="outputs/erase", help="output folder")
    er.add_argument("--name", default="erasure", help="file name of the LoRA (without .safetensors)")
    er.add_argument("--on", default="", help="erasure file(s) the model already carries, comma-separated in the "
                    "order they were made: this erasure is trained on top and its file holds them all. Use it to "
                    "add a concept to an erased model without bringing the others back")
    er.add_argument("--eval-samples", type=int, default=8, help="samples per prompt for the before/after report (0: skip)")
    er.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    er.add_argument("--threads", type=int, default=2)
    _add_config_args(er)
    er.set_defaults(func=_cmd_erase)

    ev = sub.add_parser("eval", help="score a saved erasure: before/after pictures on any model, NudeNet "
                        "counts for nudity, ACC_e / ACC_p / H on ShapesWorld")
    _add_model_args(ev)
    ev.add_argument("--out", default="outputs/eval", help="folder for before_after.png")
    ev.add_argument("--erasure", default=None, help="erasure .safetensors (omit to score the plain model)")
    ev.add_argument("--concept", required=True, help="erased concept(s), comma-separated")
    ev.add_argument("--strength", type=float, default=1.0, help="LoRA strength")
    ev.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--baseline", action="store_true", help="also score the model without the erasure")
    ev.add_argument("--attack", action="store_true",
                    help="also attack the erasure (ShapesWorld): synonyms, paraphrases, a soft prompt and a "
                         "conditioning-space attack; attack success rates, about a minute per concept")
    ev.add_argument("--attack-steps", type=int, default=60, help="optimisation steps of each learned attack")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--threads", type=int, default=2)
    ev.set_defaults(func=_cmd_eval)

    sg = sub.add_parser("suggest", help="what preserve auto and contexts auto will use: the nearest phrases of a "
                        "shipped vocabulary by the model's own text encoder, and context pairs")
    _add_model_args(sg)
    sg.add_argument("--concept", required=True, help="concept(s) to erase, comma-separated")
    sg.add_argument("--safe", default="", help="safe alternative per concept, comma-separated")
    sg.add_argument("--hold", type=int, default=8, help="nearest phrases to hold per concept")
    sg.add_argument("--contexts", type=int, default=4, help="context templates per concept (0: none)")
    sg.add_argument("--json", action="store_true")
    sg.add_argument("--threads", type=int, default=2)
    sg.set_defaults(func=_cmd_suggest)

    fu = sub.add_parser("fuse", help="merge erasure(s) into a copy of a single-file SD1.x or SDXL checkpoint, so "
                        "the erasure cannot be switched off (ComfyUI: Save Checkpoint on the erased MODEL)")
    fu.add_argument("--model", required=True, help="the single-file .safetensors checkpoint the erasures were made for")
    fu.add_argument("--erasure", required=True, help="erasure file(s), comma-separated, in the order they were made")
    fu.add_argument("--strength", default="1", help="LoRA strength, one for all or one per erasure")
    fu.add_argument("--out", required=True, help="the new checkpoint (.safetensors); the original is not changed")
    fu.add_argument("--model-config", default=None, help="diffusers config folder of a checkpoint whose sizes "
                    "differ from SD1.5's or SDXL base's (as for erase)")
    fu.add_argument("--json", action="store_true")
    fu.set_defaults(func=_cmd_fuse)

    me = sub.add_parser("merge", help="erasures trained one concept at a time, as one LoRA: their key/value edits "
                        "fused so each concept keeps what its own erasure gave it (kv), or simply added (sum)")
    me.add_argument("--erasure", required=True, help="erasure files made for the same model, comma-separated")
    me.add_argument("--out", required=True, help="the merged erasure (.safetensors)")
    me.add_argument("--how", default="kv", choices=("kv", "sum"),
                    help="kv: fuse the cross-attention key/value edits in closed form (needs --model; default); "
                         "sum: add the deltas (the same as loading every file)")
    me.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                    help="precision of the merged weights; auto: the first file's")
    me.add_argument("--json", action="store_true")
    me.add_argument("--threads", type=int, default=2)
    _add_model_args(me)
    me.set_defaults(func=_cmd_merge)

    st = sub.add_parser("standins", help="write random-weight stand-ins for the models the shipped templates "
                                         "name into a ComfyUI folder, to try every template without downloads; "
                                         "run with ComfyUI's Python")
    st.add_argument("--comfyui", required=True, help="the ComfyUI folder (the one holding main.py)")
    st.add_argument("--no-vision", action="store_true",
                    help="skip the 1.3 GB ViT-H stand-in (templates with Load CLIP Vision then need a real one)")
    st.add_argument("--no-sdxl", action="store_true",
                    help="skip the SDXL stand-ins (1.9 GB; the *_sdxl templates then need a real SDXL checkpoint)")
    st.add_argument("--remove", action="store_true", help="delete the stand-ins written before (only those)")
    st.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    st.set_defaults(func=_cmd_standins)

    sub.add_parser("batch", add_help=False,
                   help="erase every row of a concept list (CSV/TOML) through a running ComfyUI "
                        "(bierasing batch --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # its own argument parser (bierasing.batch)
        from .batch import main as batch_main

        return batch_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, disk, a loss that became NaN
        print(f"bierasing: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
