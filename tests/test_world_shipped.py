"""The ShapesWorld weights shipped in the package: loading, determinism, quality."""

import json
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


def test_an_exemplar_image_alone_steers_the_shape(world):
    rng = np.random.default_rng(3)
    ex = np.stack([data.render(s, "green", "gray", rng) for s in data.SHAPES])
    tokens = world.encode_images(torch.from_numpy(ex).permute(0, 3, 1, 2).float() / 255)
    imgs = generate(world, [""] * len(data.SHAPES), 4, seed=200, image_tokens=tokens)
    hit = np.mean([[d.shape == s for d in detect_batch(row)] for row, s in zip(imgs, data.SHAPES)])
    assert hit >= 0.6, hit


@pytest.mark.slow
def test_world_meets_the_quality_bar():
    summary = evaluate_world(None, samples_per_prompt=16, progress=False)["summary"]
    assert summary["shape_acc"] >= 0.90 and summary["color_acc"] >= 0.90, summary
    assert summary["axis3_acc"] >= 0.85 and summary["image_steer_acc"] >= 0.80, summary


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
