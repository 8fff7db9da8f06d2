"""The product's generic parts know no model family: the engine, job and CLI run with the toy
world's package blocked, and ``bierasing erase`` erases from an SD1.x diffusers folder (the
random-weight stand-in users can build) into a LoRA that diffusers and ComfyUI read."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_WORLD = textwrap.dedent("""
    import sys
    class _NoWorld:
        def find_spec(self, name, path=None, target=None):
            if name == "bierasing.world" or name.startswith("bierasing.world."):
                raise ImportError(f"{name} is blocked: generic code must not import the toy world")
    sys.meta_path.insert(0, _NoWorld())
""")


def _run(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", BLOCK_WORLD + code], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_engine_job_and_cli_import_without_the_world():
    r = _run("import bierasing.erase.engine, bierasing.erase.job, bierasing.erase.scoring, bierasing.cli, "
             "bierasing.loading, bierasing.sd15, bierasing.cond_attack, bierasing.methods, bierasing.erase")
    assert r.returncode == 0, r.stderr
    blocked = _run("import bierasing.world.models")  # the blocker itself works
    assert blocked.returncode != 0 and "bierasing.world is blocked" in blocked.stderr


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    from bierasing.standins import build_sd15_folder

    return build_sd15_folder(tmp_path_factory.mktemp("sd15"), "tiny")


def _erase(standin, out, *extra):
    args = ["erase", "--model", str(standin["model"]), "--concept", "a dog", "--safe", "a cat", "--steps", "2",
            "--out", str(out), "--exemplars", "2", "--eval-samples", "1", "--resolution", "64",
            "--cache-size", "2", "--batch-size", "2", "--xt-steps", "4", "--adversarial-steps", "1",
            "--threads", "2", "--json", "--device", "cpu", *extra]
    return _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")


def test_cli_erases_from_an_sd15_diffusers_folder_with_the_world_blocked(standin, tmp_path):
    out = tmp_path / "erase_dog"
    r = _erase(standin, out, "--ip-adapter", str(standin["ip_adapter"]), "--image-encoder", str(standin["image_encoder"]))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    lora = out / "erasure.safetensors"
    assert summary["output"] == str(lora) and lora.is_file()
    assert (out / "before_after.png").is_file() and (out / "report.md").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "bi-erasing" and report["config"]["steps"] == 2
    # SD1.x gets the same suggestions as every model: its own nearest phrases, and the concept in contexts
    held = report["config"]["preserve"].split(", ")
    assert len(held) >= 8 and not any("dog" in p or "cat" in p for p in held), held
    assert report["config"]["contexts"] == 4 and report["erased"][1]["target"] == "a photo of a dog"
    assert 0.5 <= report["erased"][0]["neg_anchor"] <= 1.0  # measured (neg_anchor auto)
    assert "a photo of a dog -> a photo of a cat" in (out / "report.md").read_text()

    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) and any("attn2_to_k" in k for k in keys)
    assert json.loads(meta["bierasing"])["method"] == "bi-erasing"


def test_cli_refuses_image_methods_without_an_image_branch_before_loading(standin, tmp_path):
    r = _erase(standin, tmp_path / "x")
    assert r.returncode == 2 and "--ip-adapter" in r.stderr and "esd-x" in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_esd_x_needs_no_image_branch(standin, tmp_path):
    r = _erase(standin, tmp_path / "esd", "--method", "esd-x")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "esd" / "erasure.safetensors").is_file()


@pytest.mark.parametrize("bad, msg", [("nowhere/at/all", "does not exist"), ("model.ckpt", "pickled")])
def test_cli_names_what_it_can_load(tmp_path, bad, msg):
    if bad.endswith(".ckpt"):
        (tmp_path / bad).write_bytes(b"\x80\x02")
    r = _run("from bierasing.cli import main\n"
             f"sys.exit(main(['erase', '--model', {str(tmp_path / bad)!r}, '--concept', 'a dog', '--safe', 'a cat']))")
    assert r.returncode == 2 and msg in r.stderr, r.stderr


@pytest.fixture(scope="module")
def cli_lora(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "erase"
    r = _erase(standin, out, "--method", "esd-x", "--rank", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "erasure.safetensors"


def test_cli_lora_loads_in_diffusers_with_no_missing_or_unexpected_keys(standin, cli_lora):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (pip install peft)")
    from test_diffusers_lora import NO_TEXT_ENCODER_KEYS, captured_warnings, fixed_input, load_pipeline, unet_out

    pipe = load_pipeline(standin["model"])
    before = unet_out(pipe.unet, fixed_input())
    with captured_warnings() as messages:
        pipe.load_lora_weights(str(cli_lora))
    assert [m for m in messages if NO_TEXT_ENCODER_KEYS not in m] == []
    assert not torch_equal(unet_out(pipe.unet, fixed_input()), before)  # the erasure took effect


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def _lora_modules(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}


def test_cli_lora_keys_are_all_in_comfyuis_key_map(standin, cli_lora):
    """ComfyUI's LoraLoader maps ``lora_unet_<diffusers name with _>`` through its LDM<->diffusers
    UNet map; the library's copy of that map (checked against ComfyUI's in test_unet_names) must
    name every module of the file, so no key is left "not loaded"."""
    from diffusers import UNet2DConditionModel

    from bierasing.unet_names import ldm_to_diffusers

    unet = UNet2DConditionModel.from_pretrained(standin["model"] / "unet")
    accepted = {"lora_unet_" + d.replace(".", "_") for d in ldm_to_diffusers(unet.config).values()}
    modules = _lora_modules(cli_lora)
    assert modules and modules <= accepted, sorted(modules - accepted)[:5]


def test_cli_lora_keys_in_real_comfyui_key_map(standin, cli_lora):
    from comfy_support import comfy_available

    why = comfy_available()
    if why:
        pytest.skip(why)
    import sys

    from comfy_support import COMFY

    sys.path.insert(0, COMFY)
    import comfy.model_detection
    import comfy.utils
    from safetensors.torch import load_file

    sd = load_file(str(standin["model"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert comfy.model_detection.unet_config_from_diffusers_unet(sd) is None  # ComfyUI knows real sizes only
    cfg = json.loads((standin["model"] / "unet" / "config.json").read_text())
    levels = len(cfg["block_out_channels"])
    depth = [1 if b.startswith("CrossAttn") else 0 for b in cfg["down_block_types"]]
    unet_config = {  # the stand-in in ComfyUI's terms (what its detection would give at this size)
        "model_channels": cfg["block_out_channels"][0], "num_res_blocks": [cfg["layers_per_block"]] * levels,
        "channel_mult": [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]],
        "transformer_depth": depth, "transformer_depth_middle": 1, "context_dim": cfg["cross_attention_dim"],
        "transformer_depth_output": [d for d in depth for _ in range(cfg["layers_per_block"] + 1)],
        "num_heads": cfg["attention_head_dim"], "use_linear_in_transformer": False}
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    accepted = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in mapping if k.endswith(".weight")}
    modules = _lora_modules(cli_lora)
    assert modules and modules <= accepted, sorted(modules - accepted)[:5]


def test_cli_eval_draws_before_and_after_on_an_sd15_folder(standin, cli_lora, tmp_path):
    args = ["eval", "--model", str(standin["model"]), "--erasure", str(cli_lora), "--concept", "a dog",
            "--samples", "1", "--resolution", "64", "--baseline", "--out", str(tmp_path), "--json",
            "--threads", "2", "--device", "cpu"]
    r = _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["concepts"]["a dog"]["grid"] == str(tmp_path / "before_after.png")
    assert (tmp_path / "before_after.png").is_file()
    r = _run("from bierasing.cli import main\n"
             f"sys.exit(main({args[:-5] + ['--attack', '--out', str(tmp_path)]!r}))")
    assert r.returncode == 2 and "detector" in r.stderr and "--attack" in r.stderr


def test_cli_erases_from_a_single_file_sd1_checkpoint(tmp_path):
    from bierasing.single_file import build_sd1_single_file

    sf = build_sd1_single_file(tmp_path / "tiny-sd1.safetensors")
    out = tmp_path / "erase"
    args = ["erase", "--model", str(sf["checkpoint"]), "--model-config", str(sf["config"]),
            "--ip-adapter", str(sf["ip_adapter"]), "--image-encoder", str(sf["image_encoder"]),
            "--concept", "a dog", "--safe", "a cat", "--steps", "2", "--out", str(out), "--exemplars", "2",
            "--eval-samples", "1", "--resolution", "64", "--cache-size", "2", "--batch-size", "2",
            "--xt-steps", "4", "--adversarial-steps", "1", "--json", "--device", "cpu"]
    r = _run(f"from bierasing.cli import main\nsys.exit(main({args!r}))")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "erasure.safetensors").is_file() and (out / "before_after.png").is_file()
    # the shipped SD1.5 config does not fit the tiny file: a clear error, not a crash
    r = _run("from bierasing.cli import main\n"
             f"sys.exit(main({args[:4] + args[6:]!r}))")
    assert r.returncode == 2 and "bierasing: error:" in r.stderr, r.stderr[-2000:]
