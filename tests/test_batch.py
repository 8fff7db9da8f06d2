"""Batch erasure (bierasing.batch): concept lists, prompt filling, resume, transports. No ComfyUI needed."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bierasing import batch
from bierasing.batch import (ComfyCli, HttpComfy, Row, RowResult, build_prompt, load_template, main,
                             parse_envelope, read_concepts, run_batch, summary_table)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "workflows" / "batch"
TEMPLATE = EXAMPLES / "erase_template_api.json"
HEADER = "name,concept,safe,method,steps,negative,positive,output,seed,lr,extra\n"


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def write(tmp_path, text, name="c.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def by_class(prompt, cls):
    return [nid for nid, n in prompt.items() if n["class_type"] == cls]


# ---- concept lists --------------------------------------------------------------------------------
def test_csv_and_toml_examples_read_the_same():
    csv_rows = read_concepts(EXAMPLES / "concepts_example.csv")
    toml_rows = read_concepts(EXAMPLES / "concepts_example.toml")
    assert [r.errors for r in csv_rows + toml_rows] == [[]] * 6
    assert [r.name for r in csv_rows] == ["nudity_bierasing", "van_gogh_esdx", "dog_to_cat"]
    assert [(r.name, r.settings()) for r in csv_rows] == [(r.name, r.settings()) for r in toml_rows]
    nud, gogh, dog = csv_rows
    assert (nud.concept, nud.safe, nud.method, nud.steps, nud.seed) == ("nudity", "clothed", "bi-erasing", 200, 0)
    # blank cells take the defaults
    assert (gogh.method, gogh.negative, gogh.positive, gogh.output) == ("esd-x", "generate", "generate",
                                                                        "erasures/van_gogh_esdx")
    assert (dog.negative, dog.positive, dog.steps, dog.extra) == ("exemplars/dog", "generate", 300,
                                                                  {"rank": 8, "batch_size": 4})


def test_defaults_and_default_name(tmp_path):
    rows = read_concepts(write(tmp_path, "concept,safe\nnudity,clothed\n\n# a comment row\nVan Gogh!,x\n"))
    assert [r.errors for r in rows] == [[], []]
    r = rows[0]
    assert (r.method, r.steps, r.negative, r.positive) == ("bi-erasing", 200, "generate", "generate")
    assert (r.name, r.output) == ("nudity_bierasing", "erasures/nudity_bierasing")
    assert rows[1].name == "van_gogh_bierasing"


def test_toml_defaults_table(tmp_path):
    p = write(tmp_path, '[defaults]\nsteps = 50\ncheckpoint = "x.safetensors"\n\n'
              '[[concept]]\nconcept = "dog"\nsafe = "cat"\n\n[[concept]]\nconcept = "cat"\nsafe = "dog"\nsteps = 9\n',
              "c.toml")
    a, b = read_concepts(p)
    assert (a.steps, a.checkpoint, b.steps, b.checkpoint) == (50, "x.safetensors", 9, "x.safetensors")


BAD_ROWS = [
    (",,clothed,bi-erasing,,,,,,,", "row 1 (line 2), column concept: empty"),
    ("a,nudity,clothed,esd,,,,,,,", "column method: unknown method 'esd' (one of bi-erasing, esd-x, esd-u, co-erasing, bi-instant)"),
    ("a,nudity,clothed,,abc,,,,,,", "column steps: 'abc' is not a positive whole number"),
    ("a,nudity,clothed,,0,,,,,,", "column steps: '0' is not a positive whole number"),
    ("a,nudity,clothed,,2.5,,,,,,", "column steps: '2.5' is not a positive whole number"),
    ("a,nudity,,bi-erasing,,,,,,,", "column safe: bi-erasing needs a safe alternative"),
    ("a,nudity,clothed,,,,,../../evil,,,", "column output: '../../evil' contains '..'"),
    ("a,nudity,clothed,,,,,/etc/evil,,,", "column output: '/etc/evil' is absolute"),
    ("a,nudity,clothed,,,,,C:\\x,,,", "column output: 'C:\\\\x' is absolute"),
    ("a/b,nudity,clothed,,,,,,,,", "column name: 'a/b' may only contain"),
    ("a,nudity,clothed,,,,,,-1,,", "column seed: '-1' is not a whole number"),
    ("a,nudity,clothed,,,,,,,0,", "column lr: '0' is not a learning rate"),
    ("a,nudity,clothed,,,,,,,,{rank: 8}", "column extra: not valid JSON"),
    ("a,nudity,clothed,,,,,,,,\"{\"\"steps\"\": 3}\"", "column extra: 'steps' has its own column"),
    ("a,nudity,clothed,,,,,,,,[1]", "column extra: must be a JSON object"),
    ("a,nudity,clothed,,,,,,,,,surplus", "column (extra cells): more cells than header columns"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_ROWS)])
def test_validation_messages(tmp_path, line, message):
    rows = read_concepts(write(tmp_path, HEADER + line + "\nok,dog,cat,,,,,,,,\n"))
    assert len(rows) == 2
    assert any(message in e for e in rows[0].errors), rows[0].errors
    assert all(e.startswith("row 1 (line 2), column ") for e in rows[0].errors)
    assert rows[1].errors == []  # a bad row does not spoil the others


def test_validation_duplicates_unknown_columns_and_toml_types(tmp_path):
    rows = read_concepts(write(tmp_path, "name,concept,safe,stepz\nx,dog,cat,\nx,cat,dog,\ny,a,b,5\n"))
    assert rows[0].errors == []
    assert rows[1].errors == ["row 2 (line 3), column name: duplicate name 'x' (also row 1); "
                              "give each row its own name"]
    assert "row 3 (line 4), column stepz: unknown column" in rows[2].errors[0]
    p = write(tmp_path, '[[concept]]\nconcept = "dog"\nsafe = "cat"\nsteps = true\n\n'
              '[[concept]]\nconcept = ""\nmethod = "esd-u"\nextra = { nope = 1 }\n', "c.toml")
    a, b = read_concepts(p)
    assert a.errors == ["row 1, column steps: True is not a positive whole number (1..100000)"]
    assert b.errors == ["row 2, column concept: empty; give the concept to erase, e.g. 'nudity'"]


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_concepts(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="'concept' column"):
        read_concepts(write(tmp_path, "name,safe\na,b\n"))
    with pytest.raises(ValueError, match=r"no \[\[concept\]\] tables"):
        read_concepts(write(tmp_path, "x = 1\n", "c.toml"))


# ---- prompts --------------------------------------------------------------------------------------
def test_template_matches_node_specs(template):
    """Every node of ours in the template uses the declared input names and sets every widget."""
    from nodes.spec import BY_ID

    widgets = {"STRING", "INT", "FLOAT", "BOOLEAN", "COMBO"}
    ours = [n for n in template.values() if n["class_type"].startswith("BiErasing")]
    assert {n["class_type"] for n in ours} == {"BiErasingGenerateExemplars", "BiErasingImageAdapterLoader",
                                               "BiErasingErase", "BiErasingSaveErasure"}
    rows = read_concepts(EXAMPLES / "concepts_example.csv")
    prompts = [template] + [build_prompt(template, r) for r in rows]
    for prompt in prompts:
        assert list(prompt) == sorted(prompt, key=int)
        for nid, node in prompt.items():
            spec = BY_ID.get(node["class_type"])
            for v in node["inputs"].values():
                if batch._is_link(v):
                    assert v[0] in prompt, (nid, v)
            if spec is None:
                continue
            names = {p.name for p in spec.inputs}
            assert set(node["inputs"]) <= names, (node["class_type"], set(node["inputs"]) - names)
            for p in spec.inputs:
                if p.type in widgets or not p.optional:
                    assert p.name in node["inputs"], (node["class_type"], p.name)


def test_template_and_filled_prompts_pass_the_workflow_validator(template):
    """The shared validator (workflows/validate.py: ComfyUI's own checks of links, types, limits, combos)."""
    v = pytest.importorskip("workflows.validate")
    schemas = v.load_schemas()
    assert v.validate(template, schemas) == []
    for row in read_concepts(EXAMPLES / "concepts_example.csv") + [
            Row(9, concept="dog", method="co-erasing", negative="dogs", count=4, name="co", output="e/co")]:
        assert v.validate(build_prompt(template, row), schemas) == [], row.name


def test_methods_match_the_library():
    from bierasing.erase.config import METHODS

    assert batch.METHODS == tuple(METHODS)


def test_build_prompt_generate_and_folder(template):
    pristine = copy.deepcopy(template)
    gen = Row(1, concept="nudity", safe="clothed", steps=50, seed=3, lr=2e-4, name="n",
              output="erasures/n", extra={"rank": 8}, checkpoint="my.safetensors")
    p = build_prompt(template, gen)
    erase = p[by_class(p, "BiErasingErase")[0]]["inputs"]
    assert (erase["concept"], erase["safe_concept"], erase["method"], erase["steps"], erase["seed"],
            erase["lr"], erase["rank"]) == ("nudity", "clothed", "bi-erasing", 50, 3, 2e-4, 8)
    assert p[by_class(p, "BiErasingSaveErasure")[0]]["inputs"]["filename"] == "erasures/n"
    assert p[by_class(p, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] == "my.safetensors"
    neg, pos = (p[erase[k][0]] for k in ("negative_images", "positive_images"))
    assert (neg["class_type"], neg["inputs"]["prompt"], neg["inputs"]["seed"]) == (
        "BiErasingGenerateExemplars", "a photo of nudity", 3)
    assert (pos["_meta"]["title"], pos["inputs"]["prompt"]) == ("positive exemplars", "a photo of clothed")

    folder = Row(2, concept="dog", safe="cat", negative="/data/dogs", positive="cats", count=5, name="d",
                 output="erasures/d")
    q = build_prompt(template, folder)
    erase = q[by_class(q, "BiErasingErase")[0]]["inputs"]
    for key, path in (("negative_images", "/data/dogs"), ("positive_images", "cats")):
        nid, slot = erase[key]
        assert nid == erase[key][0] and slot == 0 and nid in template  # same node id, output 0 = IMAGE
        assert template[nid]["class_type"] == "BiErasingGenerateExemplars"
        assert q[nid]["class_type"] == "BiErasingLoadExemplars"
        assert q[nid]["inputs"] == {"folder": path, "size": 512, "max_images": 5}
        assert q[nid]["_meta"]["title"] in ("negative exemplars", "positive exemplars")
    assert template == pristine  # the template is never modified


def test_build_prompt_drops_what_the_method_does_not_use(template):
    esd = build_prompt(template, Row(1, concept="Van Gogh", safe="", method="esd-x", name="g", output="e/g"))
    assert sorted(n["class_type"] for n in esd.values()) == ["BiErasingErase", "BiErasingSaveErasure",
                                                             "CheckpointLoaderSimple"]
    erase = esd[by_class(esd, "BiErasingErase")[0]]["inputs"]
    assert not {"negative_images", "positive_images", "clip_vision", "image_adapter"} & set(erase)
    co = build_prompt(template, Row(1, concept="dog", method="co-erasing", name="c", output="e/c"))
    erase = co[by_class(co, "BiErasingErase")[0]]["inputs"]
    assert "negative_images" in erase and "positive_images" not in erase and "clip_vision" in erase
    assert len(by_class(co, "BiErasingGenerateExemplars")) == 1


def test_build_prompt_errors(template):
    row = Row(1, concept="dog", safe="cat", name="d", output="e/d")
    with pytest.raises(ValueError, match="'nope' is not an input of BiErasingErase"):
        build_prompt(template, Row(1, concept="dog", safe="cat", name="d", output="e/d", extra={"nope": 1}))
    with pytest.raises(ValueError, match="'model' is a connection"):
        build_prompt(template, Row(1, concept="dog", safe="cat", name="d", output="e/d", extra={"model": 1}))
    broken = copy.deepcopy(template)
    next(n for n in broken.values() if n["_meta"]["title"] == "positive exemplars")["_meta"]["title"] = "other"
    with pytest.raises(ValueError, match="no BiErasingGenerateExemplars or BiErasingLoadExemplars node titled "
                                         "'positive exemplars'"):
        build_prompt(broken, row)
    with pytest.raises(ValueError, match="UI workflow"):
        build_prompt({"nodes": [], "links": []}, row)


# ---- resume ---------------------------------------------------------------------------------------
class RecordingTransport:
    """Test double of the transport interface: records prompts, fails the rows whose output is in ``fail``."""

    def __init__(self, fail=(), explode=()):
        self.calls, self.fail, self.explode = [], set(fail), set(explode)

    def run(self, prompt, timeout):
        out = next(n for n in prompt.values() if n["class_type"] == "BiErasingSaveErasure")["inputs"]["filename"]
        self.calls.append(out)
        if out in self.explode:
            raise RuntimeError("transport broke")
        if out in self.fail:
            return RowResult("failed", "pid-" + out, error="BiErasingErase (node 6): out of memory", seconds=0.5)
        return RowResult("done", "pid-" + out, {"7": {"text": [f"saved {out}.safetensors in models/loras (8 tensors)"]}},
                         seconds=1.25)


def test_resume_skips_done_and_reruns_failed_and_changed(tmp_path, template):
    src = HEADER + "a,dog,cat,,10,,,,,,\nb,cat,dog,,10,,,,,,\nc,car,bike,,10,,,,,,\n,,,,,,,,,,x\n"
    rows = read_concepts(write(tmp_path, src))
    state = tmp_path / "run" / "state.json"
    lines = []
    t1 = RecordingTransport(fail={"erasures/b"})
    r1 = run_batch(rows, template, t1, state, progress=lines.append)
    assert [r.status for r in r1] == ["done", "failed", "done", "failed"]
    assert t1.calls == ["erasures/a", "erasures/b", "erasures/c"]  # the invalid row is never sent
    assert r1[0].output == "models/loras/erasures/a.safetensors"
    assert "out of memory" in r1[1].error and "column concept: empty" in r1[3].error
    # invalid rows are reported before anything is queued
    assert lines[0].startswith("[4/4] row4: invalid row, not run: row 4 (line 5), column concept: empty")
    assert lines[1] == "[1/4] a: running..."
    assert lines[2] == "[1/4] a: done in 1.2 s -> models/loras/erasures/a.safetensors"
    assert lines[4].startswith("[2/4] b: FAILED after 0.5 s: BiErasingErase (node 6): out of memory")
    saved = json.loads(state.read_text())
    assert {k: v["status"] for k, v in saved["rows"].items()} == {"a": "done", "b": "failed", "c": "done"}

    lines.clear()
    t2 = RecordingTransport()
    r2 = run_batch(rows, template, t2, state, progress=lines.append)
    assert t2.calls == ["erasures/b"]
    assert [r.status for r in r2] == ["skipped", "done", "skipped", "failed"]
    assert "[1/4] a: skipped (done)" in lines and "[3/4] c: skipped (done)" in lines
    assert r2[0].output == "models/loras/erasures/a.safetensors" and r2[0].prompt_id == "pid-erasures/a"

    changed = read_concepts(write(tmp_path, src.replace("c,car,bike,,10", "c,car,bike,,20")))
    t3 = RecordingTransport()
    run_batch(changed, template, t3, state, progress=lines.append)
    assert t3.calls == ["erasures/c"]  # only the row whose settings changed
    t4 = RecordingTransport()
    run_batch(changed, template, t4, state, progress=lines.append, force=True)
    assert t4.calls == ["erasures/a", "erasures/b", "erasures/c"]


def test_a_transport_exception_fails_only_its_row(tmp_path, template):
    rows = read_concepts(write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nb,cat,dog,,,,,,,,\n"))
    t = RecordingTransport(explode={"erasures/a"})
    res = run_batch(rows, template, t, tmp_path / "s.json", progress=lambda s: None)
    assert [r.status for r in res] == ["failed", "done"]
    assert res[0].error == "RuntimeError: transport broke"


def test_state_is_written_atomically(tmp_path, template, monkeypatch):
    rows = read_concepts(write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nb,cat,dog,,,,,,,,\n"))
    state = tmp_path / "s.json"
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        assert Path(src).parent == Path(dst).parent and Path(src) != Path(dst)
        real_replace(src, dst)

    monkeypatch.setattr(batch.os, "replace", spy)
    run_batch(rows, template, RecordingTransport(), state, progress=lambda s: None)
    assert [d for _, d in replaced] == [state, state]  # once after every row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "s.json"]  # no temp files left

    before = state.read_text()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the write fails after the temp file has data
    with pytest.raises(OSError, match="the disk is full"):
        batch.save_state(state, {"version": 1, "rows": {}})
    assert state.read_text() == before  # a failed write leaves the old state intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "s.json"]


def test_state_and_summary_use_the_io_helpers(tmp_path, monkeypatch):
    """One atomic writer for the whole library: batch goes through bierasing.io, not its own copy."""
    from bierasing import io
    calls = []
    real = io.atomic_write_bytes
    monkeypatch.setattr(io, "atomic_write_bytes", lambda path, data: (calls.append(Path(path)), real(path, data)))
    batch.save_state(tmp_path / "s.json", {"version": 1, "rows": {}})
    assert calls == [tmp_path / "s.json"]
    assert json.loads((tmp_path / "s.json").read_text()) == {"version": 1, "rows": {}}
    assert "mkstemp" not in Path(batch.__file__).read_text()  # no private copy of the writer


def test_run_batch_logs_progress_by_default(tmp_path, template, caplog):
    rows = read_concepts(write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\n"))
    with caplog.at_level(logging.INFO, logger="bierasing.batch"):
        run_batch(rows, template, RecordingTransport(), tmp_path / "s.json")
    assert [r.name for r in caplog.records] == ["bierasing.batch"] * 2
    assert caplog.messages[0] == "[1/1] a: running..."
    assert caplog.messages[1].startswith("[1/1] a: done in ")
    assert caplog.messages[1].endswith(" -> models/loras/erasures/a.safetensors")


def test_output_names_stay_inside_models_loras(tmp_path):
    lines = ["a,dog,cat,,,,,erasures/../x,,,", "b,dog,cat,,,,,../x,,,", "c,dog,cat,,,,,\\\\server\\x,,,",
             "d,dog,cat,,,,,erasures\\x,,,", "e,dog,cat,,,,,erasures/a:b,,,"]
    rows = read_concepts(write(tmp_path, HEADER + "\n".join(lines) + "\n"))
    assert rows[0].errors == [] and rows[0].output == "erasures/../x"  # '..' that stays inside is fine
    assert "contains '..' that leads out of models/loras" in rows[1].errors[0]
    assert "is absolute" in rows[2].errors[0]
    assert "contains a backslash; use / to put the file in a subfolder" in rows[3].errors[0]
    assert "contains a character file names cannot hold" in rows[4].errors[0]


def test_summary_table():
    results = [
        RowResult("done", "p1", seconds=12.34, name="a", concept="nudity", method="bi-erasing",
                  output="models/loras/erasures/a.safetensors"),
        RowResult("skipped", "p0", seconds=3.0, name="b", concept="Van Gogh", method="esd-x",
                  output="models/loras/erasures/b.safetensors"),
        RowResult("failed", error="node 6 (BiErasingErase): bad | value\nsecond line", seconds=0.5, name="c",
                  concept="dog", method="co-erasing", output="models/loras/erasures/c.safetensors"),
    ]
    table = summary_table(results)
    lines = table.splitlines()
    assert lines[0] == "| # | row | concept | method | status | seconds | output / error |"
    assert lines[2] == "| 1 | a | nudity | bi-erasing | done | 12.3 | models/loras/erasures/a.safetensors |"
    assert lines[3] == "| 2 | b | Van Gogh | esd-x | skipped (done) | 3.0 | models/loras/erasures/b.safetensors |"
    assert lines[4] == "| 3 | c | dog | co-erasing | failed | 0.5 | node 6 (BiErasingErase): bad \\| value second line |"
    assert lines[-1] == "1 done, 1 skipped (done before), 1 failed"


# ---- HTTP transport against a small local server ----------------------------------------------------
class FakeComfy(BaseHTTPRequestHandler):
    """/prompt and /history with canned ComfyUI answers, chosen by the Save Erasure file name."""

    log: list = []
    prompts: dict = {}
    polls: dict = {}

    def log_message(self, *a):
        pass

    def _send(self, code, body):
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self.log.append(("GET", self.path, None))
        if self.path == "/system_stats":
            return self._send(200, {"system": {}})
        pid = self.path.rsplit("/", 1)[-1]
        out = self.prompts.get(pid)
        self.polls[pid] = self.polls.get(pid, 0) + 1
        if out is None or self.polls[pid] < 2 or "slow" in out:
            return self._send(200, {})  # still queued / running
        if "boom" in out:
            status = {"status_str": "error", "completed": False, "messages": [
                ["execution_start", {"prompt_id": pid}],
                ["execution_error", {"prompt_id": pid, "node_id": "6", "node_type": "BiErasingErase",
                                     "exception_type": "ValueError", "exception_message": "concept is empty\n"}]]}
            return self._send(200, {pid: {"prompt": [], "outputs": {}, "status": status}})
        ui = {"7": {"text": [f"saved {out}.safetensors in models/loras (8 tensors)"]}}
        return self._send(200, {pid: {"prompt": [], "outputs": ui,
                                      "status": {"status_str": "success", "completed": True, "messages": []}}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.log.append(("POST", self.path, body))
        if self.path != "/prompt":
            return self._send(200, {})
        out = next(n for n in body["prompt"].values() if n["class_type"] == "BiErasingSaveErasure")["inputs"]["filename"]
        if "bad" in out:
            return self._send(400, {
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {"1": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                  "details": "ckpt_name: 'nope.safetensors' not in []",
                                                  "extra_info": {}}],
                                      "dependent_outputs": ["7"], "class_type": "CheckpointLoaderSimple"}}})
        pid = f"pid-{len(self.prompts)}"
        self.prompts[pid] = out
        return self._send(200, {"prompt_id": pid, "number": len(self.prompts), "node_errors": {}})


@pytest.fixture
def server():
    FakeComfy.log, FakeComfy.prompts, FakeComfy.polls = [], {}, {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeComfy)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _prompt(template, out):
    return build_prompt(template, Row(1, concept="dog", safe="cat", name="x", output=out))


def test_http_success(server, template):
    http = HttpComfy("127.0.0.1", server.server_port, poll=0.01, client_id="cid")
    res = http.run(_prompt(template, "erasures/ok"), timeout=10)
    assert (res.status, res.prompt_id, res.error) == ("done", "pid-0", "")
    assert res.outputs["7"]["text"][0].startswith("saved erasures/ok.safetensors")
    method, path, body = FakeComfy.log[0]
    assert (method, path, body["client_id"]) == ("POST", "/prompt", "cid")
    assert body["prompt"]["7"]["inputs"]["filename"] == "erasures/ok"
    assert [p for m, p, _ in FakeComfy.log[1:]] == ["/history/pid-0", "/history/pid-0"]


def test_http_400_node_errors_and_execution_error(server, template):
    http = HttpComfy("127.0.0.1", server.server_port, poll=0.01)
    res = http.run(_prompt(template, "erasures/bad"), timeout=10)
    assert res.status == "failed" and res.prompt_id is None
    assert res.error == ("Prompt outputs failed validation; node 1 (CheckpointLoaderSimple): Value not in list: "
                         "ckpt_name: 'nope.safetensors' not in []")
    res = http.run(_prompt(template, "erasures/boom"), timeout=10)
    assert (res.status, res.error) == ("failed", "BiErasingErase (node 6): ValueError: concept is empty")


def test_http_timeout_cancels_the_prompt(server, template):
    http = HttpComfy("127.0.0.1", server.server_port, poll=0.01)
    res = http.run(_prompt(template, "erasures/slow"), timeout=0.2)
    assert res.status == "failed" and "timed out after 0.2 s" in res.error
    posts = [(p, b) for m, p, b in FakeComfy.log if m == "POST" and p != "/prompt"]
    assert posts == [("/queue", {"delete": [res.prompt_id]}), ("/interrupt", {"prompt_id": res.prompt_id})]
    assert HttpComfy("127.0.0.1", 1, request_timeout=1).ping().startswith("cannot reach ComfyUI")


def test_main_end_to_end_over_http(server, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "HttpComfy", lambda host, port: HttpComfy(host, port, poll=0.01))
    concepts = write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nbad,cat,dog,,,,,,,,\nc,car,,esd-u,,,,,,,\n")
    argv = [str(concepts), "--server", f"127.0.0.1:{server.server_port}", "--state", str(tmp_path / "st.json")]
    assert main(argv) == 1
    summary = (tmp_path / "batch_summary.md").read_text()
    assert "| 1 | a | dog | bi-erasing | done |" in summary
    assert "| 2 | bad | cat | bi-erasing | failed |" in summary and "Value not in list" in summary
    assert "| 3 | c | car | esd-u | done |" in summary
    n_posts = sum(1 for m, p, _ in FakeComfy.log if p == "/prompt")
    assert main(argv) == 1  # the failed row runs again, the finished ones are skipped
    assert sum(1 for m, p, _ in FakeComfy.log if p == "/prompt") == n_posts + 1
    assert "skipped (done)" in (tmp_path / "batch_summary.md").read_text()


def test_main_dry_run_and_no_server(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(EXAMPLES / "concepts_example.csv"), "--dry-run"]) == 0
    default = tmp_path / "outputs" / "batch" / "concepts_example"
    assert sorted(p.name for p in (default / "prompts").iterdir()) == ["dog_to_cat.json", "nudity_bierasing.json",
                                                                       "van_gogh_esdx.json"]
    concepts = write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nb,dog,cat,,,/abs/dogs,,,,,\n")
    out = tmp_path / "prompts"
    assert main([str(concepts), "--dry-run", "--prompts-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]
    b = json.loads((out / "b.json").read_text())
    assert "BiErasingLoadExemplars" in {n["class_type"] for n in b.values()}
    assert not list(tmp_path.rglob("state.json"))  # a dry run contacts nothing and records nothing
    bad = write(tmp_path, HEADER + "a,dog,cat,esd,,,,,,,\n", "bad.csv")
    assert main([str(bad), "--dry-run", "--prompts-dir", str(out)]) == 1
    assert "column method: unknown method 'esd'" in capsys.readouterr().out
    assert main([str(concepts), "--server", "127.0.0.1:1"]) == 2
    assert "cannot reach ComfyUI at http://127.0.0.1:1" in capsys.readouterr().err


# ---- several servers ------------------------------------------------------------------------------
def _fake_server(delay_polls: int):
    """A FakeComfy with its own log and prompts, whose prompts take ``delay_polls`` polls to finish."""
    cls = type("OneComfy", (FakeComfy,), {"log": [], "prompts": {}, "polls": {}})
    real_get = FakeComfy.do_GET

    def do_GET(self):
        pid = self.path.rsplit("/", 1)[-1]
        if pid in self.prompts and self.polls.get(pid, 0) < delay_polls:
            self.polls[pid] = self.polls.get(pid, 0) + 1
            self.log.append(("GET", self.path, None))
            return self._send(200, {})
        return real_get(self)

    cls.do_GET = do_GET
    srv = ThreadingHTTPServer(("127.0.0.1", 0), cls)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv, cls


def test_rows_go_to_idle_servers_each_once(tmp_path, template):
    fast, slow = _fake_server(2), _fake_server(25)  # the slow server takes ~10x longer per row
    try:
        names = [f"r{i}" for i in range(8)]
        rows = read_concepts(write(tmp_path, HEADER + "".join(f"{n},dog,cat,,,,,,,,\n" for n in names)))
        transports = [HttpComfy("127.0.0.1", srv.server_port, poll=0.01) for srv, _ in (fast, slow)]
        state, lines = tmp_path / "s.json", []
        res = run_batch(rows, template, transports, state, progress=lines.append)
        assert [r.status for r in res] == ["done"] * 8
        ran = {name: [out for out in cls.prompts.values()] for name, (srv, cls) in
               zip((t.name for t in transports), (fast, slow))}
        everything = sorted(o for outs in ran.values() for o in outs)
        assert everything == sorted(f"erasures/{n}" for n in names)  # each row ran once, somewhere
        fast_name, slow_name = transports[0].name, transports[1].name
        assert 1 <= len(ran[slow_name]) < len(ran[fast_name])  # both worked; the idle one took more
        assert {r.server for r in res} == {fast_name, slow_name}
        assert all(f"erasures/{r.name}" in ran[r.server] for r in res)  # the named server ran the row
        assert any(line.endswith(f"running on {slow_name}...") for line in lines)
        saved = json.loads(state.read_text())["rows"]
        assert {k: v["server"] for k, v in saved.items()} == {r.name: r.server for r in res}
        table = summary_table(res)
        assert "| # | row | concept | method | status | server | seconds |" in table
        assert f"| done | {slow_name} |" in table

        again = run_batch(rows, template, transports, state, progress=lines.append)  # resumable
        assert [r.status for r in again] == ["skipped"] * 8
        assert sorted(o for _, cls in (fast, slow) for o in cls.prompts.values()) == everything
    finally:
        for srv, _ in (fast, slow):
            srv.shutdown()
            srv.server_close()


def test_an_unreachable_server_hands_its_rows_to_the_others(tmp_path, template):
    live, cls = _fake_server(1)
    try:
        rows = read_concepts(write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nb,cat,dog,,,,,,,,\nc,car,bike,,,,,,,,\n"))
        dead = HttpComfy("127.0.0.1", 1, poll=0.01, request_timeout=1)
        lines = []
        res = run_batch(rows, template, [dead, HttpComfy("127.0.0.1", live.server_port, poll=0.01)],
                        tmp_path / "s.json", progress=lines.append)
        assert [r.status for r in res] == ["done"] * 3
        assert sorted(cls.prompts.values()) == ["erasures/a", "erasures/b", "erasures/c"]
        assert any("127.0.0.1:1 is unreachable" in line and "go to the other servers" in line for line in lines)
    finally:
        live.shutdown()
        live.server_close()
    alone = run_batch(rows, template, [HttpComfy("127.0.0.1", 1, poll=0.01, request_timeout=1)],
                      tmp_path / "t.json", progress=lambda s: None)
    assert [r.status for r in alone] == ["failed"] * 3
    assert all(r.error.startswith("cannot queue on http://127.0.0.1:1") for r in alone)


def test_main_takes_several_servers(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch, "HttpComfy", lambda host, port: HttpComfy(host, port, poll=0.01))
    concepts = write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\nc,car,,esd-u,,,,,,,\n")
    argv = [str(concepts), "--server", f"127.0.0.1:{server.server_port}", "--server", "127.0.0.1:1",
            "--state", str(tmp_path / "st.json")]
    assert main(argv) == 0  # the unreachable one is skipped with a message; the other runs every row
    captured = capsys.readouterr()
    assert "cannot reach ComfyUI at http://127.0.0.1:1" in captured.err and "(skipping it)" in captured.err
    assert f"-> ComfyUI at 127.0.0.1:{server.server_port} via http" in captured.out


# ---- comfy-cli transport ----------------------------------------------------------------------------
FAKE_COMFY = r'''#!{python}
import json, sys
args = sys.argv[1:]
assert args[:2] == ["--skip-prompt", "run"], args
wf = json.load(open(args[args.index("--workflow") + 1]))
out = next(n for n in wf.values() if n["class_type"] == "BiErasingSaveErasure")["inputs"]["filename"]
events = {{"schema": "event/1", "type": "queued", "prompt_id": "p-42"}}
print(json.dumps(events))
if "bad" in out:
    print(json.dumps({{"type": "envelope", "ok": False, "data": None, "error": {{"code": "execution_error",
          "message": "BiErasingErase failed", "details": {{"exception_message": "out of memory"}}}}}}))
    sys.exit(1)
print(json.dumps({{"type": "envelope", "ok": True, "data": {{"status": "completed", "prompt_id": "p-42",
      "outputs": [], "outputs_by_node": {{}}, "host": args[args.index("--host") + 1],
      "port": args[args.index("--port") + 1], "timeout": args[args.index("--timeout") + 1]}}, "error": None}}))
'''


def test_comfy_cli_transport(tmp_path, template):
    exe = tmp_path / "comfy"
    exe.write_text(FAKE_COMFY.format(python=sys.executable))
    exe.chmod(0o755)
    cli = ComfyCli("127.0.0.1", 8190, comfy_bin=str(exe))
    assert cli.command("w.json", 30)[1:] == ["--skip-prompt", "run", "--workflow", "w.json", "--wait", "--json",
                                              "--host", "127.0.0.1", "--port", "8190", "--timeout", "30"]
    ok = cli.run(_prompt(template, "erasures/ok"), timeout=30)
    assert (ok.status, ok.prompt_id, ok.error) == ("done", "p-42", "")
    bad = cli.run(_prompt(template, "erasures/bad"), timeout=30)
    assert (bad.status, bad.prompt_id) == ("failed", "p-42")
    assert bad.error == "[execution_error] BiErasingErase failed: out of memory"
    missing = ComfyCli(comfy_bin=str(tmp_path / "nope")).run({}, timeout=5)
    assert missing.status == "failed" and "comfy-cli not found" in missing.error


def test_parse_envelope():
    assert parse_envelope('{"ok": true, "data": {"status": "completed"}}')["ok"] is True
    ndjson = '{"type": "executing", "prompt_id": "p"}\nnoise\n{"type": "envelope", "ok": false, "error": {}}\n'
    assert parse_envelope(ndjson) == {"type": "envelope", "ok": False, "error": {}}
    assert parse_envelope("Traceback ...") is None


def test_import_does_not_pull_torch_or_comfyui():
    code = ("import sys, bierasing.batch; "
            "assert not {'torch', 'comfy', 'nodes'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_shipped_sdxl_template(tmp_path):
    xl = load_template("sdxl")
    by_type = {n["class_type"]: n["inputs"] for n in xl.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert by_type["BiErasingImageAdapterLoader"]["adapter_name"] == "ip-adapter_sdxl_vit-h.safetensors"
    assert by_type["BiErasingErase"]["resolution"] == 1024 and by_type["BiErasingGenerateExemplars"]["resolution"] == 1024
    sd15 = load_template("sd15")
    assert {k: n["class_type"] for k, n in xl.items()} == {k: n["class_type"] for k, n in sd15.items()}
    concepts = write(tmp_path, HEADER + "a,dog,cat,,,,,,,,\n")
    out = tmp_path / "prompts"
    assert main([str(concepts), "--template", "sdxl", "--dry-run", "--prompts-dir", str(out)]) == 0
    prompt = json.loads((out / "a.json").read_text())
    assert {n["inputs"].get("ckpt_name") for n in prompt.values()} >= {"sd_xl_base_1.0.safetensors"}
    with pytest.raises(ValueError, match="give --template sd15, sdxl, flux or a PATH"):
        load_template("sd3")


def test_shipped_flux_template_and_its_checkpoint_column(tmp_path):
    fl = load_template("flux")
    by_type = {n["class_type"]: n["inputs"] for n in fl.values()}
    assert "CheckpointLoaderSimple" not in by_type and by_type["UNETLoader"]["unet_name"] == "flux1-dev.safetensors"
    assert by_type["DualCLIPLoader"]["type"] == "flux" and by_type["CLIPVisionLoader"]["clip_name"].startswith("sigclip")
    assert by_type["BiErasingImageAdapterLoader"]["adapter_name"] == "flux1-redux-dev.safetensors"
    assert by_type["BiErasingGenerateExemplars"]["cfg"] == 1.0
    ids = {n["class_type"]: k for k, n in fl.items()}
    assert by_type["BiErasingErase"]["clip"] == [ids["DualCLIPLoader"], 0]
    assert by_type["BiErasingErase"]["vae"] == [ids["VAELoader"], 0]
    concepts = write(tmp_path, "name,concept,safe,checkpoint\na,dog,cat,flux1-schnell.safetensors\n")
    out = tmp_path / "prompts"
    assert main([str(concepts), "--template", "flux", "--dry-run", "--prompts-dir", str(out)]) == 0
    prompt = json.loads((out / "a.json").read_text())
    [loader] = [n for n in prompt.values() if n["class_type"] == "UNETLoader"]
    assert loader["inputs"]["unet_name"] == "flux1-schnell.safetensors"
