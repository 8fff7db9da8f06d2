"""Check ComfyUI workflows (UI or API format) against node schemas, without ComfyUI.

``validate(workflow, schemas)`` returns a list of problems (empty = valid). ``schemas`` maps a node
type to its ``/object_info`` entry (``input``, ``input_order``, ``output``, ``output_name``);
:func:`load_schemas` gives ComfyUI's core nodes used here (recorded from ComfyUI 0.3.64) plus this
pack's nodes from ``nodes/spec.py``. The checks follow ComfyUI's own ``validate_inputs`` (types of
links, required inputs, INT/FLOAT limits, COMBO membership) and the frontend's positional
``widgets_values`` (inputs sorted by ``input_order``: required, then optional; a
``control_after_generate`` value after every seed widget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORE_SCHEMAS = HERE / "schemas" / "core_object_info.json"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# COMBOs that list the files of a user's model folders: any *.safetensors name is accepted
MODEL_FILE_INPUTS = frozenset({"ckpt_name", "lora_name", "clip_name", "adapter_name", "erasure_name",
                               "vae_name", "unet_name", "control_net_name", "clip_name1", "clip_name2",
                               "style_model_name"})
# COMBOs that list the user's folders under ComfyUI's input folder: any relative path is accepted
INPUT_FOLDER_INPUTS = frozenset({"folder"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote"})  # UI-only nodes: no schema, dropped from API format


@dataclass
class InputDef:
    name: str
    type: str                      # "COMBO" for option lists
    required: bool
    opts: dict = field(default_factory=dict)
    options: list | None = None    # COMBO options

    @property
    def widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput", False)

    @property
    def control_after_generate(self) -> bool:
        return self.widget and bool(self.opts.get("control_after_generate", False))


def input_defs(entry: dict) -> list[InputDef]:
    """A node's inputs in the frontend's order: required then optional, each by ``input_order``."""
    out = []
    for section in ("required", "optional"):
        specs = entry.get("input", {}).get(section, {}) or {}
        order = (entry.get("input_order") or {}).get(section) or list(specs)
        for name in order:
            if name not in specs:
                continue
            spec = specs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                out.append(InputDef(name, "COMBO", section == "required", opts, list(kind)))
            elif kind == "COMBO":
                out.append(InputDef(name, "COMBO", section == "required", opts, list(opts.get("options", []))))
            else:
                out.append(InputDef(name, kind, section == "required", opts))
    return out


def widget_slots(entry: dict) -> list[tuple[str, InputDef]]:
    """Positional layout of ``widgets_values``: (name, def) per widget, plus ("<name>:control", def)
    after every widget with ``control_after_generate``."""
    slots = []
    for d in input_defs(entry):
        if d.widget:
            slots.append((d.name, d))
            if d.control_after_generate:
                slots.append((d.name + ":control", d))
    return slots


def types_compatible(out_type: str, in_type: str) -> bool:
    """ComfyUI's rule: equal, or "*" on either side, or sharing one of comma-separated types."""
    if out_type == "*" or in_type == "*":
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def check_value(where: str, d: InputDef, value: Any) -> list[str]:
    """Problems with a widget value (type, INT/FLOAT limits, COMBO membership)."""
    name = d.name
    if d.type == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: {name}={value!r} is not an INT"]
    elif d.type == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{where}: {name}={value!r} is not a FLOAT"]
    elif d.type == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {name}={value!r} is not a STRING"]
    elif d.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {name}={value!r} is not a BOOLEAN"]
    elif d.type == "COMBO":
        if name in MODEL_FILE_INPUTS:
            if isinstance(value, str) and value.endswith(".safetensors"):
                return []
            return [f"{where}: {name}={value!r} is not a .safetensors file name"]
        if name in INPUT_FOLDER_INPUTS:
            if isinstance(value, str) and value.strip() and not value.startswith(("/", "~")) \
                    and ".." not in value.split("/"):
                return []
            return [f"{where}: {name}={value!r} is not a folder under ComfyUI's input folder"]
        if value not in (d.options or []):
            return [f"{where}: {name}={value!r} not in options {d.options}"]
        return []
    if d.type in ("INT", "FLOAT"):
        lo, hi = d.opts.get("min"), d.opts.get("max")
        if lo is not None and value < lo:
            return [f"{where}: {name}={value} is below min {lo}"]
        if hi is not None and value > hi:
            return [f"{where}: {name}={value} is above max {hi}"]
    return []


