"""Node declarations, checked without ComfyUI (its comfy_api is not on PyPI)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path

import pytest

from bierasing.erase.config import EraseConfig
from bierasing.erase.masks import MaskFilter

OBJECT_INFO = Path(__file__).resolve().parents[2] / "shared" / "comfyui" / "object_info.json"


@pytest.fixture(scope="module")
def spec():
    from nodes import spec

    return spec


@pytest.fixture(scope="module")
def core_types():
    if not OBJECT_INFO.is_file():
        pytest.skip(f"recorded ComfyUI schemas not found at {OBJECT_INFO}")
    info = json.loads(OBJECT_INFO.read_text())
    types = set()
    for node in info.values():
        for group in ("required", "optional"):
            for entry in node["input"].get(group, {}).values():
                if isinstance(entry[0], str):
                    types.add(entry[0])
        types.update(t for t in node["output"] if isinstance(t, str))
    return types, info


def test_declarations_import_no_comfyui(spec):
    assert not any(m == "comfy" or m.startswith(("comfy.", "comfy_api")) for m in sys.modules)


def test_ids_prefixed_unique_and_tooltips_everywhere(spec):
    ids = [s.node_id for s in spec.SPECS]
    assert len(ids) == len(set(ids)) == 11
    for s in spec.SPECS:
        assert s.node_id.startswith("BiErasing") and s.description
        names = [p.name for p in s.inputs]
        assert len(names) == len(set(names)), s.node_id
        for p in s.inputs + s.outputs:
            assert p.tooltip.strip(), f"{s.node_id}.{p.name} has no tooltip"


def test_socket_types_exist_in_comfyui(spec, core_types):
    types, _ = core_types
    own = {spec.IMAGE_ADAPTER}
    for s in spec.SPECS:
        for p in s.inputs + s.outputs:
            assert p.type in types | own, f"{s.node_id}.{p.name}: unknown socket type {p.type}"


def test_erase_widgets_are_the_library_settings(spec):
    erase = spec.BY_ID["BiErasingErase"]
    ports = {p.name: p for p in erase.inputs}
    for f in dataclasses.fields(EraseConfig):
        if f.name == "checkpoint_every":
            assert f.name not in ports  # ComfyUI caches finished nodes; a cancelled run restarts
            continue
        p = ports[f.name]
        assert p.default == f.default and p.tooltip == f.metadata["help"]
        if "choices" in f.metadata:
            assert p.type == "COMBO" and p.options == f.metadata["choices"]
        elif "min" in f.metadata:
            assert (p.min, p.max) == (f.metadata["min"], f.metadata["max"])
    mask = {p.name: p for p in spec.BY_ID["BiErasingMaskFilter"].inputs}
    for f in dataclasses.fields(MaskFilter):
        assert mask[f.name].default == f.default and mask[f.name].min == f.metadata["min"]


def test_every_input_reaches_its_implementation(spec):
    impl_src = (Path(spec.__file__).parent / "impl.py").read_text()
    build_src = (Path(spec.__file__).parent / "build.py").read_text()
    import ast

    funcs = {n.name: n for n in ast.parse(impl_src).body if isinstance(n, ast.FunctionDef)}
    for s in spec.SPECS:
        fname = next(line.split("impl.")[1].rstrip(",") for line in build_src.splitlines()
                     if f'"{s.key}": impl.' in line)
        f = funcs[fname]
        params = {a.arg for a in f.args.args + f.args.kwonlyargs}
        for p in s.inputs:
            assert p.name in params or f.args.kwarg is not None, f"{s.node_id}.{p.name} not accepted by {fname}"
        required = [a.arg for a in f.args.args[:len(f.args.args) - len(f.args.defaults)]]
        for r in required:
            assert r in {p.name for p in s.inputs}, f"{fname} needs {r}, which {s.node_id} does not declare"


def test_object_info_shape_matches_comfyui(spec, core_types):
    _, core = core_types
    ours = spec.all_object_info()
    ref = core["LoraLoader"]
    for nid, entry in ours.items():
        assert set(ref) - {"api_node", "deprecated", "experimental"} <= set(entry), nid
        assert len(entry["output"]) == len(entry["output_name"])
        for group, names in entry["input_order"].items():
            assert list(entry["input"][group]) == names


def test_widget_defaults_fit_their_limits(spec):
    for s in spec.SPECS:
        for p in s.inputs:
            if p.type in ("INT", "FLOAT") and p.default is not None:
                assert p.min <= p.default <= p.max, f"{s.node_id}.{p.name}"
            if p.type == "COMBO" and p.default is not None:
                assert p.default in p.options, f"{s.node_id}.{p.name}"


def test_impl_has_no_erasure_logic(spec):
    # nodes only translate types: no optimiser, loss or sampling loop of their own
    src = inspect.getsource(__import__("nodes.spec", fromlist=["x"]))
    impl = (Path(spec.__file__).parent / "impl.py").read_text()
    for banned in ("torch.optim", ".backward(", "mse_loss"):
        assert banned not in impl and banned not in src
