"""ComfyUI nodes of the Bi-Erasing pack: thin wrappers over the ``bierasing`` library.

  spec.py        node declarations (no ComfyUI import: CI validates them and the workflows)
  build.py       turns the declarations into ComfyUI V3 node classes (imported by ComfyUI only)
  impl.py        what each node does, in library calls
  comfy_glue.py  the one module that touches ComfyUI internals (ModelPatcher, model_sampling, ...)
"""
