"""Batch erasure: a concept list (CSV or TOML) -> one erasure per row through a running ComfyUI.

Each row fills an API-format prompt template (``bierasing/templates/erase_template_api.json``,
shipped with the package; ``workflows/batch/erase_template_api.json`` is a copy of it) and is queued
on a ComfyUI server, either over its HTTP API (``POST /prompt``, then ``GET /history/{id}``) or
through comfy-cli (``comfy run --workflow F --wait --json``). Finished rows are recorded in a JSON
state file after every row, so running the same command again skips them (a row whose settings
changed runs again); a failed row is reported and the batch goes on. At the end a Markdown summary
table is printed and written next to the state file as ``batch_summary.md``.

Standard library only (plus ``bierasing.io``, which needs neither torch nor numpy), and no torch: this
module talks to a server, it never loads a model. Progress goes to the ``bierasing.batch`` logger
unless a ``progress`` function is given; the command line prints it.

    bierasing batch concepts.csv [--server 127.0.0.1:8188 [--server 127.0.0.1:8189 ...]] [--via http|comfy-cli] [--dry-run]
"""

from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from . import methods as registry

from .io import NAME_PROBLEMS, atomic_write_json, atomic_write_text, name_problem

logger = logging.getLogger(__name__)

# the methods the Erase node trains, and which exemplars each needs (bierasing.methods, torch-free)
METHODS = registry.JOB_METHODS
NEEDS_NEGATIVE_IMAGES = tuple(m for m in METHODS if registry.get(m).negative_images)
NEEDS_POSITIVE_IMAGES = tuple(m for m in METHODS if registry.get(m).positive_images)
NEEDS_IMAGE_ENCODER = tuple(m for m in METHODS if registry.get(m).needs_image_encoder)

COLUMNS = ("name", "concept", "safe", "method", "steps", "negative", "positive", "output",
           "checkpoint", "seed", "lr", "count", "extra")
ALIASES = {"safe_concept": "safe"}
# inputs of BiErasingErase that have their own column (``extra`` may not set them)
DEDICATED = {"concept": "concept", "safe_concept": "safe", "method": "method", "steps": "steps",
             "seed": "seed", "lr": "lr"}

ERASE = "BiErasingErase"
SAVE = "BiErasingSaveErasure"
GENERATE = "BiErasingGenerateExemplars"
LOAD = "BiErasingLoadExemplars"
#: model loaders and the input the ``checkpoint`` column sets
MODEL_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}
SIDES = {"negative": "negative exemplars", "positive": "positive exemplars"}
SIDE_INPUT = {"negative": "negative_images", "positive": "positive_images"}

# package data (pyproject [tool.setuptools.package-data]), so it is found after a plain `pip install`;
# workflows/make_workflows.py copies it to workflows/batch/erase_template_api.json
TEMPLATES = {"sd15": Path(__file__).resolve().parent / "templates" / "erase_template_api.json",
             "sdxl": Path(__file__).resolve().parent / "templates" / "erase_template_sdxl_api.json",
             "flux": Path(__file__).resolve().parent / "templates" / "erase_template_flux_api.json"}
DEFAULT_TEMPLATE = TEMPLATES["sd15"]
DEFAULT_SERVER = "127.0.0.1:8188"
DEFAULT_TIMEOUT = 3600.0
SUMMARY_NAME = "batch_summary.md"
STATE_VERSION = 1


