"""Retrain a flow world's Redux with one input variant and measure image steering (docs/shapesworld.md,
"Redux's share of attention").

    python bench/redux_variants.py --model runs/flow_deep4/model --variant cls16 --steps 1800 --out runs/rx/cls16

Variants: ``all`` (every image-encoder hidden state once, the recipe before 2026-12-06), ``clsN``
(the class state N times; ``cls`` = once), ``embed`` (the projected image embedding once), ``pool``
(the class state and 2x2 mean-pooled patch states). ``--teacher tokens`` gives the distillation
teacher the empty prompt's pooled vector beside the caption's tokens. Only the Redux stage trains
(from the model's transformer and encoders); the result line is 8 samples per prompt on seeds 0-7.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bierasing.world import data, flow_train  # noqa: E402
from bierasing.world.evaluate import _detect, _steering_exemplars, generate  # noqa: E402
from bierasing.world.flow import FlowWorldBackbone, FlowWorldConfig  # noqa: E402
from bierasing.world.train import TrainConfig, train_world  # noqa: E402


def patch_variant(variant: str) -> int:
    """Set how Redux reads the image encoder; returns the world's ``redux_tokens``."""
    if variant == "all":
        return 0
    if variant.startswith("cls"):
        return int(variant[3:] or 1)

    def tokens_of(self, states):
        if variant == "embed":
            return self.image_proj(self.image_encoder.visual_projection(
                self.image_encoder.vision_model.post_layernorm(states[:, :1])))
        b, n, d = states.shape
        side = int((n - 1) ** 0.5)
        grid = states[:, 1:].reshape(b, side, side, d).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        return self.image_proj(torch.cat([states[:, :1], pooled], 1))

    if variant not in ("embed", "pool"):
        raise SystemExit(f"unknown variant {variant!r}")
    FlowWorldBackbone.redux_tokens_of = tokens_of
    return 1


def patch_teacher() -> None:
    """Distil from the caption's tokens beside the empty prompt's pooled vector."""
    encode = FlowWorldBackbone.encode_text
    stage = flow_train.FlowWorldTrainer._stage_redux

    def stage_redux(self):
        bb = self.bb
        with torch.no_grad():
            empty = encode(bb, [""])[0, -1]

        def encode_text(prompts):
            out = encode(bb, prompts)
            if len(prompts) and all(prompts):  # the teacher's full captions (the student's may be empty)
                out = out.clone()
                out[:, -1] = empty
            return out

        bb.encode_text = encode_text
        try:
            stage(self)
        finally:
            del bb.encode_text

    flow_train.FlowWorldTrainer._stage_redux = stage_redux


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a flow world model folder (its transformer and encoders stay)")
    p.add_argument("--variant", default="cls16")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--empty-prompt", type=float, default=None, help="ip_empty_prompt (default: the model's)")
    p.add_argument("--teacher", choices=("full", "tokens"), default="full")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    meta = json.loads((Path(args.model) / "world.json").read_text())
    cfg = FlowWorldConfig.from_json(meta["config"])
    cfg.redux_tokens = patch_variant(args.variant)
    if args.teacher == "tokens":
        patch_teacher()
    train = {**meta["train"], "ip_steps": args.steps, "ip_stop_at": 0.99, "probe_every": 300}
    if args.empty_prompt is not None:
        train["ip_empty_prompt"] = args.empty_prompt
    t0 = time.time()
    bb = train_world(args.out, TrainConfig(**train), cfg, progress=False, log=print,
                     init_from=args.model, start_stage="redux")
    minutes = (time.time() - t0) / 60
    with torch.no_grad():
        tokens, wants = _steering_exemplars(bb, 0)
        alone = _detect(generate(bb, [""] * len(wants), 8, 0, 20, 1.5, image_tokens=tokens))
        joint = _detect(generate(bb, [data.prompt(w.shape, w.color) for w in wants], 8, 0, 20, 1.5,
                                 image_tokens=tokens))
    n = len(wants) * 8
    row = {"variant": args.variant, "teacher": args.teacher, "steps": args.steps,
           "empty_prompt": train["ip_empty_prompt"], "minutes": round(minutes, 1),
           "steering": sum(d.shape == w.shape for r, w in zip(alone, wants) for d in r) / n,
           "none": sum(d.shape == "none" for r in alone for d in r) / n,
           "text_image": sum(d.shape == w.shape for r, w in zip(joint, wants) for d in r) / n}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