def validate(workflow: dict, schemas: dict) -> list[str]:
    """Problems of a UI-format (has a ``nodes`` list) or API-format workflow; [] when valid."""
    if not isinstance(workflow, dict):
        return ["workflow is not a JSON object"]
    if isinstance(workflow.get("nodes"), list):
        return _validate_ui(workflow, schemas)
    return _validate_api(workflow, schemas)


def _validate_ui(wf: dict, schemas: dict) -> list[str]:
    errors: list[str] = []
    nodes = {}
    for n in wf["nodes"]:
        if n.get("id") in nodes:
            errors.append(f"node {n.get('id')}: duplicate node id")
        nodes[n.get("id")] = n
    links = {}
    for row in wf.get("links", []):
        if not isinstance(row, list) or len(row) != 6:
            errors.append(f"link {row!r}: expected [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if row[0] in links:
            errors.append(f"link {row[0]}: duplicate link id")
        links[row[0]] = row

    for nid, n in nodes.items():
        ntype = n.get("type")
        where = f"node {nid} ({ntype})"
        if ntype in FRONTEND_ONLY:
            if n.get("inputs") or n.get("outputs"):
                errors.append(f"{where}: a {ntype} node has no sockets")
            continue
        if ntype not in schemas:
            errors.append(f"{where}: unknown node type {ntype!r}")
            continue
        entry = schemas[ntype]
        defs = {d.name: d for d in input_defs(entry)}
        linked = set()
        for i, inp in enumerate(n.get("inputs", [])):
            d = defs.get(inp.get("name"))
            if d is None:
                errors.append(f"{where}: unknown input {inp.get('name')!r}")
                continue
            if inp.get("type") != d.type:
                errors.append(f"{where}: input {d.name!r} declared as {inp.get('type')!r}, schema says {d.type!r}")
            lid = inp.get("link")
            if lid is not None:
                row = links.get(lid)
                if row is None:
                    errors.append(f"{where}: input {d.name!r} refers to missing link {lid}")
                elif row[3] != nid or row[4] != i:
                    errors.append(f"{where}: input {d.name!r} (slot {i}) refers to link {lid}, "
                                  f"which ends at node {row[3]} slot {row[4]}")
                linked.add(d.name)
        for d in defs.values():
            if d.required and not d.widget and d.name not in linked:
                errors.append(f"{where}: required input {d.name!r} is not connected")
        # outputs
        out_types, outs = entry.get("output", []), n.get("outputs", [])
        if [o.get("type") for o in outs] != list(out_types):
            errors.append(f"{where}: outputs {[o.get('type') for o in outs]} differ from schema {list(out_types)}")
        for slot, o in enumerate(outs):
            for lid in o.get("links") or []:
                row = links.get(lid)
                if row is None or row[1] != nid or row[2] != slot:
                    errors.append(f"{where}: output {slot} lists link {lid}, which does not start there")
        # widgets
        slots = widget_slots(entry)
        values = n.get("widgets_values", [])
        if not isinstance(values, list) or len(values) != len(slots):
            got = len(values) if isinstance(values, list) else values
            errors.append(f"{where}: widgets_values has {got} values, expected {len(slots)} "
                          f"({[s for s, _ in slots]})")
            continue
        for (slot_name, d), value in zip(slots, values):
            if slot_name.endswith(":control"):
                if value not in CONTROL_VALUES:
                    errors.append(f"{where}: {slot_name}={value!r} not one of {list(CONTROL_VALUES)}")
            elif d.name not in linked:
                errors.extend(check_value(where, d, value))

    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        where = f"link {lid}"
        sn, dn = nodes.get(src), nodes.get(dst)
        if sn is None or dn is None:
            errors.append(f"{where}: connects missing node {src if sn is None else dst}")
            continue
        if sn.get("type") not in schemas or dn.get("type") not in schemas:
            errors.append(f"{where}: connects a node without schema ({sn.get('type')} -> {dn.get('type')})")
            continue
        out_types = schemas[sn["type"]].get("output", [])
        if not 0 <= src_slot < len(out_types):
            errors.append(f"{where}: {sn['type']} has no output slot {src_slot}")
            continue
        out_type = out_types[src_slot]
        if ltype != out_type:
            errors.append(f"{where}: link type {ltype!r} differs from {sn['type']} output {src_slot} type {out_type!r}")
        src_outs = sn.get("outputs") or []
        if src_slot >= len(src_outs) or lid not in (src_outs[src_slot].get("links") or []):
            errors.append(f"{where}: not listed in node {src}'s output {src_slot} links")
        inputs = dn.get("inputs", [])
        if not 0 <= dst_slot < len(inputs):
            errors.append(f"{where}: node {dst} ({dn['type']}) has no input slot {dst_slot}")
            continue
        in_name = inputs[dst_slot].get("name")
        d = {x.name: x for x in input_defs(schemas[dn["type"]])}.get(in_name)
        if d is not None and not types_compatible(out_type, d.type):
            errors.append(f"{where}: {sn['type']} output {out_type} cannot feed {dn['type']} input "
                          f"{in_name!r} of type {d.type}")
    return errors


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _validate_api(wf: dict, schemas: dict) -> list[str]:
    errors: list[str] = []
    for nid, n in wf.items():
        ntype = n.get("class_type") if isinstance(n, dict) else None
        where = f"node {nid} ({ntype})"
        if ntype in FRONTEND_ONLY:
            errors.append(f"{where}: frontend-only node type {ntype!r} is not allowed in API format")
            continue
        if ntype not in schemas:
            errors.append(f"{where}: unknown node type {ntype!r}")
            continue
        defs = {d.name: d for d in input_defs(schemas[ntype])}
        inputs = n.get("inputs", {})
        for name, value in inputs.items():
            d = defs.get(name)
            if d is None:
                errors.append(f"{where}: unknown input {name!r}")
                continue
            if _is_link(value):
                src = wf.get(value[0])
                if not isinstance(src, dict) or src.get("class_type") not in schemas:
                    errors.append(f"{where}: input {name!r} links missing or unknown node {value[0]!r}")
                    continue
                out_types = schemas[src["class_type"]].get("output", [])
                if not 0 <= value[1] < len(out_types):
                    errors.append(f"{where}: input {name!r} links {src['class_type']} output {value[1]}, "
                                  f"which does not exist")
                elif not types_compatible(out_types[value[1]], d.type):
                    errors.append(f"{where}: {src['class_type']} output {out_types[value[1]]} cannot feed "
                                  f"input {name!r} of type {d.type}")
            elif not d.widget:
                errors.append(f"{where}: input {name!r} of type {d.type} must be a link, got {value!r}")
            else:
                errors.extend(check_value(where, d, value))
        for d in defs.values():
            if d.required and d.name not in inputs:
                errors.append(f"{where}: required input {d.name!r} is missing")
    return errors


def ui_to_api(ui: dict, schemas: dict) -> dict:
    """The API prompt a UI workflow describes (what the frontend queues): widget values by name,
    links as [source id, output slot]; frontend-only nodes dropped."""
    links = {row[0]: row for row in ui.get("links", [])}
    api = {}
    for n in sorted(ui["nodes"], key=lambda n: n["id"]):
        if n["type"] in FRONTEND_ONLY:
            continue
        entry = schemas[n["type"]]
        inputs: dict[str, Any] = {}
        for (slot, _), value in zip(widget_slots(entry), n.get("widgets_values", [])):
            if not slot.endswith(":control"):
                inputs[slot] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                row = links[inp["link"]]
                inputs[inp["name"]] = [str(row[1]), row[2]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                             "_meta": {"title": n.get("title") or entry.get("display_name") or n["type"]}}
    return api


def load_schemas(core_path: str | Path | None = None) -> dict:
    """Core node schemas used by the workflows (vendored subset of ComfyUI 0.3.64's /object_info,
    or the given full /object_info dump) plus this pack's nodes from ``nodes/spec.py``."""
    from nodes import spec

    core = json.loads(Path(core_path or CORE_SCHEMAS).read_text())
    return {**core, **spec.all_object_info()}
