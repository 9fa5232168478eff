"""Base-model families: one module each (``sdxl``, ``sd3``, ``flux``, ``zimage``, ``qwenimage``), behind the interface in ``base``.

``backbone_class(family)`` gives a family's :class:`~skingen.backbones.base.Backbone` subclass;
``skingen.backbones.pipelines.family_of_pipeline(folder)`` reads a pipeline's ``model_index.json`` to tell which
family it is (the one reader, for training and inference).
"""

from __future__ import annotations

from .registry import FAMILIES, backbone_class

__all__ = ["FAMILIES", "backbone_class"]
