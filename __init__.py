"""ComfyUI entry point of the Bi-Erasing node pack.

ComfyUI imports this file when the repository sits in ``ComfyUI/custom_nodes``. It only exposes
``comfy_entrypoint``; the nodes (and ComfyUI's own modules) are imported when ComfyUI asks for them,
so importing the library from plain Python never touches ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import BiErasingExtension

    return BiErasingExtension()
