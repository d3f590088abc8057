"""Model bindings: `enable` / `disable` / `rebalanced` dispatch to the diffusers or transformers binding.

- diffusers pipelines and transformer models: `dar.bindings.diffusers`.
- transformers models using ``attn_implementation="dar"``: `dar.bindings.transformers`.
- BAGEL's ``Bagel`` model: `dar.bindings.bagel`. OmniGen2's transformer and pipeline go through the
  diffusers binding (its layout rule is `dar.bindings.omnigen2`). Neither package is imported.
Each imports its library lazily, so ``import dar`` never pulls diffusers or transformers in.
"""

from __future__ import annotations

if __name__ == "bindings":  # the checkout root is on sys.path: be the installed `bindings`, not this folder
    from dar._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)

import contextlib
import importlib
import sys

import torch

from dar.extras import require


def _binding_for(target, verb: str):
    from . import bagel  # BAGEL's model is a transformers PreTrainedModel: recognised by class first

    if bagel.is_bagel(target):
        return bagel
    # A transformers model is recognised without importing transformers when it isn't loaded.
    tf = sys.modules.get("transformers")
    inner = getattr(target, "_orig_mod", target)  # a torch.compile'd model routes like the model inside
    if tf is not None and isinstance(inner, tf.PreTrainedModel):
        return importlib.import_module("dar.bindings.transformers")
    from . import omnigen2  # OmniGen2 uses the diffusers binding's machinery but none of diffusers' own code

    if omnigen2.is_transformer(target) or omnigen2.is_pipeline(target):
        return importlib.import_module("dar.bindings.diffusers")
    # Everything else is the diffusers binding's: without diffusers nothing could have been enabled through it,
    # so both enable and disable say what to install rather than fail later or silently do nothing.
    if not _diffusers_like(target):
        what = ("has no diffusers attention modules (modules with a `processor`) and is not a model DAR supports"
                if isinstance(target, torch.nn.Module) else "is not a model DAR supports")
        raise TypeError(f"dar.{verb}: {type(target).__name__} {what}; supported: {SUPPORTED}")
    require("diffusers", "diffusers", f"dar.{verb} on {type(target).__name__}")
    return importlib.import_module("dar.bindings.diffusers")


SUPPORTED = ("a diffusers pipeline or transformer (docs/diffusers.md), a transformers model loaded with "
             "attn_implementation='dar' (docs/transformers.md), OmniGen2's pipeline or transformer, or BAGEL's Bagel "
             "model (docs/models.md)")


def _diffusers_like(target) -> bool:
    """A diffusers pipeline (or anything holding a transformer / unet as a pipeline does), or a module with
    diffusers attention processors: what the diffusers binding can look at further."""
    if any(getattr(target, name, None) is not None for name in ("transformer", "unet", "components")):
        return True
    modules = getattr(target, "modules", None)
    return callable(modules) and any(getattr(m, "processor", None) is not None for m in modules())


def enable(target, config=None, **kwargs):
    """Turn DAR on for a diffusers pipeline / transformer, or a transformers model (see each binding)."""
    return _binding_for(target, "enable").enable(target, config, **kwargs)


def disable(target) -> None:
    """Restore ``target``'s original behaviour exactly."""
    _binding_for(target, "disable").disable(target)


@contextlib.contextmanager
def rebalanced(target, config=None, **kwargs):
    """``with dar.rebalanced(pipe_or_model, cfg, ...):`` — `enable` on entry, `disable` on exit."""
    handle = enable(target, config, **kwargs)
    try:
        yield handle
    finally:
        disable(target)


__all__ = ["enable", "disable", "rebalanced"]