# ---- concept list ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One erasure of the concept list, normalised; ``errors`` lists what is wrong with it."""

    number: int                      # 1-based position among the concept rows
    concept: str = ""
    safe: str = ""
    method: str = "bi-erasing"
    steps: int = 200
    negative: str = "generate"       # "generate" or an exemplar folder under ComfyUI's input/
    positive: str = "generate"
    name: str = ""
    output: str = ""                 # file name under models/loras (".safetensors" is added by the node)
    checkpoint: str | None = None
    seed: int | None = None
    lr: float | None = None
    count: int | None = None         # exemplars to generate, or at most this many from a folder
    extra: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    line: int | None = None          # CSV line number, for messages

    def settings(self) -> dict:
        """Everything that determines the erasure (what the resume hash covers)."""
        return {k: getattr(self, k) for k in ("concept", "safe", "method", "steps", "negative", "positive",
                                              "output", "checkpoint", "seed", "lr", "count", "extra")}

    def settings_hash(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return self.name or f"row{self.number}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _where(number: int, line: int | None) -> str:
    return f"row {number}" + (f" (line {line})" if line else "")


def _int(value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError
    return v


def _output_problem(out: str) -> str | None:
    """Why ``out`` cannot name a file in the server's models/loras (checked as text: that folder is on
    the server, not here), else None."""
    problem = name_problem(out)
    if problem is None:
        return None
    return {"empty": "is empty",
            "nul": f"{out!r} contains a NUL character",
            "absolute": f"{out!r} is absolute; give a name inside models/loras such as 'erasures/dog'",
            "escapes": f"{out!r} contains '..' that leads out of models/loras; the erasure must stay inside it",
            }.get(problem) or NAME_PROBLEMS[problem].format(name=out)


def _make_row(number: int, raw: dict[str, Any], line: int | None = None) -> Row:
    """Normalise and validate one row's raw values (strings from CSV, typed values from TOML)."""
    row = Row(number, line=line)
    where = _where(number, line)

    def err(col: str, msg: str) -> None:
        row.errors.append(f"{where}, column {col}: {msg}")

    vals: dict[str, Any] = {}
    for key, v in raw.items():
        k = ALIASES.get(str(key).strip().lower(), str(key).strip().lower())
        if k == "(extra cells)":
            err("(extra cells)", f"more cells than header columns ({v!r}); quote values that contain commas, "
                "e.g. the JSON of extra")
            continue
        if k not in COLUMNS:
            if v not in (None, ""):
                err(k or "(unnamed)", f"unknown column (known: {', '.join(COLUMNS)})")
            continue
        vals[k] = v.strip() if isinstance(v, str) else v

    def text(col: str) -> str:
        v = vals.get(col)
        if v is None:
            return ""
        if not isinstance(v, str):
            err(col, f"expected text, got {v!r}")
            return ""
        return v

    row.concept = text("concept")
    if not row.concept:
        err("concept", "empty; give the concept to erase, e.g. 'nudity'")
    method = text("method").lower() or "bi-erasing"
    if method not in METHODS:
        err("method", f"unknown method {method!r} (one of {', '.join(METHODS)})")
    row.method = method
    row.safe = text("safe")
    if method == "bi-erasing" and not row.safe:
        err("safe", "bi-erasing needs a safe alternative (what the concept should turn into, e.g. 'clothed')")

    if vals.get("steps") not in (None, ""):
        try:
            row.steps = _int(vals["steps"], 1, 100000)
        except (ValueError, TypeError):
            err("steps", f"{vals['steps']!r} is not a positive whole number (1..100000)")
    for col, lo, hi in (("seed", 0, 2**31 - 1), ("count", 1, 256)):
        if vals.get(col) not in (None, ""):
            try:
                setattr(row, col, _int(vals[col], lo, hi))
            except (ValueError, TypeError):
                err(col, f"{vals[col]!r} is not a whole number in [{lo}, {hi}]")
    if vals.get("lr") not in (None, ""):
        try:
            if isinstance(vals["lr"], bool):
                raise ValueError
            row.lr = float(vals["lr"])
            if not (0 < row.lr <= 1):
                raise ValueError
        except (ValueError, TypeError):
            err("lr", f"{vals['lr']!r} is not a learning rate in (0, 1]")
            row.lr = None

    for side in ("negative", "positive"):
        v = text(side)
        setattr(row, side, "generate" if v.lower() in ("", "generate") else v)
    row.checkpoint = text("checkpoint") or None

    extra = vals.get("extra")
    if isinstance(extra, str) and extra:
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as e:
            err("extra", f"not valid JSON ({e.msg} at character {e.pos}); write e.g. {{\"rank\": 8}}")
            extra = {}
    if extra in (None, ""):
        extra = {}
    if not isinstance(extra, dict):
        err("extra", f"must be a JSON object of BiErasingErase inputs, got {extra!r}")
        extra = {}
    for k in extra:
        if k in DEDICATED:
            err("extra", f"{k!r} has its own column; use the {DEDICATED[k]} column instead")
    row.extra = dict(extra)

    name = text("name")
    if name and not _NAME_RE.match(name):
        err("name", f"{name!r} may only contain letters, digits and _ . + - (it names the output file)")
    row.name = name or (slug(f"{row.concept} {method.replace('-', '')}") if row.concept else f"row{number}")
    out = text("output") or f"erasures/{row.name}"
    problem = _output_problem(out)
    if problem:
        err("output", problem)
    row.output = out
    return row


def _check_duplicates(rows: list[Row]) -> list[Row]:
    first: dict[str, Row] = {}
    for r in rows:
        if r.name in first:
            r.errors.append(f"{_where(r.number, r.line)}, column name: duplicate name {r.name!r} "
                            f"(also row {first[r.name].number}); give each row its own name")
        else:
            first[r.name] = r
    return rows


def read_concepts(path: str | os.PathLike) -> list[Row]:
    """Rows of a CSV (header row) or TOML (``[[concept]]`` tables, optional ``[defaults]``) concept list.

    Rows with problems are returned with ``errors`` set (they are reported as failed, the rest still
    runs); a file that cannot be read at all raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concept list not found: {path}")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"{path}: reading TOML needs Python 3.11 or newer; use a CSV list") from None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        tables = data.get("concept")
        if not isinstance(tables, list) or not tables:
            raise ValueError(f"{path}: no [[concept]] tables (write one [[concept]] table per erasure)")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ValueError(f"{path}: [defaults] must be a table")
        rows = [_make_row(i, {**defaults, **t} if isinstance(t, dict) else {"concept": None}) for i, t in
                enumerate(tables, 1)]
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
        header, rows, number = None, [], 0
        for lineno, cells in enumerate(lines, 1):
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue  # blank lines and '#' comments (comment a row out to drop it)
            if header is None:
                header = [c.strip().lower() for c in cells]
                if "concept" not in header:
                    raise ValueError(f"{path}: the header row needs a 'concept' column (columns: {', '.join(COLUMNS)})")
                continue
            number += 1
            raw = dict(zip(header, cells))
            if any(c.strip() for c in cells[len(header):]):
                raw["(extra cells)"] = ",".join(cells[len(header):])
            rows.append(_make_row(number, raw, lineno))
        if not rows:
            raise ValueError(f"{path}: no concept rows below the header")
    return _check_duplicates(rows)


# ---- prompt ---------------------------------------------------------------------------------------
def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _title(node: dict) -> str:
    return str((node.get("_meta") or {}).get("title", "")).strip().lower()


def _find(prompt: dict, classes: tuple[str, ...], title: str | None = None) -> str:
    hits = [nid for nid, n in prompt.items() if n.get("class_type") in classes
            and (title is None or _title(n) == title)]
    what = " or ".join(classes)
    titled = f" titled {title!r} (_meta.title)" if title else ""
    if not hits:
        raise ValueError(f"the template has no {what} node{titled}")
    if len(hits) > 1:
        raise ValueError(f"the template has {len(hits)} {what} nodes{titled} ({', '.join(hits)}); keep one")
    return hits[0]


def check_template(template: dict) -> None:
    """Fail clearly if ``template`` is not an API-format prompt with the nodes a row fills in."""
    if not isinstance(template, dict):
        raise ValueError("the template must be a JSON object of nodes (API format)")
    if isinstance(template.get("nodes"), list):
        raise ValueError("the template is a UI workflow; save it with 'Export (API)' (API format: "
                         "{\"1\": {\"class_type\": ..., \"inputs\": {...}}})")
    for nid, n in template.items():
        if not isinstance(n, dict) or "class_type" not in n or not isinstance(n.get("inputs"), dict):
            raise ValueError(f"template node {nid!r} is not an API-format node (class_type + inputs)")
    _find(template, (ERASE,))
    _find(template, (SAVE,))
    for title in SIDES.values():
        _find(template, (GENERATE, LOAD), title)


def _referenced(prompt: dict) -> set[str]:
    return {v[0] for n in prompt.values() for v in n["inputs"].values() if _is_link(v)}


def build_prompt(template: dict, row: Row) -> dict:
    """The template filled in for one row (the template itself is left untouched)."""
    check_template(template)
    p = copy.deepcopy(template)
    feeders = _referenced(p)
    erase = p[_find(p, (ERASE,))]["inputs"]
    erase.update(concept=row.concept, safe_concept=row.safe, method=row.method, steps=row.steps)
    if row.seed is not None:
        erase["seed"] = row.seed
    if row.lr is not None:
        erase["lr"] = row.lr
    for k, v in row.extra.items():
        if k not in erase:
            raise ValueError(f"extra: {k!r} is not an input of {ERASE} in the template "
                             f"(inputs: {', '.join(sorted(erase))})")
        if _is_link(erase[k]):
            raise ValueError(f"extra: {k!r} is a connection in the template, not a setting")
        erase[k] = v
    p[_find(p, (SAVE,))]["inputs"]["filename"] = row.output
    if row.checkpoint:
        loader = _find(p, tuple(MODEL_LOADERS))
        p[loader]["inputs"][MODEL_LOADERS[p[loader]["class_type"]]] = row.checkpoint

    used = {"negative": row.method in NEEDS_NEGATIVE_IMAGES, "positive": row.method in NEEDS_POSITIVE_IMAGES}
    for side, title in SIDES.items():
        nid = _find(p, (GENERATE, LOAD), title)
        if not used[side]:
            erase.pop(SIDE_INPUT[side], None)  # the method ignores these images: don't make them
            continue
        node, source = p[nid], getattr(row, side)
        text = row.concept if side == "negative" else row.safe
        if source == "generate":
            if node["class_type"] != GENERATE:
                raise ValueError(f"{side}: 'generate' needs a {GENERATE} node titled {title!r} in the template "
                                 f"(it has {node['class_type']})")
            node["inputs"]["prompt"] = f"a photo of {text}"
            if row.seed is not None:
                node["inputs"]["seed"] = row.seed
            if row.count is not None:
                node["inputs"]["count"] = row.count
        else:
            old = node["inputs"]
            size = old.get("size", old.get("resolution", 512))
            max_images = row.count if row.count is not None else old.get("max_images", 0)
            p[nid] = {"class_type": LOAD, "inputs": {"folder": source, "size": size, "max_images": max_images},
                      "_meta": dict(node.get("_meta") or {}, title=title)}
    if row.method not in NEEDS_IMAGE_ENCODER:
        erase.pop("clip_vision", None)
        erase.pop("image_adapter", None)
    # drop nodes that only fed what was just disconnected (ComfyUI would still validate them)
    while True:
        orphans = [nid for nid in p if nid in feeders and nid not in _referenced(p)]
        if not orphans:
            break
        for nid in orphans:
            del p[nid]
    return p


def load_template(path: str | os.PathLike) -> dict:
    """An API-format prompt template: a file, or the name of a shipped one (``sd15``, ``sdxl``, ``flux``)."""
    path = TEMPLATES.get(str(path), Path(path))
    if not path.is_file():
        raise ValueError(f"template not found: {path} (give --template sd15, sdxl, flux or a PATH)")
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    check_template(template)
    return template


# ---- transports -----------------------------------------------------------------------------------
@dataclass
class RowResult:
    status: str                      # "done", "failed" or "skipped"
    prompt_id: str | None = None
    outputs: Any = None              # what the server reported per output node
    error: str = ""
    seconds: float = 0.0
    name: str = ""
    concept: str = ""
    method: str = ""
    output: str = ""                 # the erasure's file under models/loras
    server: str = ""                 # HOST:PORT of the ComfyUI that ran the row

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Transport(Protocol):
    name: str  # HOST:PORT, for messages

    def run(self, prompt: dict, timeout: float) -> RowResult: ...


class ServerUnreachable(ConnectionError):
    """The server did not take the prompt at all (down, wrong port): the row may run elsewhere."""


def parse_server(server: str) -> tuple[str, int]:
    s = server.strip()
    s = re.sub(r"^https?://", "", s).rstrip("/")
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--server {server!r}: expected HOST:PORT, e.g. 127.0.0.1:8188")
    return host.strip("[]"), int(port)


def _format_node_errors(body: dict) -> str:
    """The text of a /prompt 400 response: the error plus every node's errors."""
    parts = []
    err = body.get("error")
    if isinstance(err, dict):
        parts.append(" ".join(str(x) for x in (err.get("message"), err.get("details")) if x))
    elif err:
        parts.append(str(err))
    node_errors = body.get("node_errors") or {}
    items = node_errors.items() if isinstance(node_errors, dict) else enumerate(node_errors)
    for nid, ne in items:
        if not isinstance(ne, dict):
            parts.append(f"node {nid}: {ne}")
            continue
        nid = ne.get("node_id", nid)
        cls = ne.get("class_type", "")
        errs = ne.get("errors") or [ne]
        for e in errs:
            if isinstance(e, dict):
                msg = ": ".join(str(x) for x in (e.get("message"), e.get("details")) if x)
            else:
                msg = str(e)
            parts.append(f"node {nid}" + (f" ({cls})" if cls else "") + f": {msg}")
    return "; ".join(p for p in parts if p) or "prompt rejected"


def _execution_error(messages) -> str:
    for item in messages or []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            continue
        event, data = item
        data = data if isinstance(data, dict) else {}
        if event == "execution_error":
            where = f"{data.get('node_type') or 'node'} (node {data.get('node_id')})"
            exc = ": ".join(str(x).strip() for x in (data.get("exception_type"), data.get("exception_message")) if x)
            return f"{where}: {exc or 'execution error'}"
        if event == "execution_interrupted":
            return f"interrupted on the server (node {data.get('node_id')})"
    return ""


class HttpComfy:
    """Queues prompts on a ComfyUI server over HTTP and polls ``/history`` until each finishes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8188, poll: float = 1.0,
                 request_timeout: float = 30.0, client_id: str | None = None):
        self.base = f"http://{host}:{port}"
        self.name = f"{host}:{port}"
        self.current: str | None = None  # the prompt this transport waits for
        self.poll = poll
        self.request_timeout = request_timeout
        self.client_id = client_id or f"bierasing-batch-{uuid.uuid4().hex[:8]}"

    def _request(self, method: str, route: str, body: dict | list | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def ping(self) -> str | None:
        """None if the server answers, else why not."""
        try:
            self._request("GET", "/system_stats")
            return None
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"cannot reach ComfyUI at {self.base} ({getattr(e, 'reason', e)})"

    def cancel(self, prompt_id: str) -> None:
        """Best effort: drop the prompt from the queue, and stop it if it is the one running."""
        for route, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self._request("POST", route, body)
            except (urllib.error.URLError, OSError, ValueError):
                pass

    def run(self, prompt: dict, timeout: float = DEFAULT_TIMEOUT) -> RowResult:
        t0 = time.monotonic()
        elapsed = lambda: round(time.monotonic() - t0, 2)  # noqa: E731
        try:
            resp = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", "replace")
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = None
            if e.code == 400 and isinstance(body, dict):
                return RowResult("failed", error=_format_node_errors(body), seconds=elapsed())
            return RowResult("failed", error=f"HTTP {e.code} from /prompt: {raw[:300]}", seconds=elapsed())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ServerUnreachable(f"cannot queue on {self.base}: {getattr(e, 'reason', e)}") from None
        pid = (resp or {}).get("prompt_id")
        if not pid:
            return RowResult("failed", error=f"{self.base}/prompt answered without a prompt_id: {resp!r}"[:300],
                             seconds=elapsed())
        lost_since = None
        self.current = pid
        try:
            while True:
                try:
                    hist = self._request("GET", f"/history/{pid}") or {}
                    lost_since = None
                except (urllib.error.URLError, OSError, ValueError) as e:
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > max(30.0, 5 * self.poll):
                        return RowResult("failed", pid, error=f"lost contact with ComfyUI at {self.base} "
                                         f"({getattr(e, 'reason', e)})", seconds=elapsed())
                    hist = {}
                entry = hist.get(pid)
                if isinstance(entry, dict):
                    status = entry.get("status") or {}
                    outputs = entry.get("outputs") or {}
                    state = status.get("status_str")
                    if state == "error":
                        return RowResult("failed", pid, outputs, _execution_error(status.get("messages"))
                                         or "ComfyUI reported an error", elapsed())
                    if status.get("completed") or state == "success" or (not status and outputs):
                        return RowResult("done", pid, outputs, seconds=elapsed())
                if time.monotonic() - t0 > timeout:
                    self.cancel(pid)
                    return RowResult("failed", pid, error=f"timed out after {timeout:g} s (prompt cancelled)",
                                     seconds=elapsed())
                time.sleep(self.poll)
        except KeyboardInterrupt:
            self.cancel(pid)
            raise
        finally:
            self.current = None


def parse_envelope(stdout: str) -> dict | None:
    """comfy-cli's final JSON envelope from its stdout (a single object, or the last NDJSON line)."""
    try:
        obj = json.loads(stdout)
        if isinstance(obj, dict) and "ok" in obj:
            return obj
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "ok" in obj and obj.get("type", "envelope") == "envelope":
            return obj
    return None


def _prompt_id_from_events(stdout: str) -> str | None:
    for line in stdout.splitlines():
        m = re.search(r'"prompt_id"\s*:\s*"([^"]+)"', line)
        if m:
            return m.group(1)
    return None


class ComfyCli:
    """Runs each prompt with ``comfy run --workflow F --wait --json`` (comfy-cli) and reads its envelope."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8188, comfy_bin: str = "comfy"):
        self.host, self.port, self.comfy_bin = host, port, comfy_bin
        self.name = f"{host}:{port}"

    def command(self, workflow: str | os.PathLike, timeout: float) -> list[str]:
        return [self.comfy_bin, "--skip-prompt", "run", "--workflow", str(workflow), "--wait", "--json",
                "--host", self.host, "--port", str(self.port), "--timeout", str(max(1, int(timeout)))]

    def run(self, prompt: dict, timeout: float = DEFAULT_TIMEOUT) -> RowResult:
        t0 = time.monotonic()
        elapsed = lambda: round(time.monotonic() - t0, 2)  # noqa: E731
        with tempfile.TemporaryDirectory(prefix="bierasing-batch-") as d:
            wf = Path(d) / "prompt_api.json"
            wf.write_text(json.dumps(prompt, indent=1), encoding="utf-8")
            try:
                proc = subprocess.run(self.command(wf, timeout), capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=timeout + 60)
            except FileNotFoundError:
                return RowResult("failed", error=f"comfy-cli not found ({self.comfy_bin!r}); "
                                 "pip install comfy-cli, or use --via http", seconds=elapsed())
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                pid = _prompt_id_from_events(out)
                if pid:
                    HttpComfy(self.host, self.port).cancel(pid)
                return RowResult("failed", pid, error=f"timed out after {timeout:g} s", seconds=elapsed())
        env = parse_envelope(proc.stdout)
        if env is None:
            tail = (proc.stderr or proc.stdout).strip()[-400:]
            return RowResult("failed", error=f"comfy run exited with {proc.returncode} and no JSON envelope: {tail}",
                             seconds=elapsed())
        data = env.get("data") if isinstance(env.get("data"), dict) else {}
        pid = data.get("prompt_id") or _prompt_id_from_events(proc.stdout)
        outputs = data.get("outputs_by_node") or data.get("outputs")
        if env.get("ok") and proc.returncode == 0 and data.get("status", "completed") == "completed":
            return RowResult("done", pid, outputs, seconds=elapsed())
        err = env.get("error") if isinstance(env.get("error"), dict) else {}
        msg = str(err.get("message") or f"comfy run exited with {proc.returncode}")
        details = err.get("details") if isinstance(err.get("details"), dict) else {}
        if details.get("node_errors"):
            msg += ": " + _format_node_errors({"node_errors": details["node_errors"]})
        elif details.get("exception_message") and details["exception_message"] not in msg:
            msg += f": {details['exception_message']}"
        if err.get("code"):
            msg = f"[{err['code']}] {msg}"
        return RowResult("failed", pid, outputs, msg, elapsed())


# ---- the batch ------------------------------------------------------------------------------------
def load_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"version": STATE_VERSION, "rows": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"state file {path} is not valid JSON ({e}); delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("rows"), dict):
        raise ValueError(f"state file {path} is not a batch state file; delete it to start over")
    return state


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write the state atomically (:func:`bierasing.io.atomic_write_json`: a temporary file beside
    it, then ``os.replace``; a failed write leaves the old state as it was)."""
    atomic_write_json(path, state, indent=1)


def output_path(row_output: str) -> str:
    name = row_output if row_output.endswith(".safetensors") else row_output + ".safetensors"
    return f"models/loras/{name}"


def _saved_path(outputs) -> str | None:
    """The file Save Erasure reported ("saved X in models/loras ..."), if the outputs carry its text."""
    if not isinstance(outputs, dict):
        return None
    for ui in outputs.values():
        for t in (ui.get("text") or []) if isinstance(ui, dict) else []:
            m = re.match(r"saved (.+?) in models/loras", str(t))
            if m:
                return f"models/loras/{m.group(1)}"
    return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_batch(rows: list[Row], template: dict, transport: Transport | Sequence[Transport],
              state_path: str | os.PathLike, progress: Callable[[str], Any] | None = None,
              timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> list[RowResult]:
    """Run every row not already done; returns one result per row, in order.

    ``transport`` may be several servers (one ComfyUI per GPU): each takes the next waiting row as
    soon as it is idle, so every row runs once, on whichever server was free. A server that cannot
    be reached drops out and its row goes back to the others (it fails only when no server is left).

    ``progress`` receives one line per event (the command line prints them); by default they go to
    the ``bierasing.batch`` logger at INFO level.

    The state file maps row name -> {hash of the row's settings, status, prompt_id, outputs, server,
    ...} and is rewritten atomically after every row; a row is skipped when it is recorded as done
    with the same hash (``force`` re-runs everything).
    """
    progress = progress or logger.info
    transports = list(transport) if isinstance(transport, (list, tuple)) else [transport]
    many = len(transports) > 1
    state = load_state(state_path)
    n = len(rows)
    results: list[RowResult | None] = [None] * n
    waiting: collections.deque = collections.deque()
    for i, row in enumerate(rows):
        label = f"[{i + 1}/{n}] {row.label}"
        base = dict(name=row.label, concept=row.concept, method=row.method, output=output_path(row.output))
        if row.errors:
            results[i] = RowResult("failed", error="; ".join(row.errors), **base)
            progress(f"{label}: invalid row, not run: {results[i].error}")
            continue
        h = row.settings_hash()
        done = state["rows"].get(row.name)
        if not force and isinstance(done, dict) and done.get("status") == "done" and done.get("hash") == h:
            results[i] = RowResult("skipped", done.get("prompt_id"), done.get("outputs"), "",
                                   done.get("seconds", 0.0), **{**base, "output": done.get("output") or base["output"],
                                                                "server": done.get("server", "")})
            progress(f"{label}: skipped (done)")
            continue
        try:
            prompt = build_prompt(template, row)
        except ValueError as e:
            results[i] = RowResult("failed", error=f"{_where(row.number, row.line)}: {e}", **base)
            progress(f"{label}: invalid row, not run: {results[i].error}")
            continue
        waiting.append((i, label, base, h, prompt))

    lock = threading.Lock()
    alive = {id(t) for t in transports}

    def finish(i: int, label: str, base: dict, h: str, res: RowResult, server: str) -> None:
        res = dataclasses.replace(res, **{**base, "output": _saved_path(res.outputs) or base["output"],
                                          "server": server})
        on = f" on {server}" if many else ""
        with lock:
            results[i] = res
            state["rows"][rows[i].name] = {"hash": h, **res.to_json(), "settings": rows[i].settings(),
                                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            save_state(state_path, state)
        if res.status == "done":
            progress(f"{label}: done{on} in {res.seconds:.1f} s -> {res.output}")
        else:
            progress(f"{label}: FAILED{on} after {res.seconds:.1f} s: {_one_line(res.error)}")

    def serve(t: Transport, k: int) -> None:
        server = getattr(t, "name", f"server {k + 1}")
        while True:
            with lock:
                if not waiting:
                    return
                i, label, base, h, prompt = waiting.popleft()
            progress(f"{label}: running on {server}..." if many else f"{label}: running...")
            try:
                res = t.run(prompt, timeout)
            except ServerUnreachable as e:
                with lock:
                    alive.discard(id(t))
                    others = bool(alive)
                    if others:
                        waiting.appendleft((i, label, base, h, prompt))
                if others:
                    progress(f"{server} is unreachable ({e}); its rows go to the other servers")
                    return
                res = RowResult("failed", error=str(e))
            except Exception as e:  # a broken row or transport must not stop the batch
                res = RowResult("failed", error=f"{type(e).__name__}: {e}")
            finish(i, label, base, h, res, server)

    if not many:  # in this thread, so Ctrl-C reaches the transport (it cancels its prompt)
        serve(transports[0], 0)
    else:
        workers = [threading.Thread(target=serve, args=(t, k), daemon=True, name=f"batch-{k}")
                   for k, t in enumerate(transports)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.2)
        except KeyboardInterrupt:
            with lock:
                waiting.clear()
            for t in transports:
                if getattr(t, "current", None) and hasattr(t, "cancel"):
                    t.cancel(t.current)
            raise
    for i in range(n):  # rows left when every server dropped out mid-batch
        if results[i] is None:
            results[i] = RowResult("failed", error="no server left to run it", name=rows[i].label,
                                   concept=rows[i].concept, method=rows[i].method, output=output_path(rows[i].output))
    return results


def _cell(text) -> str:
    return _one_line(str(text), 200).replace("|", "\\|")


def summary_table(results: list[RowResult]) -> str:
    """Markdown table of a batch: row, concept, method, status, seconds, output path or error (and the
    server of each row when several ran the batch)."""
    servers = len({r.server for r in results if r.server}) > 1
    lines = ["| # | row | concept | method | status |" + (" server |" if servers else "") + " seconds | output / error |",
             "|---|-----|---------|--------|--------|" + ("--------|" if servers else "") + "--------:|----------------|"]
    for i, r in enumerate(results, 1):
        status = "skipped (done)" if r.status == "skipped" else r.status
        what = r.output if r.status in ("done", "skipped") else r.error
        lines.append(f"| {i} | {_cell(r.name)} | {_cell(r.concept)} | {_cell(r.method)} | {status} | "
                     + (f"{_cell(r.server)} | " if servers else "") + f"{r.seconds:.1f} | {_cell(what)} |")
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append("")
    lines.append(f"{counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed")
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------
def build_parser(prog: str = "bierasing batch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="One erasure per row of a concept list (CSV or TOML), run by a ComfyUI server. "
        "Resumable: finished rows are skipped when the same command runs again.")
    p.add_argument("concepts", help="concept list: .csv (header row) or .toml ([[concept]] tables); columns: "
                   + ", ".join(COLUMNS))
    p.add_argument("--template", default="sd15", help="API-format prompt for one erasure: sd15 (default), "
                   "sdxl (SDXL's files, 1024 px) or flux (FLUX.1 dev + Redux, cfg 1), or a file of your own")
    p.add_argument("--server", action="append", metavar="HOST:PORT",
                   help=f"a ComfyUI server (default: {DEFAULT_SERVER}); repeat it for one server per GPU: each "
                   "row goes to the next idle server")
    p.add_argument("--via", choices=("http", "comfy-cli"), default="http",
                   help="queue through ComfyUI's HTTP API or through `comfy run` (comfy-cli)")
    p.add_argument("--comfy", default="comfy", help="comfy-cli executable for --via comfy-cli (default: comfy)")
    p.add_argument("--state", help="state file recording finished rows (default: "
                   "outputs/batch/<list name>/state.json); batch_summary.md is written beside it")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per row (default: %(default)g)")
    p.add_argument("--force", action="store_true", help="run rows again even if the state says they are done")
    p.add_argument("--dry-run", action="store_true", help="validate the rows and write the filled prompts to "
                   "--prompts-dir without contacting a server")
    p.add_argument("--prompts-dir", help="where --dry-run writes the prompts (default: prompts/ beside the "
                   "state file)")
    return p


def _dry_run(rows: list[Row], template: dict, out_dir: Path, state_path: Path, say) -> int:
    state = load_state(state_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = 0
    for i, row in enumerate(rows, 1):
        label = f"[{i}/{len(rows)}] {row.label}"
        if row.errors:
            bad += 1
            say(f"{label}: invalid: {'; '.join(row.errors)}")
            continue
        try:
            prompt = build_prompt(template, row)
        except ValueError as e:
            bad += 1
            say(f"{label}: invalid: {_where(row.number, row.line)}: {e}")
            continue
        dest = out_dir / f"{slug(row.name) or f'row{i}'}.json"
        atomic_write_text(dest, json.dumps(prompt, indent=2) + "\n")
        done = state["rows"].get(row.name, {})
        note = " (done; a real run skips it)" if done.get("status") == "done" and \
            done.get("hash") == row.settings_hash() else ""
        say(f"{label}: ok -> {dest}{note}")
    say(f"{len(rows) - bad} rows ok, {bad} invalid; prompts in {out_dir}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``bierasing batch ...`` (``argv`` is what follows the word ``batch``). Exit 0: every row done or
    skipped; 1: some row failed; 2: the batch could not start (unreadable list or template, no server)."""
    args = build_parser().parse_args(argv)

    # the command's own output (what the user ran it for): progress and the summary on stdout,
    # why it stopped on stderr; the library functions above only log
    def say(msg: str) -> None:
        print(msg, flush=True)

    def complain(msg: str) -> None:
        print(f"bierasing batch: {msg}", file=sys.stderr, flush=True)

    concepts = Path(args.concepts)
    state_path = Path(args.state) if args.state else Path("outputs", "batch", concepts.stem, "state.json")
    try:
        rows = read_concepts(concepts)
        template = load_template(args.template)
        if args.dry_run:
            out = Path(args.prompts_dir) if args.prompts_dir else state_path.parent / "prompts"
            return _dry_run(rows, template, out, state_path, say)
        load_state(state_path)
        addresses = list(dict.fromkeys(parse_server(s) for s in (args.server or [DEFAULT_SERVER])))
    except ValueError as e:
        complain(str(e))
        return 2
    if args.via == "comfy-cli" and shutil.which(args.comfy) is None:
        complain(f"comfy-cli not found ({args.comfy!r}); pip install comfy-cli, or use --via http")
        return 2
    transports: list[Transport] = []
    for host, port in addresses:
        problem = HttpComfy(host, port).ping()
        if problem:
            complain(f"{problem}; start it first, e.g. comfy --skip-prompt --workspace <ComfyUI> "
                     f"launch --background -- --port {port}" + ("" if len(addresses) == 1 else " (skipping it)"))
            continue
        transports.append(ComfyCli(host, port, args.comfy) if args.via == "comfy-cli" else HttpComfy(host, port))
    if not transports:
        return 2
    where = ", ".join(t.name for t in transports)
    say(f"{len(rows)} rows from {concepts} -> ComfyUI at {where} via {args.via}; state {state_path}")
    try:
        results = run_batch(rows, template, transports, state_path, progress=say, timeout=args.timeout,
                            force=args.force)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        complain(f"interrupted; finished rows are kept in {state_path} (run again to resume)")
        return 130
    table = summary_table(results)
    summary = state_path.parent / SUMMARY_NAME
    atomic_write_text(summary, f"# Batch {concepts.name}\n\n{table}")
    say("")
    say(table.rstrip())
    say(f"summary: {summary}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
