"""The ShapesWorld weights shipped in the package: loading, determinism, quality."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from bierasing.sampling import sample
from bierasing.world import data
from bierasing.world.detector import detect_batch
from bierasing.world.evaluate import evaluate_world, generate
from bierasing.world.models import WEIGHTS_DIR


def test_shipped_files_are_small_safetensors_with_a_model_card():
    files = list(WEIGHTS_DIR.rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 4
    assert sum(f.stat().st_size for f in weights) < 20 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (WEIGHTS_DIR / "model_card.md").read_text()
    assert "wall time" in card and "MiB of safetensors" in card and "shape accuracy" in card
    meta = json.loads((WEIGHTS_DIR / "world.json").read_text())
    assert meta["quality"]["samples_per_prompt"] >= 16


def test_same_seed_same_image_other_seed_other_image(world):
    a = sample(world, ["a red circle", "a blue star"], [11, 12], steps=10)
    b = sample(world, ["a red circle", "a blue star"], [11, 12], steps=10)
    c = sample(world, ["a red circle", "a blue star"], [13, 14], steps=10)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01


def test_text_prompts_produce_the_named_shape_and_colour(world):
    prompts = [data.prompt(s, c) for s, c in zip(data.SHAPES, data.COLORS)]
    imgs = generate(world, prompts, 4, seed=100)
    shape = np.mean([[d.shape == s for d in detect_batch(row)] for row, s in zip(imgs, data.SHAPES)])
    color = np.mean([[d.color == c for d in detect_batch(row)] for row, c in zip(imgs, data.COLORS)])
    assert shape >= 0.7 and color >= 0.8, (shape, color)


def test_an_exemplar_image_alone_steers_colour_and_beats_chance_on_shape(world):
    # quick guard (30 samples; shipped weights: colour 1.00, shape 0.93); the 0.80 shape bar is the
    # slow full-evaluation test below
    rng = np.random.default_rng(3)
    ex = np.stack([data.render(s, c, "gray", rng) for s, c in zip(data.SHAPES, data.COLORS)])
    with torch.no_grad():
        tokens = world.encode_images(torch.from_numpy(ex).permute(0, 3, 1, 2).float() / 255)
    imgs = generate(world, [""] * len(data.SHAPES), 6, seed=200, image_tokens=tokens)
    dets = [detect_batch(row) for row in imgs]
    color = np.mean([[d.color == c for d in row] for row, c in zip(dets, data.COLORS)])
    shape = np.mean([[d.shape == s for d in row] for row, s in zip(dets, data.SHAPES)])
    assert color >= 0.9, color
    assert shape >= 0.75, shape  # chance is 0.2


@pytest.fixture(scope="module")
def full_eval():
    return evaluate_world(None, samples_per_prompt=16, progress=False)["summary"]


@pytest.mark.slow
def test_world_meets_the_text_quality_bar(full_eval):
    assert full_eval["shape_acc"] >= 0.90 and full_eval["color_acc"] >= 0.90, full_eval
    assert full_eval["axis3_acc"] >= 0.85, full_eval


@pytest.mark.slow
def test_world_meets_the_image_steering_bar(full_eval):
    assert full_eval["image_steer_acc"] >= 0.80, full_eval


@pytest.mark.slow
def test_text_and_a_matching_exemplar_together_keep_the_shape(full_eval):
    # the erasure's teacher conditions on both; an image branch trained only with empty prompts
    # steered 0.83 but overshot beside a caption (0.39 here, model card); text alone gives ~0.92
    assert full_eval["text_image_shape_acc"] >= 0.85, full_eval


def test_cli_erase_smoke_writes_lora_grid_and_report(tmp_path):
    out = tmp_path / "e"
    r = subprocess.run([sys.executable, "-m", "bierasing.cli", "erase", "--concept", "circle", "--out", str(out),
                        "--steps", "3", "--exemplars", "4", "--eval-samples", "1", "--cache-size", "4", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("acc_e", "acc_p", "h", "seconds", "peak_rss_mb", "output"):
        assert summary[key] is not None, key
    assert (out / "erasure.safetensors").is_file() and (out / "before_after.png").is_file()
    report = (out / "report.md").read_text()
    assert "ACC_e before" in report and "circle" in report
    assert not (out / "checkpoint.safetensors").exists()
    # the trajectory cache is built and reported before the progress bar starts, so its first
    # step's rate is the training rate, not the setup (which showed a 4 h ETA on step 1)
    assert re.search(r"prepared in \d+ s \(\d+ UNet rows of sampling\)", r.stdout + r.stderr), r.stderr[-2000:]


def test_shipped_flow_world_is_small_safetensors_and_loads_as_a_flux_layout_model():
    from bierasing.world.models import SHIPPED, ShapesWorldBackbone

    folder = SHIPPED["shapesworld-flow"]
    weights = list(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} >= {"transformer", "vae", "text_encoder", "image_encoder"}
    assert sum(f.stat().st_size for f in weights) < 20 * 2**20
    assert not [f for f in folder.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    meta = json.loads((folder / "world.json").read_text())
    assert meta["arch"] == "flow" and meta["quality"]["samples_per_prompt"] >= 16
    bb = ShapesWorldBackbone.load("shapesworld-flow")
    assert type(bb.unet).__name__ == "FluxTransformer2DModel" and bb.prediction_type == "flow"
    prompts = [data.prompt(s, c) for s, c in zip(data.SHAPES, data.COLORS)]
    imgs = generate(bb, prompts, 4, seed=100)
    color = np.mean([[d.color == c for d in detect_batch(row)] for row, c in zip(imgs, data.COLORS)])
    assert color >= 0.8, color
