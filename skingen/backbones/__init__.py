"""Base-model families: one module each (``sdxl``, ``sd3``, ``flux``, ``zimage``, ``qwenimage``), behind the interface in ``base``.

``backbone_class(family)`` gives a family's :class:`~skingen.backbones.base.Backbone` subclass;
``family_of_pipeline(folder)`` reads a diffusers pipeline folder's ``model_index.json`` to tell which family it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SkingenError
from .registry import FAMILIES, backbone_class

__all__ = ["FAMILIES", "backbone_class", "check_controlnet_for_pipeline", "family_of_pipeline"]


def family_of_pipeline(folder) -> str | None:
    """The family of a local diffusers pipeline folder from ``model_index.json``'s ``_class_name``; None when the
    folder has no model_index.json or the class is not one of ours."""
    index = Path(folder).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as err:
        raise SkingenError(f"{index}: not readable as JSON ({err})") from None
    for family in FAMILIES:
        if class_name in backbone_class(family).base_pipeline_classes:
            return family
    return None


def check_controlnet_for_pipeline(controlnet_name_or_path, pipeline_folder, *, flag: str = "--controlnet_model_name_or_path",
                                  cache_dir: str | None = None) -> str:
    """The ControlNet architecture check for a local base pipeline folder (inference uses it as training does):
    raises ``SkingenError`` naming the ControlNet folder when it is not a ControlNet of the pipeline's family or
    does not fit its denoiser. Returns the resolved ControlNet source."""
    from .base import check_controlnet_source, read_model_config

    family = family_of_pipeline(pipeline_folder)
    if family is None:
        raise SkingenError(f"{pipeline_folder}: no model_index.json of a pipeline skingen trains on ({', '.join(FAMILIES)}) there")
    backbone = backbone_class(family)
    denoiser_config = read_model_config(str(Path(pipeline_folder).expanduser() / backbone.denoiser_subfolder))
    return check_controlnet_source(backbone, controlnet_name_or_path, denoiser_config, source_of_base=str(pipeline_folder),
                                   flag=flag, cache_dir=cache_dir)
