"""The shipped workflows (workflows/*.json, UI format; workflows/api/*.json, API format), checked
against the node schemas without ComfyUI: node types, link types, required inputs, widget values
and positions, UI/API twins, and that they are exactly what workflows/make_workflows.py writes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflows import make_workflows as mw
from workflows.validate import CORE_SCHEMAS, FRONTEND_ONLY, load_schemas, ui_to_api, validate, widget_slots

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
RECORDED = ROOT.parent / "shared" / "comfyui" / "object_info.json"
NAMES = [f.__name__ for f in mw.WORKFLOWS]


@pytest.fixture(scope="module")
def schemas():
    return load_schemas()


def _load(name: str, api: bool = False) -> dict:
    return json.loads(((WF / "api") if api else ROOT / "example_workflows").joinpath(f"{name}.json").read_text())


def _slot(schemas, ntype: str, name: str) -> int:
    return [s for s, _ in widget_slots(schemas[ntype])].index(name)


def _ui_node(wf: dict, ntype: str, nth: int = 0) -> dict:
    return [n for n in wf["nodes"] if n["type"] == ntype][nth]


def _api_nodes(wf: dict, ntype: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in wf.items() if v["class_type"] == ntype]


# --- the shipped files ------------------------------------------------------------------------


def test_one_ui_and_one_api_file_per_workflow():
    assert sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json")) == sorted(NAMES)
    assert not list(WF.glob("*.json")), "ComfyUI lists workflows/*.json as templates too"
    assert sorted(p.stem for p in (WF / "api").glob("*.json")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_valid(name, schemas):
    wf = _load(name)
    assert wf["version"] == 0.4
    assert validate(wf, schemas) == []
    for n in wf["nodes"]:
        assert n["type"] in schemas or n["type"] in FRONTEND_ONLY
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "models/" in notes[0]["widgets_values"][0]
    assert wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == len(wf["links"])


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_valid(name, schemas):
    wf = _load(name, api=True)
    assert validate(wf, schemas) == []
    assert all(v["class_type"] not in FRONTEND_ONLY for v in wf.values())


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_describe_the_same_graph(name, schemas):
    assert ui_to_api(_load(name), schemas) == _load(name, api=True)


def test_generator_check_passes():
    r = subprocess.run([sys.executable, str(WF / "make_workflows.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_generator_check_notices_drift():
    files = mw.render()
    assert mw.check(files) == []
    path = next(iter(files))
    files[path] = files[path].replace('"fixed"', '"randomize"', 1) + " "
    assert mw.check(files) == [f"differs: {path.relative_to(ROOT)}"]


@pytest.mark.skipif(not RECORDED.is_file(), reason=f"recorded ComfyUI schemas not at {RECORDED}")
def test_vendored_core_schemas_match_recorded_object_info():
    recorded = json.loads(RECORDED.read_text())
    vendored = json.loads(CORE_SCHEMAS.read_text())
    assert vendored == {k: recorded[k] for k in vendored}
    full = load_schemas(RECORDED)
    for name in NAMES:
        assert validate(_load(name), full) == []
        assert validate(_load(name, api=True), full) == []


def test_widget_positions(schemas):
    # the frontend's layout (as in ComfyUI's own default workflow): seed, its control value, ...
    assert [s for s, _ in widget_slots(schemas["KSampler"])] == [
        "seed", "seed:control", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    # V3 nodes: required inputs then optional ones, each in declaration order (input_order)
    assert [s for s, _ in widget_slots(schemas["BiErasingSaveErasure"])] == ["filename", "report"]
    slots = [s for s, _ in widget_slots(schemas["BiErasingErase"])]
    assert slots[:3] == ["concept", "safe_concept", "method"]
    assert slots[slots.index("seed") + 1] == "seed:control" and slots[-2:] == ["resolution", "preview_every"]


# --- what each workflow does ------------------------------------------------------------------


def test_tiny_workflow_settings(schemas):
    wf = _load("erase_lora_ksampler_tiny", api=True)
    [(eid, er)] = _api_nodes(wf, "BiErasingErase")
    set_ = dict(method="esd-x", steps=4, batch_size=2, cache_size=2, xt_steps=3, resolution=64,
                concept="cat", safe_concept="dog")
    for k, v in er["inputs"].items():
        if not isinstance(v, list):
            inputs = schemas["BiErasingErase"]["input"]
            default = {**inputs["required"], **inputs.get("optional", {})}[k][1]["default"]
            assert v == set_.get(k, default), k
    [(_, save)] = _api_nodes(wf, "BiErasingSaveErasure")
    assert save["inputs"]["filename"] == "erasures/tiny_cat" and save["inputs"]["lora"] == [eid, 1]
    [(_, ks)] = _api_nodes(wf, "KSampler")
    assert (ks["inputs"]["steps"], ks["inputs"]["cfg"], ks["inputs"]["model"]) == (2, 5.0, [eid, 0])
    [(_, lat)] = _api_nodes(wf, "EmptyLatentImage")
    assert (lat["inputs"]["width"], lat["inputs"]["height"]) == (64, 64)
    [(_, ckpt)] = _api_nodes(wf, "CheckpointLoaderSimple")
    assert ckpt["inputs"]["ckpt_name"] == "tiny_sd15.safetensors"


@pytest.mark.parametrize("name", NAMES)
def test_every_template_runs_on_a_fresh_install(name):
    """No template reads a file that another workflow writes, and every file it names is one that
    'bierasing standins' provides (so each runs alone, in any order, right after install)."""
    from bierasing import comfy_standins as st

    wf = _load(name, api=True)
    assert not _api_nodes(wf, "LoraLoader") and not _api_nodes(wf, "BiErasingLoadErasure")
    provided = {"ckpt_name": {*st.CHECKPOINTS, st.SDXL_CHECKPOINT}, "clip_name": {st.VISION},
                "adapter_name": {st.IP_ADAPTER, st.SDXL_IP_ADAPTER},
                "folder": {st.EXEMPLARS.as_posix()}}
    if name in mw.REAL_WEIGHTS_ONLY:  # FLUX: the files its Read me note names, which users download
        provided = {"unet_name": {mw.FLUX_UNET}, "clip_name1": {mw.FLUX_CLIP_L}, "clip_name2": {mw.FLUX_T5},
                    "vae_name": {mw.FLUX_VAE}, "clip_name": {mw.SIGLIP}, "adapter_name": {mw.REDUX}}
        note = next(n for n in json.loads((mw.EXAMPLES / f"{name}.json").read_text())["nodes"] if n["type"] == "Note")
        assert all(f in note["widgets_values"][0] for files in provided.values() for f in files)
    for nid, node in wf.items():
        for key, value in node["inputs"].items():
            if key in provided and not isinstance(value, list):
                assert value in provided[key], f"{name} node {nid}: {key}={value!r} is not provided"
    erased = [nid for kind in ("BiErasingErase", "BiErasingEraseInstant") for nid, _ in _api_nodes(wf, kind)]
    samplers = [n for _, n in _api_nodes(wf, "KSampler")] + [n for _, n in _api_nodes(wf, "BiErasingCompareGrid")]
    assert all((n["inputs"].get("model") or n["inputs"].get("erased_model"))[0] in erased for n in samplers)


def test_compare_methods_share_inputs_and_name_outputs():
    wf = _load("compare_methods_sd15", api=True)
    erases = _api_nodes(wf, "BiErasingErase")
    assert sorted(e["inputs"]["method"] for _, e in erases) == ["bi-erasing", "esd-u", "esd-x"]
    strip = [{k: v for k, v in e["inputs"].items() if k != "method"} for _, e in erases]
    assert strip[0] == strip[1] == strip[2]
    for eid, e in erases:
        [(gid, _)] = [(k, g) for k, g in _api_nodes(wf, "BiErasingCompareGrid")
                      if g["inputs"]["erased_model"] == [eid, 0]]
        [(_, save)] = [(k, s) for k, s in _api_nodes(wf, "SaveImage") if s["inputs"]["images"] == [gid, 0]]
        assert e["inputs"]["method"] in save["inputs"]["filename_prefix"]


def test_masks_per_workflow():
    nud = _load("erase_nudity_sd15", api=True)
    for _, m in _api_nodes(nud, "BiErasingMaskFilter"):   # automatic masks
        assert "masks" not in m["inputs"] and all(k in m["inputs"] for k in ("model", "clip", "vae"))
        assert m["inputs"]["concept"] == "person"
    assert _api_nodes(_load("erase_artist_style_sd15", api=True), "BiErasingMaskFilter") == []
    obj = _load("erase_object_sd15", api=True)
    [(lid, ld)] = _api_nodes(obj, "BiErasingLoadExemplars")
    assert ld["inputs"]["folder"] == "exemplars/dog"
    assert [m["inputs"].get("masks") for _, m in _api_nodes(obj, "BiErasingMaskFilter")].count([lid, 1]) == 1


def test_evaluate_workflow():
    wf = _load("evaluate_erasure_sd15", api=True)
    [(eid, er)] = _api_nodes(wf, "BiErasingErase")
    assert (er["inputs"]["method"], er["inputs"]["concept"]) == ("bi-erasing", "nudity")
    [(gid, grid)] = _api_nodes(wf, "BiErasingCompareGrid")
    assert grid["inputs"]["erased_model"] == [eid, 0]
    evals = _api_nodes(wf, "BiErasingEvaluate")
    assert sorted(tuple(e["inputs"]["images"]) for _, e in evals) == [(gid, 1), (gid, 2)]
    assert all((e["inputs"]["detector"], e["inputs"]["threshold"]) == ("nudenet", 0.6) for _, e in evals)


# --- the validator rejects broken workflows ---------------------------------------------------


@pytest.fixture
def ui(schemas):
    wf = _load("erase_nudity_sd15")
    assert validate(wf, schemas) == []
    return copy.deepcopy(wf)


@pytest.fixture
def api(schemas):
    wf = _load("erase_nudity_sd15", api=True)
    assert validate(wf, schemas) == []
    return copy.deepcopy(wf)


def _has(errors: list[str], *parts: str) -> bool:
    return any(all(p in e for p in parts) for e in errors)


def test_rejects_wrong_link_type(ui, api, schemas):
    ks, ckpt = _ui_node(ui, "KSampler"), _ui_node(ui, "CheckpointLoaderSimple")
    lid = ks["inputs"][0]["link"]                      # KSampler.model
    row = next(r for r in ui["links"] if r[0] == lid)
    row[1:3], row[5] = [ckpt["id"], 1], "CLIP"
    assert _has(validate(ui, schemas), "CheckpointLoaderSimple output CLIP cannot feed KSampler input 'model'")
    [(kid, _)] = _api_nodes(api, "KSampler")
    [(cid, _)] = _api_nodes(api, "CheckpointLoaderSimple")
    api[kid]["inputs"]["model"] = [cid, 1]
    assert validate(api, schemas) == [
        f"node {kid} (KSampler): CheckpointLoaderSimple output CLIP cannot feed input 'model' of type MODEL"]


def test_rejects_out_of_range_and_mistyped_numbers(ui, api, schemas):
    er = _ui_node(ui, "BiErasingErase")
    er["widgets_values"][_slot(schemas, "BiErasingErase", "steps")] = 0
    assert validate(ui, schemas) == [f"node {er['id']} (BiErasingErase): steps=0 is below min 1"]
    [(eid, _)] = _api_nodes(api, "BiErasingErase")
    api[eid]["inputs"]["batch_size"] = 1000
    api[eid]["inputs"]["rank"] = 4.5
    errors = validate(api, schemas)
    assert _has(errors, "batch_size=1000 is above max 256") and _has(errors, "rank=4.5 is not an INT")


def test_rejects_unknown_node_type(ui, api, schemas):
    _ui_node(ui, "PreviewImage")["type"] = "NoSuchNode"
    assert _has(validate(ui, schemas), "unknown node type 'NoSuchNode'")
    [(pid, _)] = _api_nodes(api, "PreviewImage")
    api[pid]["class_type"] = "NoSuchNode"
    assert validate(api, schemas) == [f"node {pid} (NoSuchNode): unknown node type 'NoSuchNode'"]
    api[pid]["class_type"] = "Note"
    assert _has(validate(api, schemas), "frontend-only node type 'Note' is not allowed in API format")


def test_rejects_bad_combo_values(ui, api, schemas):
    ks = _ui_node(ui, "KSampler")
    ks["widgets_values"][_slot(schemas, "KSampler", "sampler_name")] = "nope"
    ks["widgets_values"][_slot(schemas, "KSampler", "seed:control")] = True  # the gallery-file bug
    errors = validate(ui, schemas)
    assert _has(errors, "sampler_name='nope' not in options") and _has(errors, "seed:control=True not one of")
    [(cid, _)] = _api_nodes(api, "CheckpointLoaderSimple")
    api[cid]["inputs"]["ckpt_name"] = "any_user_file.safetensors"   # model folders: any file name
    assert validate(api, schemas) == []
    api[cid]["inputs"]["ckpt_name"] = "model.ckpt"
    assert _has(validate(api, schemas), "ckpt_name='model.ckpt' is not a .safetensors file name")


def test_rejects_wrong_widget_count(ui, schemas):
    ks = _ui_node(ui, "KSampler")
    ks["widgets_values"] = [v for v in ks["widgets_values"] if v != "fixed"]  # control value forgotten
    assert _has(validate(ui, schemas), f"node {ks['id']} (KSampler): widgets_values has 6 values, expected 7")


def test_rejects_missing_required_input(ui, api, schemas):
    ks = _ui_node(ui, "KSampler")
    inp = next(i for i in ks["inputs"] if i["name"] == "positive")
    ui["links"] = [r for r in ui["links"] if r[0] != inp["link"]]
    for n in ui["nodes"]:
        for o in n["outputs"]:
            o["links"] = [x for x in o["links"] if x != inp["link"]]
    inp["link"] = None
    assert validate(ui, schemas) == [f"node {ks['id']} (KSampler): required input 'positive' is not connected"]
    [(kid, _)] = _api_nodes(api, "KSampler")
    del api[kid]["inputs"]["positive"]
    assert validate(api, schemas) == [f"node {kid} (KSampler): required input 'positive' is missing"]
