"""DAR in ComfyUI: the ``DARRebalance`` node and `apply(model, cfg) -> model` (docs/comfyui.md).

Nothing of ComfyUI is imported: a MODEL is recognised by duck typing (a ModelPatcher's ``clone``,
``model_options``, ``model``) and its model by class name (`models.SUPPORTED`).
"""

from __future__ import annotations

from .models import SUPPORTED, family_of
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, DARRebalance
from .patch import apply

__all__ = ["apply", "family_of", "SUPPORTED", "DARRebalance", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
