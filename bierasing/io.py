"""Files: atomic writes, confined output names, safetensors-only weights, resumable checkpoints.

The one place for writing files safely: :func:`atomic_write_bytes` / :func:`atomic_write_text`
(temp file in the same folder + ``os.replace``) and :func:`safe_child` / :func:`name_problem`
(a user-given name must stay inside its folder). Importing this module does not import torch or
numpy (``bierasing.batch`` uses it without them); the weight and checkpoint helpers import torch
when called.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or choose an output folder on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output folder",
    errno.EACCES: "choose an output folder you can write to (or fix its permissions)",
    errno.EPERM: "choose an output folder you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.ENOTDIR: "part of that path is a file, not a folder; choose another output folder",
    errno.EEXIST: "part of that path is a file, not a folder; choose another output folder",
}


def _write_error(path: Path, e: OSError) -> OSError:
    """The same OSError subclass (errno kept) with a message that says what to change."""
    hint = _WRITE_HINTS.get(e.errno, "check that the output folder exists and is writable")
    return OSError(e.errno, f"could not write {path} ({e.strerror or e}); {hint}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    On any failure (disk full, no permission, interrupted) neither the temp file nor a partial
    ``path`` is left behind; an existing ``path`` keeps its old contents."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise _write_error(path, e) from e
        raise


_DRIVE = re.compile(r"^[A-Za-z]:")
_BAD_CHARS = re.compile(r'[\x00-\x1f:*?"<>|]')


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a path inside a folder, judged from its text alone; None if it can.

    One of ``"empty"``, ``"nul"``, ``"absolute"`` (a leading ``/`` or ``\\``, or a Windows drive such
    as ``C:``, on every OS), ``"escapes"`` (its ``..`` parts climb above the folder; ``a/../b`` is
    fine), ``"backslash"`` (``\\`` separates folders on Windows only, so ``/`` is the one separator) or
    ``"character"`` (control characters or ``:*?"<>|``, which Windows cannot store). No file system
    access: use it for folders on another machine (a ComfyUI server's models/loras); :func:`safe_child` adds the symlink-aware check for local folders.
    """
    if not name or not name.strip():
        return "empty"
    if "\x00" in name:
        return "nul"
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or PurePath(name).is_absolute():
        return "absolute"
    if "\\" in name:
        return "backslash"
    if _BAD_CHARS.search(name):
        return "character"
    depth = 0
    for part in re.split(r"[/\\]", name):
        if part == "..":
            depth -= 1
            if depth < 0:
                return "escapes"
        elif part not in ("", "."):
            depth += 1
    return None


NAME_PROBLEMS = {
    "backslash": "{name!r} contains a backslash; use / to put the file in a subfolder",
    "character": "{name!r} contains a character file names cannot hold (control characters or :*?\"<>|); "
                 "use letters, digits, - _ . and / for subfolders",
}


def safe_child(root: str | os.PathLike, name: str) -> Path:
    """``root / name`` if it stays inside ``root``; a clear error for absolute paths and '..' escapes
    (by the name's text, see :func:`name_problem`, and after resolving symlinks)."""
    problem = name_problem(name)
    if problem == "empty":
        raise ValueError("the output name is empty")
    if problem == "nul":
        raise ValueError("the output name contains a NUL character")
    if problem == "absolute":
        raise ValueError(f"{name!r} is an absolute path; give a name inside the output folder")
    if problem in ("backslash", "character"):
        raise ValueError(NAME_PROBLEMS[problem].format(name=name))
    p = Path(name)
    base = Path(root).resolve()
    if problem == "escapes":
        raise ValueError(f"{name!r} would leave the output folder {base}; remove the '..' parts")
    target = (base / p).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{name!r} would leave the output folder {base}; remove the '..' parts")
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """:func:`atomic_write_text` of ``obj`` as JSON (serialised first, so a value that is not JSON
    leaves ``path`` untouched)."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (metadata values must be strings)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors + metadata; refuses pickle formats with a message that says what to do."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{path.name} is a pickle-format file; pickles can run arbitrary code and "
                         "are never loaded here. Convert it to .safetensors first.")
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises several types for a damaged header
        raise ValueError(f"{path.name} is not a readable safetensors file ({e}); it is damaged or another "
                         "format: download it again or re-export it as .safetensors") from e


# ---- training checkpoints --------------------------------------------------------------------

def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """Flatten an optimizer state_dict into (tensors, json-able meta)."""
    import torch

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict,
                           prefix: str = "optim") -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(np_rng: np.random.Generator | None, torch_gen: torch.Generator | None) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    if torch_gen is not None:
        tensors["rng.torch"] = torch_gen.get_state()
    if np_rng is not None:
        meta["numpy"] = np_rng.bit_generator.state
    return tensors, meta


def restore_rng(tensors: dict, meta: dict, np_rng: np.random.Generator | None,
                torch_gen: torch.Generator | None) -> None:
    if torch_gen is not None:
        torch_gen.set_state(tensors["rng.torch"])
    if np_rng is not None:
        np_rng.bit_generator.state = meta["numpy"]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_safetensors(path, tensors, {"checkpoint": json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, raw = load_safetensors(path)
    if "checkpoint" not in raw:
        raise ValueError(f"{path} is not a bierasing checkpoint (no 'checkpoint' metadata)")
    return tensors, json.loads(raw["checkpoint"])
