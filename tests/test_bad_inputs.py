"""Bad-input matrix: every case feeds one bad (or bad-looking) input to the CLI, the library or a
node body and checks

  (a) the exception type (library, nodes) or the exit code (CLI),
  (b) a message that says what is wrong and what to change (a specific substring),
  (c) that nothing was left behind: the whole test folder has the same files with the same
      contents before and after (no temp file, no half-written or replaced target).

Cases whose input is bad-looking but valid (grayscale, 16-bit, RGBA images) must load correctly.
Node cases call the node bodies in nodes/impl.py with a stand-in for nodes/comfy_glue.py (the only
module that needs ComfyUI); the node that surfaces each case is named in its ``surface``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import logging
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch

from bierasing import io
from bierasing.erase import Concept, EraseConfig
from bierasing.erase.adapters import AdaptedLayer
from bierasing.erase.engine import MAX_CONCEPT_CHARS, Eraser
from bierasing.erase.exemplars import load_folder
from bierasing.erase.export import kohya_name, load_erasure, read_erasure, save_erasure_tensors
from bierasing.erase.masks import apply_masks

REPO = Path(__file__).resolve().parents[1]
NODE_PKG = "_bierasing_nodes_under_test"


# ---- helpers ------------------------------------------------------------------------------------
def _unpickled(path: str) -> str:
    """Runs only if someone unpickles a sentinel: leaves a marker file."""
    Path(path).write_text("a pickle was loaded")
    return "pwned"


class _Sentinel:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_unpickled, (self.marker,))


def _pickle(path: Path, marker: Path) -> Path:
    """A torch.save pickle that looks like LoRA weights and leaves ``marker`` if unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "payload": _Sentinel(marker)}, path)
    with open(path, "rb") as f:  # control: unpickling it does trip the sentinel ...
        torch.load(f, weights_only=False)
    assert marker.is_file()
    marker.unlink()  # ... so a missing marker after the case proves nothing was unpickled
    return path


