"""The erasure engine: Bi-Erasing and its baselines over any :class:`~bierasing.backbone.Backbone`.

``config`` (EraseConfig), ``objectives`` (guidance targets), ``adapters`` (LoRA / delta on one
UNet), ``xt`` (sources of x_t), ``engine`` (the loop), ``export`` (LoRA files), ``masks`` and
``exemplars`` (image inputs).
"""

from .config import METHODS, XT_SOURCES, EraseConfig
from .engine import Concept, ErasureInterrupted, ErasureResult, erase

__all__ = ["METHODS", "XT_SOURCES", "EraseConfig", "Concept", "ErasureInterrupted", "ErasureResult", "erase"]
