"""Stable Diffusion 1.x from one ``.safetensors`` file in the original LDM/CompVis layout.

The checkpoints ComfyUI and A1111 users have (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``) are converted here, offline, into diffusers
components with diffusers' own single-file converters, using configs the package ships
(``bierasing/configs/sd15``) instead of fetching them from a hub::

    bb = load_sd1_single_file("v1-5-pruned-emaonly.safetensors")

* :func:`check_sd1_single_file` reads only the safetensors header and says whether a file is an
  SD1.x checkpoint (a ``ValueError`` that names what it is otherwise: SDXL, SD2.x, inpainting...).
* :func:`load_sd1_single_file` builds a :class:`bierasing.sd15.SD15Backbone` from it.
* :func:`clip_tokenizer` is CLIP's tokenizer, derived from the BPE merge list the package ships
  (a single file carries no vocabulary).
* :func:`build_sd1_single_file` writes a tiny random SD1-architecture single file (and its
  diffusers original and config folder) for tests.

Only safetensors are read (pickled ``.ckpt``/``.pt``/... files are refused); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
SD15_CONFIG = CONFIGS / "sd15"
CLIP_BPE = CONFIGS / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
_COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


# ---- detection ------------------------------------------------------------------------------------
def _header(path: Path) -> dict[str, list[int]]:
    """key -> shape of every tensor in a safetensors file, from its header only."""
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            shapes[k] = list(f.get_slice(k).get_shape())
    return shapes


def check_sd1_single_file(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` (saying what the file is) unless ``path`` is an SD1.x single-file
    ``.safetensors`` checkpoint in the LDM layout; ``FileNotFoundError`` if it does not exist.

    Cheap: only the safetensors header is read (no tensor data)."""
    from .io import _PICKLE_SUFFIXES

    path = Path(path).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickled checkpoints can run code when loaded and are never read; "
                         "convert it to .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint must be a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        shapes = _header(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    problem = _sd1_problem(shapes)
    if problem:
        raise ValueError(f"{path} {problem}; as a single file this version reads SD1.x and SDXL base "
                         "checkpoints")


def is_sd1_single_file(path: str | os.PathLike) -> bool:
    """True when :func:`check_sd1_single_file` accepts ``path``."""
    try:
        check_sd1_single_file(path)
    except (ValueError, OSError):
        return False
    return True


def _sd1_problem(shapes: dict[str, list[int]]) -> str | None:
    keys = shapes.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "is an SDXL checkpoint (conditioner.embedders.* keys)"
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in keys):
            return "holds a diffusers UNet alone, not a full LDM single-file checkpoint"
        return "is not a Stable Diffusion single-file checkpoint (no model.diffusion_model.* keys)"
    ctx = {s[-1] for k, s in shapes.items()
           if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    if ctx and ctx != {768}:
        width = max(ctx)
        what = {1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}.get(width, "an unknown model")
        return f"is {what} ({width}-d cross-attention; SD1.x has 768)"
    if not ctx:
        return "has a UNet without cross-attention; not an SD1.x checkpoint"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "has an OpenCLIP text encoder (SD2.x); not an SD1.x checkpoint"
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        return "has a class/label embedding (SDXL / unCLIP / upscaler); not a plain SD1.x checkpoint"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return "has no UNet input convolution (model.diffusion_model.input_blocks.0.0.weight)"
    if conv_in[1] != 4:
        kind = "an inpainting" if conv_in[1] == 9 else f"a {conv_in[1]}-channel"
        return f"is {kind} UNet ({conv_in[1]} input channels; erasure needs the 4-channel SD1.x UNet)"
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        return "has no VAE (first_stage_model.* keys)"
    if not any(k.startswith(TEXT_PREFIX) for k in keys):
        return "has no CLIP text encoder (cond_stage_model.transformer.* keys)"
    return None


# ---- tokenizer ------------------------------------------------------------------------------------
def _byte_table() -> list[str]:
    """The CLIP/GPT-2 byte-to-unicode characters, in CLIP's vocabulary order: the printable bytes
    (mapped to themselves) first, then the other bytes (mapped to 256, 257, ...)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def clip_vocab(bpe_path: str | os.PathLike = CLIP_BPE) -> tuple[dict[str, int], list[str]]:
    """CLIP's ``vocab`` (token -> id, 49408 entries) and its merge lines, derived from the BPE file:
    the 256 byte characters, the same with ``</w>``, the 48894 merges after the header line joined,
    then ``<|startoftext|>`` and ``<|endoftext|>``."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = 49152 - 256 - 2
    merges = lines[1:1 + n_merges]
    chars = _byte_table()
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"{bpe_path} does not give CLIP's 49408-token vocabulary ({len(vocab)})")
    return vocab, merges


