"""ComfyUI nodes: thin wrappers over the ``bierasing`` library (ComfyUI V3 schema).

The node declarations are built from the library's config dataclasses when ComfyUI loads the pack.
The erasure nodes are tracked in the "ComfyUI node pack" issue; until they land the extension
registers no nodes, so the pack loads cleanly but adds nothing to the graph.
"""

from comfy_api.latest import ComfyExtension, io


class BiErasingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
