"""ComfyUI V3 node classes of the pack, built from the declarations in ``spec.py``.

Only imported by ComfyUI (through the pack's ``comfy_entrypoint``); the declarations themselves
(``nodes.spec``) import no ComfyUI module, so CI checks them without ComfyUI.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import comfy_glue, impl
from .spec import CATEGORY, SPECS, NodeSpec, Port

comfy_glue.register_model_folders()

_SOCKETS = {"IMAGE": io.Image, "MASK": io.Mask, "MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae,
            "CLIP_VISION": io.ClipVision, "LORA_MODEL": io.LoraModel, "CONDITIONING": io.Conditioning, "INT": io.Int, "FLOAT": io.Float,
            "STRING": io.String, "BOOLEAN": io.Boolean}

RUN = {
    "LoadExemplars": impl.load_exemplars,
    "GenerateExemplars": impl.generate_exemplars,
    "MaskFilter": impl.mask_filter,
    "ImageAdapterLoader": impl.load_image_adapter,
    "Erase": impl.erase,
    "EraseInstant": impl.erase_instant,
    "SaveErasure": impl.save_erasure,
    "LoadErasure": impl.load_erasure,
    "CompareGrid": impl.compare_grid,
    "Evaluate": impl.evaluate,
    "Attack": impl.attack,
}


def _verdict(problem: str | None) -> bool | str:
    return True if problem is None else problem


# ComfyUI hands validate_inputs only the inputs its signature names (and then skips its own range
# checks for them), so each validator lists its inputs explicitly.
def _validate_erase(cls, concept=None, safe_concept=None, method=None, pos_weight=None,
                    map_target_to_safe=None, neg_anchor=None):
    return _verdict(impl.erase_input_problem(concept, safe_concept, method=method, pos_weight=pos_weight,
                                             map_target_to_safe=map_target_to_safe, neg_anchor=neg_anchor))


VALIDATE = {"Erase": _validate_erase}


def _socket(type_name: str):
    return _SOCKETS.get(type_name) or io.Custom(type_name)


def _input(p: Port):
    common = {"optional": p.optional, "tooltip": p.tooltip or None}
    if p.type == "COMBO":
        options = list(p.options)
        if p.files:
            options = comfy_glue.files(p.files)
        elif p.folders:
            options = comfy_glue.exemplar_folders()
        default = p.default if p.default in options else None
        return io.Combo.Input(p.name, options=options, default=default, **common)
    if p.type == "INT":
        return io.Int.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step,
                            control_after_generate=p.control_after_generate or None, **common)
    if p.type == "FLOAT":
        return io.Float.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, **common)
    if p.type == "STRING":
        return io.String.Input(p.name, default=p.default, multiline=p.multiline, **common)
    if p.type == "BOOLEAN":
        return io.Boolean.Input(p.name, default=p.default, **common)
    return _socket(p.type).Input(p.name, **common)


def _output(p: Port):
    return _socket(p.type).Output(display_name=p.name, tooltip=p.tooltip or None)


def make_node(spec: NodeSpec) -> type[io.ComfyNode]:
    run = RUN[spec.key]

    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=spec.node_id, display_name=spec.display_name, category=CATEGORY,
                         description=spec.description, inputs=[_input(p) for p in spec.inputs],
                         outputs=[_output(p) for p in spec.outputs], is_output_node=spec.output_node,
                         not_idempotent=spec.not_idempotent)

    def execute(cls, **kwargs) -> io.NodeOutput:
        out = run(**kwargs)
        if len(out) == 2 and isinstance(out[1], dict) and isinstance(out[0], tuple):
            return io.NodeOutput(*out[0], ui=out[1])
        return io.NodeOutput(*out)

    members = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
               "__doc__": spec.description, "__module__": __name__}
    if spec.key in VALIDATE:
        members["validate_inputs"] = classmethod(VALIDATE[spec.key])
    return type(spec.node_id, (io.ComfyNode,), members)


NODES = [make_node(s) for s in SPECS]


class BiErasingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
