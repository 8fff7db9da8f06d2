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
    tcfg = TrainConfig(seed=args.seed, clip_steps=args.clip_steps, unet_steps=args.unet_steps,
                       ip_steps=args.ip_steps, checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    try:
        with _CtrlC() as stop:
            train_world(out, tcfg, progress=not args.quiet, should_stop=stop)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bierasing", description="Bi-Erasing: concept erasure for diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)

    world = sub.add_parser("world", help="ShapesWorld: the tiny text-to-image world shipped with bierasing")
    wsub = world.add_subparsers(dest="world_cmd", required=True)

    t = wsub.add_parser("train", help="train ShapesWorld from scratch (resumable)")
    t.add_argument("--out", default="runs/world", help="output folder; re-running resumes from its checkpoint")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--clip-steps", type=int, default=400)
    t.add_argument("--unet-steps", type=int, default=3500)
    t.add_argument("--ip-steps", type=int, default=1000)
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument("--eval-samples", type=int, default=16, help="samples per prompt for the model card")
    t.add_argument("--skip-eval", action="store_true", help="do not measure quality after training")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_world_train)

    e = wsub.add_parser("eval", help="measure a ShapesWorld model with the detector")
    e.add_argument("--model", default=None, help="model folder (default: the shipped weights)")
    e.add_argument("--samples", type=int, default=16, help="samples per prompt (>= 16 for the quality bar)")
    e.add_argument("--steps", type=int, default=20, help="DDIM steps")
    e.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--grid", default=None, help="write a labelled sample grid PNG here")
    e.add_argument("--write-card", action="store_true", help="rewrite the model card with these numbers")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_cmd_world_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"bierasing: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
