"""ComfyUI entry point of the Bi-Erasing node pack.

ComfyUI imports this file when the repository sits in ``ComfyUI/custom_nodes``. It only exposes
``comfy_entrypoint``; the nodes (and ComfyUI's own modules) are imported when ComfyUI asks for them,
so importing the library from plain Python never touches ComfyUI.
"""


def _library_importable() -> None:
    # ComfyUI installs a pack's requirements, not the pack itself: make the bundled library
    # importable as ``bierasing`` (appended, so an installed copy is not shadowed).
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("bierasing") is None:
        sys.path.append(str(Path(__file__).resolve().parent))


async def comfy_entrypoint():
    _library_importable()
    from .nodes.build import BiErasingExtension

    return BiErasingExtension()
