"""Bi-Erasing: bidirectional image-guided concept erasure for text-to-image diffusion models.

Importing this package is cheap: torch, diffusers and transformers are imported by the modules
that need them. Entry points: ``bierasing.world`` (the ShapesWorld toy model), the command line
``bierasing`` (``bierasing.cli``).
"""

__version__ = "0.5.1"