def clip_tokenizer(bpe_path: str | os.PathLike = CLIP_BPE, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` equal to SD1.x's (OpenAI CLIP ViT-L/14's), built offline;
    SDXL's second tokenizer is the same with ``pad_token="!"``."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(bpe_path)
    with tempfile.TemporaryDirectory(prefix="bierasing-clip-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                            model_max_length=model_max_length, pad_token=pad_token)
    return tok


# ---- LDM single file -> diffusers -------------------------------------------------------------------
def _read_config(folder: Path, sub: str) -> dict:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    f = folder / sub / name
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not an SD1.x config folder: {sub}/{name} is missing")
    return json.loads(f.read_text())


def _load_ldm(path: Path) -> dict[str, torch.Tensor]:
    """The UNet / VAE / text-encoder tensors of a single file (EMA copies and the rest left out)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            if k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)):
                out[k] = f.get_tensor(k)
    return out


def convert_sd1_checkpoint(ckpt: dict[str, torch.Tensor], unet_config: dict, vae_config: dict
                           ) -> dict[str, dict[str, torch.Tensor]]:
    """LDM single-file tensors -> diffusers state dicts ``{"unet", "vae", "text_encoder"}``, with
    diffusers' own converters (``diffusers.loaders.single_file_utils``)."""
    from diffusers.loaders import single_file_utils as sfu

    unet = sfu.convert_ldm_unet_checkpoint(ckpt, unet_config)
    vae = sfu.convert_ldm_vae_checkpoint(ckpt, vae_config)
    text = sfu.convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if k.startswith(TEXT_PREFIX)})
    # LDM files name CLIPTextModel's weights text_model.* (a few very old ones leave that level out)
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    return {"unet": unet, "vae": vae, "text_encoder": text}


def _fill(build, sd: dict[str, torch.Tensor], dtype: torch.dtype, what: str, path: Path):
    """``build()`` a module without initialising its weights, then load ``sd`` into it exactly."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        model = build()
    own = model.state_dict()
    if sd and all(k.startswith("text_model.") for k in sd) and not any(k.startswith("text_model.") for k in own):
        sd = {k[len("text_model."):]: v for k, v in sd.items()}  # transformers 5 has no text_model level
    # buffers the module rebuilds itself (CLIP's position_ids) may or may not be saved in a checkpoint
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("position_ids")}
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: the {what} weights do not match the SD1.x {what} "
                         f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                         f"e.g. {unexpected[:3]}); is this an SD1.x checkpoint?")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: the {what} weight {k} has shape {tuple(sd[k].shape)}, the config "
                         f"expects {tuple(own[k].shape)} ({len(bad)} such); is this an SD1.x checkpoint?")
    model.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are not in sd: still on meta
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape).clone(),
                                  persistent=False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_cpu(build, dtype)  # slow path: initialise on the CPU, then overwrite
        model.load_state_dict(sd, strict=True)
    return model


def build_cpu(build, dtype):
    with torch.device("cpu"):
        return build().to(dtype)


def load_sd1_single_file(path: str | os.PathLike, ip_adapter: str | os.PathLike | None = None,
                         image_encoder: str | os.PathLike | None = None, resolution: int = 512,
                         device: str = "cpu", dtype: torch.dtype = torch.float32,
                         config: str | os.PathLike | None = None,
                         image_normalization: str = "bi-erasing"):
    """An :class:`~bierasing.sd15.SD15Backbone` from an SD1.x single-file ``.safetensors``.

    ``config`` is a folder with ``unet/``, ``vae/``, ``text_encoder/`` configs and
    ``scheduler/scheduler_config.json`` (default: the SD1.5 one the package ships); a
    ``tokenizer/`` folder in it is used if present, otherwise CLIP's tokenizer is derived from the
    shipped BPE file. ``ip_adapter`` + ``image_encoder`` add the IP-Adapter image branch as in
    :meth:`SD15Backbone.from_pretrained`. Offline; only safetensors are read."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .sd15 import SD15Backbone

    path = Path(path).expanduser()
    check_sd1_single_file(path)
    if (ip_adapter is None) != (image_encoder is None):
        raise ValueError("give both ip_adapter and image_encoder for the image branch, or neither")
    cfg_dir = Path(config).expanduser() if config is not None else SD15_CONFIG
    cfgs = {sub: _read_config(cfg_dir, sub) for sub in _COMPONENTS}
    if cfgs["unet"].get("cross_attention_dim", 1280) != 768 or cfgs["unet"].get("in_channels", 4) != 4:
        raise ValueError(f"{cfg_dir} is not an SD1.x config (the UNet needs 768-d cross-attention and "
                         "4 input channels)")

    sds = convert_sd1_checkpoint(_load_ldm(path), cfgs["unet"], cfgs["vae"])
    unet = _fill(lambda: UNet2DConditionModel.from_config(cfgs["unet"]), sds["unet"], dtype, "UNet", path)
    vae = _fill(lambda: AutoencoderKL.from_config(cfgs["vae"]), sds["vae"], dtype, "VAE", path)
    text_cfg = CLIPTextConfig.from_json_file(str(cfg_dir / "text_encoder" / "config.json"))
    text = _fill(lambda: CLIPTextModel(text_cfg), sds["text_encoder"], dtype, "text encoder", path)
    del sds
    sched = DDPMScheduler.from_config(cfgs["scheduler"])
    if (cfg_dir / "tokenizer").is_dir():
        tok = CLIPTokenizer.from_pretrained(cfg_dir / "tokenizer")
    else:
        tok = clip_tokenizer()

    return SD15Backbone.assemble(tok, text, unet, vae, sched, ip_adapter, image_encoder, resolution, device, dtype,
                                 image_normalization)


def _unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    from .unet_names import diffusers_to_ldm

    names = diffusers_to_ldm(config)
    out = {}
    for k, v in sd.items():
        mod, param = k.rsplit(".", 1)
        if mod not in names:
            raise KeyError(f"no LDM name for UNet module {mod}")
        out[UNET_PREFIX + names[mod] + "." + param] = v
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_to_ldm(sd: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        mod, param = k.rsplit(".", 1)
        m = re.fullmatch(r"(encoder|decoder)\.(.+)", mod)
        side, rest = (m.group(1), m.group(2)) if m else ("", mod)
        if m is None:  # quant_conv / post_quant_conv
            new = rest
        elif rest in ("conv_in", "conv_out"):
            new = f"{side}.{rest}"
        elif rest == "conv_norm_out":
            new = f"{side}.norm_out"
        elif r := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
            new = f"{side}.down.{r[1]}.block.{r[2]}.{_VAE_RESNET.get(r[3], r[3])}"
        elif r := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            new = f"{side}.down.{r[1]}.downsample.conv"
        elif r := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
            new = f"{side}.up.{n_levels - 1 - int(r[1])}.block.{r[2]}.{_VAE_RESNET.get(r[3], r[3])}"
        elif r := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            new = f"{side}.up.{n_levels - 1 - int(r[1])}.upsample.conv"
        elif r := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest):
            new = f"{side}.mid.block_{int(r[1]) + 1}.{_VAE_RESNET.get(r[2], r[2])}"
        elif r := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", rest):
            new = f"{side}.mid.attn_1.{_VAE_ATTN[r[1]]}"
            if r[1] != "group_norm" and param == "weight":
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        else:
            raise KeyError(f"no LDM name for VAE module {mod}")
        out[VAE_PREFIX + new + "." + param] = v
    return out


def diffusers_to_ldm_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The LDM single-file tensors of diffusers SD1.x components (the inverse of
    :func:`convert_sd1_checkpoint`)."""
    out = _unet_to_ldm(unet.state_dict(), unet.config)
    out.update(_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    out.update({TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
                for k, v in text_encoder.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def build_sd1_single_file(path: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """A tiny random SD1-architecture single file for tests (the ``"tiny"`` stand-in of
    :func:`bierasing.standins.build_sd15_folder`, same seed -> same weights), written as:

    * ``path`` (a ``.safetensors`` in the LDM key layout);
    * ``<stem>_config/``: the matching config folder for ``load_sd1_single_file(config=...)``
      (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/`` configs, ``tokenizer/``, ``model_index.json``);
    * ``<stem>_diffusers/``: the diffusers original (with ``image_encoder/`` and
      ``ip-adapter_sd15.safetensors``).

    Returns ``{"checkpoint", "config", "diffusers", "ip_adapter", "image_encoder"}``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .io import save_safetensors
    from .standins import build_sd15_folder

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the stand-in single file must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    original = path.parent / f"{path.stem}_diffusers"
    config = path.parent / f"{path.stem}_config"
    got = build_sd15_folder(original, size="tiny", seed=seed)
    unet = UNet2DConditionModel.from_pretrained(original / "unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(original / "vae", use_safetensors=True)
    text = CLIPTextModel.from_pretrained(original / "text_encoder", use_safetensors=True)
    save_safetensors(path, diffusers_to_ldm_checkpoint(unet, vae, text))
    if config.exists():
        shutil.rmtree(config)
    config.mkdir()
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("scheduler", "scheduler_config.json")):
        (config / sub).mkdir()
        shutil.copy2(original / sub / name, config / sub / name)
    shutil.copytree(original / "tokenizer", config / "tokenizer")
    shutil.copy2(original / "model_index.json", config / "model_index.json")
    return {"checkpoint": path, "config": config, "diffusers": original,
            "ip_adapter": got["ip_adapter"], "image_encoder": got["image_encoder"]}