def _png(path: Path, arr: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rgb(h=32, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _images(n=2, seed=1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "-> " + os.readlink(p) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _no_adapters(unet) -> bool:
    return not any(isinstance(m, AdaptedLayer) for m in unet.modules())


@dataclass
class Ctx:
    tmp: Path
    out: Path  # the output folder (exists, empty)
    mp: pytest.MonkeyPatch
    request: Any
    capsys: Any

    @property
    def world(self):
        return self.request.getfixturevalue("tiny_world")

    @property
    def nodes(self):
        impl, glue = self.request.getfixturevalue("node_impl")
        glue.dirs.update(output=self.out / "loras", input=self.tmp / "in", models=self.tmp / "models")
        return impl

    def cli(self, *argv: str, world: bool = True) -> tuple[int, str]:
        """Run ``bierasing ARGV`` in-process; returns (exit code, stderr)."""
        from bierasing import cli

        root = logging.getLogger()  # main() calls logging.basicConfig: keep its handler out of later tests
        self.mp.setattr(root, "handlers", list(root.handlers))
        if world:  # the tiny random model instead of loading the shipped one
            self.mp.setattr(cli, "_load_backbone", lambda *a, **k: self.world)
        self.capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
        return code, self.capsys.readouterr().err


@dataclass
class Case:
    id: str
    surface: str  # "library", "cli", or "node:<NodeId>"
    act: Callable[[Ctx, Any], Any]
    error: type[BaseException] | int | None  # exception type, CLI exit code, or None: must load
    match: str = ""  # regex searched in the message
    setup: Callable[[Ctx], Any] | None = None  # makes the inputs (not part of the snapshot check)
    after: Callable[[Ctx, Any, Any], None] | None = None  # (ctx, setup value, result or exc info)
    marks: tuple = field(default_factory=tuple)


# ---- setups -------------------------------------------------------------------------------------
def _folder_with(name: str, make: Callable[[Path], Any]):
    def setup(c: Ctx):
        folder = c.tmp / "in" / name
        folder.mkdir(parents=True)
        make(folder)
        return folder
    return setup


def _pickles(suffix: str):
    def setup(c: Ctx):
        marker = c.tmp / "UNPICKLED"
        return SimpleNamespace(path=_pickle(c.tmp / "models" / f"evil{suffix}", marker), marker=marker)
    return setup


def _not_unpickled(c, s, _):
    assert not s.marker.exists(), "the pickle was unpickled"


def _erasure_file(tensors_of: Callable[[Ctx], dict]):
    def setup(c: Ctx):
        path = c.tmp / "models" / "other.safetensors"
        io.save_safetensors(path, tensors_of(c), {"bierasing": "{}"})
        return path
    return setup


def _attn2_key(c: Ctx) -> tuple[str, torch.Size]:
    name, m = next((n, m) for n, m in c.world.unet.named_modules() if n.endswith("attn2.to_k"))
    return kohya_name(name), m.weight.shape


def _wrong_shape_erasure(c: Ctx) -> dict:
    key, (out_f, in_f) = _attn2_key(c)
    return {f"{key}.lora_down.weight": torch.zeros(4, in_f + 3), f"{key}.lora_up.weight": torch.zeros(out_f, 4),
            f"{key}.alpha": torch.tensor(4.0)}


def _unet_untouched(c, s, _):
    assert _no_adapters(c.world.unet), "a failed load left adapters attached to the UNet"


def _target(c: Ctx, content: bytes | None = None):
    """An output target inside the output folder, optionally already holding an older version."""
    path = c.out / "erasure.safetensors"
    if content is not None:
        path.write_bytes(content)
    return path


def _lora():
    return {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
            "lora_unet_a.alpha": torch.tensor(2.0)}


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_with_failing(attr: str):
    """save_erasure_tensors while os.<attr> fails with ENOSPC (a full disk mid-write)."""
    def act(c: Ctx, target: Path):
        with c.mp.context() as m:
            m.setattr(os, attr, _enospc)
            save_erasure_tensors(target, _lora(), {"method": "bi-erasing"})
    return act


def _old_target_kept(c, target, _):
    assert target.read_bytes() == b"previous erasure", "the old file was replaced by a partial one"


def _loads(channels_check: Callable[[torch.Tensor], None]):
    def after(c, folder, result):
        images, masks, names = result
        assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        assert masks is None and names == ["img.png"]
        channels_check(images[0])
    return after


def _gray_ok(img):
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.allclose(img[:, 0, 0], torch.full((3,), 128 / 255))


def _u16_ok(img):  # written BGR = (0, 32768, 65535): RGB = (1, 0.5, 0)
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, 32768 / 65535, 0.0]), atol=1e-6)


def _rgba_ok(img):  # opaque red left half, transparent right half -> the mean colour (red) everywhere
    assert torch.allclose(img, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand_as(img), atol=1e-6)


def _rgba(folder: Path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (0, 0, 255, 255)  # BGRA: opaque red
    a[:, 16:] = (255, 0, 0, 0)  # transparent blue
    _png(folder / "img.png", a)


def _float_tiff_as_png(folder: Path):
    import cv2

    tiff = folder / "img.tiff"
    assert cv2.imwrite(str(tiff), np.random.rand(32, 32, 3).astype(np.float32))
    tiff.rename(folder / "img.png")  # OpenCV reads by content, not by suffix


def _nan_backbone(c: Ctx):
    """The backbone's noise prediction turns NaN (as a diverging run would)."""
    cls = type(c.world)
    real = cls.predict_noise
    c.mp.setattr(cls, "predict_noise", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    return c.out / "checkpoint.safetensors"


def _nan_run(c: Ctx, ckpt: Path):
    cfg = EraseConfig(steps=3, batch_size=2, xt_source="noised", checkpoint_every=1)
    Eraser(c.world, [Concept("a circle", "a square", _images(2, 1), _images(2, 2))], cfg,
           checkpoint_path=ckpt).run()


def _unwritable_dir(c: Ctx):
    d = c.tmp / "locked"
    d.mkdir()
    d.chmod(0o500)
    c.request.addfinalizer(lambda: d.chmod(0o700))
    return d


def _zero_mask_folder(folder: Path):
    _png(folder / "img.png", _rgb())
    _png(folder / "img_mask.png", np.zeros((32, 32), np.uint8))


def _animated_gif(folder: Path):
    from PIL import Image

    frames = [Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)) for rgb in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "img.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _first_frame_ok(c, folder, result):
    images, _, names = result
    assert names == ["img.gif"] and images.shape == (1, 3, 32, 32)
    assert torch.allclose(images[0], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), atol=1e-6)


