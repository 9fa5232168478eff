"""The registry of base-model families: one line per family, its name -> its Backbone class (in the module of the
same name, imported on first use). Every other table of family facts is derived from these classes."""

from __future__ import annotations

import importlib

from ..errors import SkingenError

FAMILIES = {"sdxl": "SDXLBackbone", "sd3": "SD3Backbone", "flux": "FluxBackbone", "zimage": "ZImageBackbone",
            "qwenimage": "QwenImageBackbone"}


def backbone_class(family: str):
    """The Backbone subclass of ``family`` (imported on first use)."""
    if family not in FAMILIES:
        raise SkingenError(f"unknown backbone {family!r}; choose one of {', '.join(FAMILIES)}")
    return getattr(importlib.import_module(f"{__package__}.{family}"), FAMILIES[family])
