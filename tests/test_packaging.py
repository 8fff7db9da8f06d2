"""Packaging: what a plain (non-editable) ``pip install`` of bierasing ships and what importing it costs.

No torch here: these build a wheel with pip and read files.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bierasing
from bierasing import batch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_TEMPLATE = ROOT / "bierasing" / "templates" / "erase_template_api.json"
WORKFLOWS_TEMPLATE = ROOT / "workflows" / "batch" / "erase_template_api.json"


def test_default_template_is_package_data():
    """The batch command's default template lives inside the package, not in the repository's workflows/."""
    pkg = Path(bierasing.__file__).resolve().parent
    assert batch.DEFAULT_TEMPLATE == PACKAGE_TEMPLATE
    assert pkg in batch.DEFAULT_TEMPLATE.parents
    resource = importlib.resources.files("bierasing") / "templates" / "erase_template_api.json"
    assert resource.read_bytes() == batch.DEFAULT_TEMPLATE.read_bytes()
    batch.load_template(batch.DEFAULT_TEMPLATE)  # a valid prompt with the nodes a row fills in
    assert batch.build_parser().parse_args(["c.csv"]).template == "sd15"
    assert batch.TEMPLATES["sd15"] == batch.DEFAULT_TEMPLATE and batch.TEMPLATES["sdxl"].parent == pkg / "templates"


def test_workflows_copy_is_identical_and_generated():
    """workflows/batch/erase_template_api.json is a byte-for-byte copy that make_workflows.py writes."""
    assert WORKFLOWS_TEMPLATE.read_bytes() == PACKAGE_TEMPLATE.read_bytes()
    mw = pytest.importorskip("workflows.make_workflows")
    assert mw.BATCH_TEMPLATE == PACKAGE_TEMPLATE
    assert mw.render()[WORKFLOWS_TEMPLATE] == PACKAGE_TEMPLATE.read_text()


def test_pyproject_declares_the_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = cfg["tool"]["setuptools"]["package-data"]
    rel = PACKAGE_TEMPLATE.relative_to(ROOT / "bierasing").as_posix()
    assert any(fnmatch.fnmatch(rel, pat) for pat in data["bierasing"]), data
    extras = cfg["project"]["optional-dependencies"]["test"]
    assert {e.split(">")[0].split("=")[0] for e in extras} >= {"pytest", "peft"}
    assert any(d.startswith("accelerate") for d in cfg["project"]["dependencies"])  # quiet diffusers loads
    pins = {ln.split("==")[0] for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln}
    assert {"peft", "accelerate", "torch"} <= pins


def test_wheel_ships_the_template(tmp_path):
    """Build the wheel a plain `pip install .` would install and look inside (no network, no deps)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bierasing", src / "bierasing",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300, check=False)
    if r.returncode and "No module named" in r.stderr and "setuptools" in r.stderr:
        pytest.skip("setuptools is not installed in this environment (needed to build the wheel)")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("bierasing-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "bierasing/templates/erase_template_api.json" in names
        assert z.read("bierasing/templates/erase_template_api.json") == PACKAGE_TEMPLATE.read_bytes()
    assert "bierasing/batch.py" in names and "bierasing/io.py" in names and "bierasing/standins.py" in names


def test_io_and_batch_import_without_torch_or_numpy():
    """bierasing.batch uses bierasing.io's atomic writer and name check; neither may pull torch/numpy."""
    code = ("import sys, bierasing.io, bierasing.batch; "
            "assert not {'torch', 'numpy', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_requirements_txt_lists_the_package_dependencies():
    """ComfyUI installs requirements.txt, pip installs pyproject's list: the same packages, no torch."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    name = lambda spec: re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower()  # noqa: E731
    assert sorted(map(name, filter(None, reqs))) == sorted(map(name, deps))
    assert "torch" not in map(name, filter(None, reqs))
