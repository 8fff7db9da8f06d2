"""bierasing standins: which files it would write, how it recognises its own, and that --remove deletes
only those (writing them needs ComfyUI: bench/templates_fresh_install.py and the 0.3.0 notes)."""

import pytest
import torch

from bierasing import comfy_standins as st
from bierasing.cli import main
from bierasing.io import save_safetensors


def test_planned_files_are_the_names_the_templates_use(tmp_path):
    files = {p.relative_to(tmp_path).as_posix() for p in st.planned_files(tmp_path)}
    assert {"models/checkpoints/v1-5-pruned-emaonly.safetensors", "models/checkpoints/tiny_sd15.safetensors",
            "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
            "models/ipadapter/ip-adapter_sd15.safetensors", "models/checkpoints/sd_xl_base_1.0.safetensors",
            "models/ipadapter/ip-adapter_sdxl_vit-h.safetensors"} <= files
    assert sum(f.startswith("input/exemplars/dog/") for f in files) == 8  # 4 images + 4 masks


def test_remove_deletes_only_stand_ins(tmp_path, capsys):
    ckpt, users = tmp_path / "models/checkpoints/tiny_sd15.safetensors", \
        tmp_path / "models/checkpoints/v1-5-pruned-emaonly.safetensors"
    save_safetensors(ckpt, {"w": torch.zeros(2)}, st.STANDIN_TAG)
    save_safetensors(users, {"w": torch.ones(2)}, {"format": "pt"})  # the user's own file, same name
    pic = tmp_path / "input/exemplars/dog/dog_00.png"
    pic.parent.mkdir(parents=True)
    pic.write_bytes(b"png")
    (tmp_path / "input/exemplars/dog/dog_01.png").write_bytes(b"the user's picture")  # no marker
    pic.with_name(pic.name + ".standin").write_text("written by bierasing standins\n")
    assert st.is_standin(ckpt) and not st.is_standin(users) and st.is_standin(pic)
    assert main(["standins", "--comfyui", str(tmp_path), "--remove"]) == 0
    assert not ckpt.exists() and not pic.exists() and not pic.with_name(pic.name + ".standin").exists()
    assert users.exists() and (tmp_path / "input/exemplars/dog/dog_01.png").exists()
    assert "removed 2 stand-in files" in capsys.readouterr().out


def test_writing_needs_a_comfyui_folder(tmp_path, capsys):
    assert main(["standins", "--comfyui", str(tmp_path)]) == 2
    assert "is not a ComfyUI folder (no comfy/model_patcher.py)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give the folder that holds ComfyUI's main.py"):
        st.import_comfyui(tmp_path)