def _wide_bands(folder: Path):  # 48 wide: blue | green (the centre 32 columns) | red, in BGR
    a = np.zeros((32, 48, 3), np.uint8)
    a[:, :8], a[:, 8:40], a[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    _png(folder / "img.png", a)


def _centre_crop_ok(c, folder, result):
    images, _, _ = result
    assert images.shape == (1, 3, 32, 32)  # squashing would have mixed blue and red into the edges
    assert torch.allclose(images[0], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), atol=1e-6)


def _transparent(folder: Path):
    _png(folder / "img.png", np.zeros((32, 32, 4), np.uint8))


def _one_exemplar_loaded(c, folder, result):
    images, masks, count = result
    assert images.shape == (1, 32, 32, 3) and masks.shape == (1, 32, 32) and count == 1


def _problem(problem):
    if problem:
        raise ValueError(problem)
    return problem


def _nan_masks():
    m = torch.ones(1, 32, 32)
    m[0, 3, 4], m[0, 5, 6] = float("nan"), float("inf")
    return m


LONG_PROMPT = "a big red circle on a black background " * 3  # 24 words: over ShapesWorld's 16 tokens
TOO_MANY_CHARS = "nudity " * 50  # 350 characters


# ---- the matrix ---------------------------------------------------------------------------------
CASES = [
    # images and masks
    Case("corrupt-png", "library load_folder (node:BiErasingLoadExemplars)",
         lambda c, d: load_folder(d), ValueError, r"img\.png is not a readable image.*re-save it as PNG or JPEG",
         setup=_folder_with("corrupt", lambda f: _bytes(f / "img.png", np.random.default_rng(0).bytes(500)))),
    Case("empty-image-file", "library load_folder",
         lambda c, d: load_folder(d), ValueError, r"img\.png is not a readable image \(empty",
         setup=_folder_with("empty_file", lambda f: _bytes(f / "img.png", b""))),
    Case("empty-folder", "library load_folder",
         lambda c, d: load_folder(d), ValueError, r"has no images \(\.png",
         setup=_folder_with("nothing", lambda f: _bytes(f / "notes.txt", b"no images here"))),
    Case("missing-folder", "library load_folder",
         lambda c, d: load_folder(c.tmp / "does_not_exist"), FileNotFoundError, r"exemplar folder .* does not exist"),
    Case("grayscale-8bit-loads", "library load_folder",
         lambda c, d: load_folder(d), None,
         setup=_folder_with("gray", lambda f: _png(f / "img.png", np.full((32, 32), 128, np.uint8))),
         after=_loads(_gray_ok)),
    Case("rgb-16bit-loads", "library load_folder",
         lambda c, d: load_folder(d), None,
         setup=_folder_with("u16", lambda f: _png(
             f / "img.png", np.broadcast_to(np.array([0, 32768, 65535], np.uint16), (32, 32, 3)).copy())),
         after=_loads(_u16_ok)),
    Case("rgba-loads", "library load_folder", lambda c, d: load_folder(d), None,
         setup=_folder_with("rgba", _rgba), after=_loads(_rgba_ok)),
    Case("float32-pixels", "library load_folder",
         lambda c, d: load_folder(d), ValueError, r"unsupported pixel type float32; save it as 8- or 16-bit",
         setup=_folder_with("float", _float_tiff_as_png)),
    Case("two-channel-image-batch", "node:BiErasingMaskFilter",
         lambda c, d: c.nodes.mask_filter(torch.rand(1, 32, 32, 2), torch.ones(1, 32, 32)), ValueError,
         r"expected an IMAGE batch \[B, H, W, 3\]"),
    Case("two-channel-exemplars", "library Concept",
         lambda c, d: Concept("a circle", "a square", torch.rand(2, 2, 32, 32)), ValueError,
         r"must be a non-empty \[N, 3, H, W\] batch, got shape \(2, 2, 32, 32\)"),
    Case("mixed-image-sizes", "library load_folder",
         lambda c, d: load_folder(d), ValueError, r"different sizes .*pass a size to resize them",
         setup=_folder_with("sizes", lambda f: (_png(f / "a.png", _rgb(32, 32)), _png(f / "b.png", _rgb(16, 16))))),
    Case("mask-wrong-size-file", "library load_folder",
         lambda c, d: load_folder(d), ValueError, r"img_mask\.png is 16x16 but img\.png is 32x32; masks must match",
         setup=_folder_with("mask_size", lambda f: (_png(f / "img.png", _rgb()),
                                                    _png(f / "img_mask.png", np.full((16, 16), 255, np.uint8))))),
    Case("mask-wrong-size-tensor", "library apply_masks",
         lambda c, d: apply_masks(_images(1), torch.ones(1, 16, 16)), ValueError,
         r"mask is 16x16 but its image is 32x32; give masks of the same size"),
    Case("mask-wrong-size-node", "node:BiErasingMaskFilter",
         lambda c, d: c.nodes.mask_filter(torch.rand(2, 32, 32, 3), torch.ones(2, 24, 24)), ValueError,
         r"masks are 24x24 but the images are 32x32; resize the masks"),
    Case("mask-all-zero", "library apply_masks",
         lambda c, d: apply_masks(_images(1), torch.zeros(1, 32, 32)), ValueError,
         r"mask is empty after filtering.*lower the threshold or check the mask"),
    Case("mask-all-zero-node", "node:BiErasingMaskFilter",
         lambda c, d: c.nodes.mask_filter(torch.rand(1, 32, 32, 3), torch.zeros(1, 32, 32)), ValueError,
         r"every mask is empty \(all zero\); paint or segment the concept"),
    Case("mask-all-zero-cli", "cli erase --neg-exemplars",
         lambda c, d: c.cli("erase", "--concept", "circle", "--neg-exemplars", str(d), "--out", str(c.out),
                            "--threads", "1", "--json"), 2,
         r"bierasing: error: a mask is empty after filtering.*lower the threshold",
         setup=_folder_with("zero_mask", _zero_mask_folder)),
    Case("corrupt-png-cli", "cli erase --neg-exemplars",
         lambda c, d: c.cli("erase", "--concept", "circle", "--neg-exemplars", str(d), "--out", str(c.out),
                            "--threads", "1"), 2, r"bierasing: error: img\.png is not a readable image",
         setup=_folder_with("corrupt_cli", lambda f: _bytes(f / "img.png", b"\x89PNG\r\n\x1a\nnot really"))),
    Case("exemplar-folder-empty-name-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars("   ", 32, 0), ValueError, r"give the exemplar folder"),
    Case("exemplar-animated-first-frame", "library load_folder", lambda c, d: load_folder(d, size=32), None,
         setup=_folder_with("animated", _animated_gif), after=_first_frame_ok),
    Case("exemplar-wide-centre-crop", "library load_folder", lambda c, d: load_folder(d, size=32), None,
         setup=_folder_with("wide", _wide_bands), after=_centre_crop_ok),
    Case("exemplar-fully-transparent", "library load_folder (node:BiErasingLoadExemplars)",
         lambda c, d: load_folder(d, size=32), ValueError, r"img\.png is fully transparent.*save it without",
         setup=_folder_with("clear", _transparent)),
    Case("exemplar-extreme-aspect", "library load_folder", lambda c, d: load_folder(d, size=32), ValueError,
         r"img\.png is 200x40, more than 4:1; its centre square would keep only 20% of it",
         setup=_folder_with("panorama", lambda f: _png(f / "img.png", _rgb(40, 200)))),
    Case("exemplar-too-small", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars("tiny", 512, 0), ValueError,
         r"img\.png is 64x64: too small for 512 px exemplars .*at least 128 px on the short side",
         setup=_folder_with("tiny", lambda f: _png(f / "img.png", _rgb(64, 64)))),
    Case("exemplar-folder-absolute-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars(str(d), 32, 0), ValueError,
         r"is outside ComfyUI's input folder; put the exemplars in a subfolder .*BIERASING_EXEMPLAR_ROOTS",
         setup=_folder_with("../elsewhere", lambda f: _png(f / "img.png", _rgb()))),
    Case("exemplar-folder-home-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars("~/Pictures", 32, 0), ValueError, r"is outside ComfyUI's input folder"),
    Case("exemplar-folder-dotdot-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars("../elsewhere", 32, 0), ValueError,
         r"leaves ComfyUI's input folder \('\.\.'\); pick one of its subfolders",
         setup=_folder_with("../elsewhere", lambda f: _png(f / "img.png", _rgb()))),
    Case("exemplar-folder-symlink-out-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars("link", 32, 0), ValueError, r"'link' leads outside ComfyUI's input folder",
         setup=lambda c: (_folder_with("../elsewhere", lambda f: _png(f / "img.png", _rgb()))(c),
                          (c.tmp / "in" / "link").symlink_to(c.tmp / "elsewhere"))),
    Case("exemplar-folder-opened-root-node", "node:BiErasingLoadExemplars",
         lambda c, d: c.nodes.load_exemplars(str(d), 32, 0), None,
         setup=lambda c: (c.mp.setenv("BIERASING_EXEMPLAR_ROOTS", str(c.tmp / "elsewhere")),
                          _folder_with("../elsewhere/dog", lambda f: _png(f / "img.png", _rgb()))(c))[1],
         after=_one_exemplar_loaded),
    Case("mask-nan-inf", "library apply_masks",
         lambda c, d: apply_masks(_images(1), _nan_masks()), ValueError,
         r"the masks hold 2 NaN or infinite values \(of 1024\); the node that made them is broken"),
    Case("mask-nan-inf-node", "node:BiErasingMaskFilter",
         lambda c, d: c.nodes.mask_filter(torch.rand(1, 32, 32, 3), _nan_masks()), ValueError,
         r"the masks hold 2 NaN or infinite values"),

    # concept text
    Case("concept-empty", "library Concept", lambda c, d: Concept(""), ValueError,
         r"concept to erase is empty; give a word or phrase"),
    Case("concept-whitespace", "library Concept", lambda c, d: Concept(" \t\n "), ValueError,
         r"concept to erase is empty; give a word or phrase"),
    Case("concept-too-many-characters", "library Concept", lambda c, d: Concept(TOO_MANY_CHARS), ValueError,
         rf"concept to erase is 350 characters long \(limit {MAX_CONCEPT_CHARS}\); give a short"),
    Case("safe-too-many-characters", "library Concept", lambda c, d: Concept("nudity", TOO_MANY_CHARS), ValueError,
         r"safe alternative is 350 characters long"),
    Case("concept-over-token-limit", "library Eraser",
         lambda c, d: Eraser(c.world, [Concept(LONG_PROMPT, "a square", _images(), _images())],
                             EraseConfig(steps=1)), ValueError,
         r"is 26 tokens but this model reads at most 16 .*silently cut off; shorten it"),
    Case("safe-over-token-limit", "library Eraser",
         lambda c, d: Eraser(c.world, [Concept("a circle", LONG_PROMPT, _images(), _images())],
                             EraseConfig(steps=1)), ValueError, r"safe alternative .* reads at most 16"),
    Case("concept-over-token-limit-cli", "cli erase --concept",
         lambda c, d: c.cli("erase", "--concept", LONG_PROMPT, "--out", str(c.out), "--threads", "1"), 2,
         r"bierasing: error: the concept to erase .* reads at most 16"),
    Case("concept-blank-list-cli", "cli erase --concept",
         lambda c, d: c.cli("erase", "--concept", " , ", "--out", str(c.out), "--threads", "1"), 2,
         r"bierasing: error: the concept to erase is empty"),
    Case("safe-missing-when-queued", "node:BiErasingErase (validate_inputs)",
         lambda c, d: _problem(c.nodes.erase_input_problem("nudity", "  ", method="bi-erasing")), ValueError,
         r"bi-erasing pulls 'nudity' toward a safe alternative: fill safe_concept"),
    Case("safe-count-when-queued", "node:BiErasingErase (validate_inputs)",
         lambda c, d: _problem(c.nodes.erase_input_problem("a, b, c", "x, y", method="esd-x")), ValueError,
         r"3 concepts but 2 safe alternatives"),
    Case("concept-empty-node", "node:BiErasingErase",
         lambda c, d: c.nodes.erase(None, None, " , ", "clothed"), ValueError,
         r"concept to erase is empty; type a word or phrase"),

    # model
    Case("unsupported-model-folder-cli", "cli erase --model",
         lambda c, d: c.cli("erase", "--model", str(d), "--concept", "circle", "--out", str(c.out),
                            "--threads", "1", world=False), 2,
         r"bierasing: error: .*not_a_model' is not a model this command can load; give one of: 'shapesworld'",
         setup=lambda c: _bytes(c.tmp / "not_a_model" / "model_index.json", b"{}").parent),
    Case("unsupported-model-id-cli", "cli eval --model",
         lambda c, d: c.cli("eval", "--model", "runwayml/stable-diffusion-v1-5", "--concept", "circle",
                            "--threads", "1", world=False), 2,
         r"'runwayml/stable-diffusion-v1-5' does not exist; give 'shapesworld' or a path to a ShapesWorld "
         r"model folder, a diffusers SD1.x, SDXL or FLUX.1 pipeline folder"),

    # training
    Case("loss-turns-nan", "library Eraser.run (node:BiErasingErase)",
         _nan_run, FloatingPointError, r"loss became nan at step 0; lower the learning rate",
         setup=_nan_backbone, after=_unet_untouched),
    Case("steps-out-of-range", "library EraseConfig", lambda c, d: EraseConfig(steps=0), ValueError,
         r"steps must be in \[1, 100000\]; got 0"),
    Case("lr-out-of-range", "library EraseConfig", lambda c, d: EraseConfig(lr=5.0), ValueError,
         r"lr must be in \[1e-07, 1.0\]; got 5.0"),
    Case("unknown-method", "library EraseConfig", lambda c, d: EraseConfig(method="fmn"), ValueError,
         r"method must be one of bi-erasing, esd-x"),
    Case("unknown-method-cli", "cli erase --method",
         lambda c, d: c.cli("erase", "--concept", "circle", "--method", "fmn", "--out", str(c.out)), 2,
         r"--method: invalid choice: 'fmn' \(choose from"),
    Case("steps-zero-cli", "cli erase --steps",
         lambda c, d: c.cli("erase", "--concept", "circle", "--steps", "0", "--out", str(c.out),
                            "--threads", "1"), 2, r"bierasing: error: steps must be in \[1, 100000\]"),
    Case("guide-then-erase-single-branch", "library EraseConfig",
         lambda c, d: EraseConfig(method="esd-x", schedule="guide-then-erase"), ValueError,
         r"needs both neg_weight and pos_weight > 0 \(method 'esd-x' has only one branch\)"),
    Case("bi-erasing-without-negatives", "library Eraser",
         lambda c, d: Eraser(c.world, [Concept("a circle", "a square", None, _images())], EraseConfig(steps=1)),
         ValueError, r"needs negative exemplar images of 'a circle': give an exemplar folder or let the model"),

    # output folder and names
    Case("disk-full-on-write", "library save_erasure_tensors (node:BiErasingSaveErasure)",
         _save_with_failing("fsync"), OSError, r"No space left on device.*free some space",
         setup=lambda c: _target(c, b"previous erasure"), after=_old_target_kept),
    Case("disk-full-on-rename", "library save_erasure_tensors",
         _save_with_failing("replace"), OSError, r"could not write .*erasure\.safetensors.*the disk is full",
         setup=lambda c: _target(c)),
    Case("output-parent-is-a-file", "library save_erasure_tensors",
         lambda c, p: save_erasure_tensors(p / "sub" / "e.safetensors", _lora(), {}), OSError,
         r"could not write .*part of that path is a file, not a folder; choose another output folder",
         setup=lambda c: _bytes(c.tmp / "a_file", b"i am a file")),
    Case("output-parent-is-a-file-cli", "cli erase --out",
         lambda c, p: c.cli("erase", "--concept", "circle", "--out", str(p / "out"), "--threads", "1"), 2,
         r"bierasing: error: cannot use .*a_file/out as the output folder .*choose a folder",
         setup=lambda c: _bytes(c.tmp / "a_file", b"i am a file")),
    Case("output-folder-read-only", "library save_erasure_tensors",
         lambda c, d: save_erasure_tensors(d / "e.safetensors", _lora(), {}), PermissionError,
         r"could not write .*choose an output folder you can write to", setup=_unwritable_dir,
         marks=(pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions"),)),
    Case("output-folder-read-only-cli", "cli erase --out",
         lambda c, d: c.cli("erase", "--concept", "circle", "--out", str(d), "--threads", "1"), 2,
         r"output folder .*locked is not writable", setup=_unwritable_dir,
         marks=(pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions"),)),
    Case("name-escapes-dotdot", "library io.safe_child", lambda c, d: io.safe_child(c.out, "../x"), ValueError,
         r"'\.\./x' would leave the output folder .*remove the '\.\.' parts"),
    Case("name-absolute", "library io.safe_child", lambda c, d: io.safe_child(c.out, "/etc/x"), ValueError,
         r"'/etc/x' is an absolute path; give a name inside the output folder"),
    Case("name-escapes-node", "node:BiErasingSaveErasure",
         lambda c, d: c.nodes.save_erasure(_lora(), "../../escaped"), ValueError,
         r"would leave the output folder"),
    Case("name-backslash-node", "node:BiErasingSaveErasure",
         lambda c, d: c.nodes.save_erasure(_lora(), "erasures\\dog"), ValueError,
         r"'erasures\\\\dog\.safetensors' contains a backslash; use / to put the file in a subfolder"),
    Case("name-bad-character-node", "node:BiErasingSaveErasure",
         lambda c, d: c.nodes.save_erasure(_lora(), "dog?v2"), ValueError,
         r"contains a character file names cannot hold"),
    Case("name-absolute-node", "node:BiErasingSaveErasure",
         lambda c, d: c.nodes.save_erasure(_lora(), str(c.tmp / "abs")), ValueError, r"is an absolute path"),
    Case("name-escapes-cli", "cli erase --name",
         lambda c, d: c.cli("erase", "--concept", "circle", "--name", "../escaped", "--out", str(c.out),
                            "--threads", "1"), 2,
         r"output name '\.\./escaped' must be a plain file name \(no folders"),
    Case("not-safetensors-name", "library save_erasure_tensors",
         lambda c, d: save_erasure_tensors(c.out / "e.pt", _lora(), {}), ValueError,
         r"erasures are saved as \.safetensors, got 'e\.pt'"),

    # pickles offered as weights
    Case("pickle-pt-load-safetensors", "library io.load_safetensors",
         lambda c, s: io.load_safetensors(s.path), ValueError,
         r"evil\.pt is a pickle-format file.*Convert it to \.safetensors", setup=_pickles(".pt"),
         after=_not_unpickled),
    Case("pickle-ckpt-read-erasure", "library read_erasure (node:BiErasingLoadErasure)",
         lambda c, s: read_erasure(s.path), ValueError, r"evil\.ckpt is a pickle-format file",
         setup=_pickles(".ckpt"), after=_not_unpickled),
    Case("pickle-bin-load-erasure", "library load_erasure",
         lambda c, s: load_erasure(c.world.unet, s.path), ValueError, r"evil\.bin is a pickle-format file",
         setup=_pickles(".bin"), after=lambda c, s, r: (_not_unpickled(c, s, r), _unet_untouched(c, s, r))),
    Case("pickle-renamed-safetensors", "library read_erasure",
         lambda c, s: read_erasure(s.path), ValueError,
         r"evil\.safetensors is not a readable safetensors file.*re-export it as \.safetensors",
         setup=_pickles(".safetensors"), after=_not_unpickled),
    Case("pickle-checkpoint", "library io.load_checkpoint", lambda c, s: io.load_checkpoint(s.path), ValueError,
         r"evil\.pth is a pickle-format file", setup=_pickles(".pth"), after=_not_unpickled),
    Case("pickle-erasure-cli", "cli eval --erasure",
         lambda c, s: c.cli("eval", "--erasure", str(s.path), "--concept", "circle", "--threads", "1"), 2,
         r"bierasing: error: evil\.pt is a pickle-format file", setup=_pickles(".pt"), after=_not_unpickled),
    Case("pickle-erasure-node", "node:BiErasingLoadErasure",
         lambda c, s: c.nodes.load_erasure(None, s.path.name, 1.0), ValueError,
         r"evil\.ckpt is a pickle-format file", setup=_pickles(".ckpt"), after=_not_unpickled),
    Case("pickle-image-adapter-node", "node:BiErasingImageAdapterLoader",
         lambda c, s: c.nodes.load_image_adapter(s.path.name, 1.0), ValueError,
         r"only \.safetensors adapters are read.*download the safetensors version", setup=_pickles(".bin"),
         after=_not_unpickled),

    # safetensors that are not (this model's) erasures
    Case("safetensors-not-an-erasure", "library read_erasure",
         lambda c, p: read_erasure(p), ValueError,
         r"other\.safetensors is not a LoRA this loader reads.*give an erasure file",
         setup=_erasure_file(lambda c: {"model.weight": torch.zeros(2, 2)})),
    Case("erasure-for-other-architecture-keys", "library load_erasure (cli eval --erasure)",
         lambda c, p: load_erasure(c.world.unet, p), ValueError,
         r"matches no layer of this UNet.*load it with the model it was made for",
         setup=_erasure_file(lambda c: {
             "lora_unet_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
             "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768)}),
         after=_unet_untouched),
    Case("erasure-for-other-architecture-shapes", "library load_erasure",
         lambda c, p: load_erasure(c.world.unet, p), ValueError,
         r"has shape \(4, \d+\), which does not fit this UNet's layer.*made for another architecture",
         setup=_erasure_file(_wrong_shape_erasure), after=_unet_untouched),
]


# ---- the test -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_impl():
    """nodes/impl.py with a stand-in for nodes/comfy_glue.py (file locations only)."""
    glue = types.ModuleType(f"{NODE_PKG}.comfy_glue")
    glue.dirs = {}
    glue.output_folder = lambda kind: str(glue.dirs["output"])
    glue.input_folder = lambda: str(glue.dirs["input"])
    glue.file_path = lambda kind, name: str(Path(glue.dirs["models"]) / name)
    glue.exemplar_roots = lambda: [r for r in os.environ.get("BIERASING_EXEMPLAR_ROOTS", "").split(os.pathsep) if r]
    pkg = types.ModuleType(NODE_PKG)
    pkg.__path__ = []  # nothing else of the pack is imported
    pkg.comfy_glue = glue
    spec = importlib.util.spec_from_file_location(f"{NODE_PKG}.impl", REPO / "nodes" / "impl.py")
    impl = importlib.util.module_from_spec(spec)
    saved = {k: sys.modules.get(k) for k in (NODE_PKG, glue.__name__, spec.name)}
    sys.modules.update({NODE_PKG: pkg, glue.__name__: glue, spec.name: impl})
    try:
        spec.loader.exec_module(impl)
        yield impl, glue
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_matrix_is_big_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 22
    assert {c.surface.split()[0].split(":")[0] for c in CASES} == {"library", "cli", "node"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, request, capsys):
    out = tmp_path / "out"
    out.mkdir()
    c = Ctx(tmp_path, out, monkeypatch, request, capsys)
    given = case.setup(c) if case.setup else None
    before = _snapshot(tmp_path)

    if isinstance(case.error, int):  # CLI: exit code + message on stderr
        code, err = case.act(c, given)
        assert code == case.error, err
        assert re.search(case.match, err, re.S), err
        result = (code, err)
    elif case.error is not None:
        with pytest.raises(case.error) as info:
            case.act(c, given)
        assert re.search(case.match, str(info.value), re.S), str(info.value)
        result = info
    else:  # bad-looking but valid
        result = case.act(c, given)

    after = _snapshot(tmp_path)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))}"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not leftovers, leftovers
    if case.after:
        case.after(c, given, result)
