"""What a user reads: every tooltip and --help line is short (what it does, when to change it;
the evidence lives in docs/), and no shipped text dates the project by internal run numbers."""

import argparse
import dataclasses
import re
import subprocess
from pathlib import Path

from bierasing.cli import build_parser
from bierasing.cond_attack import AttackConfig
from bierasing.erase.config import MAX_HELP_CHARS, EraseConfig
from bierasing.erase.masks import MaskFilter

ROOT = Path(__file__).resolve().parents[1]


def _cli_help(p: argparse.ArgumentParser, where: str = "bierasing"):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _cli_help(sub, f"{where} {name}")
        elif a.help and a.help != argparse.SUPPRESS:
            yield f"{where} {'/'.join(a.option_strings) or a.dest}", a.help


def _declared():
    for cls in (EraseConfig, MaskFilter, AttackConfig):
        for f in dataclasses.fields(cls):
            yield f"{cls.__name__}.{f.name}", f.metadata.get("help", "")
    yield from _cli_help(build_parser())
    from nodes.spec import SPECS

    for s in SPECS:
        yield f"node {s.display_name}", s.description
        for p in s.inputs + s.outputs:
            yield f"node {s.display_name}.{p.name}", p.tooltip


def test_every_tooltip_and_help_line_is_short():
    texts = list(_declared())
    assert len(texts) > 100
    long = {k: len(v) for k, v in texts if len(v) > MAX_HELP_CHARS}
    assert not long, f"over {MAX_HELP_CHARS} characters: {long}"


RUN_NUMBER = re.compile(r"\bsessions? ?-?\d+|\bsession-\d+", re.IGNORECASE)


def test_no_shipped_text_dates_the_project_by_run_numbers():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".safetensors", ".onnx") or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if RUN_NUMBER.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits[:40]) + f"\n({len(hits)} lines)"
