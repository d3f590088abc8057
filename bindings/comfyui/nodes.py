"""The ComfyUI nodes: ``DARRebalance`` ("DAR: Dynamic Attention Rebalancing").

ComfyUI's node contract (plain classes, no ComfyUI import): ``INPUT_TYPES()`` describes the inputs,
``RETURN_TYPES`` the outputs, ``FUNCTION`` names the method to run, ``CATEGORY`` the menu.
"""

from __future__ import annotations

from dar.config import DARConfig

from . import patch

_DEFAULT = DARConfig()


def parse_indices(name: str, text: str):
    """``""`` (all) or comma-separated non-negative ints and ranges (``"0-9, 12"``, ends inclusive)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string like '0-9, 12', got {type(text).__name__}")
    text = text.strip()
    if not text or text.lower() == "all":
        return None
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo < 0 or hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                n = int(part)
                if n < 0:
                    raise ValueError
                out.add(n)
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a non-negative index or range 'a-b' (a <= b); "
                             f"write e.g. '0-9, 12', or leave empty for all") from None
    return frozenset(out)


class DARRebalance:
    """A MODEL in, a clone with Dynamic Attention Rebalancing out (the input MODEL is unchanged)."""

    CATEGORY = "model_patches/attention"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("Rebalances the generated image's attention toward the reference images that matter "
                   "(Qwen-Image-Edit, FLUX.1 Kontext, FLUX.2, OmniGen2), on the attention kernel ComfyUI already uses.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "gamma": ("FLOAT", {"default": _DEFAULT.gamma, "min": 0.0, "max": 0.99, "step": 0.01,
                                "tooltip": "strength: boosted keys x (1 + gamma), damped x (1 - gamma); 0 = off"}),
            "tau_high": ("FLOAT", {"default": _DEFAULT.tau_high, "min": 0.0, "max": 1.0, "step": 0.01}),
            "tau_low": ("FLOAT", {"default": _DEFAULT.tau_low, "min": 0.0, "max": 1.0, "step": 0.01}),
            "num_samples": ("INT", {"default": _DEFAULT.num_samples, "min": 1, "max": 4096}),
            "mode": (["key_scale", "prob_scale"], {"default": _DEFAULT.mode}),
            "thresholds": (["minmax", "quantile"], {"default": _DEFAULT.thresholds}),
            "normalize": (["joint", "per_image"], {"default": _DEFAULT.normalize}),
            "layers": ("STRING", {"default": "", "tooltip": "joint attention calls to rebalance, e.g. '0-9, 12'; "
                                                            "empty = all"}),
            "steps": ("STRING", {"default": "", "tooltip": "sampling steps to rebalance, e.g. '0-5'; empty = all"}),
            "backend": (["auto", "torch", "triton", "reference"], {"default": "auto",
                        "tooltip": "computes the key weights; the attention runs on ComfyUI's own kernel"}),
        }}

    def patch(self, model, gamma, tau_high, tau_low, num_samples, mode, thresholds, normalize, layers="", steps="",
              backend="auto"):
        cfg = DARConfig(gamma=gamma, tau_high=tau_high, tau_low=tau_low, num_samples=num_samples, mode=mode,
                        thresholds=thresholds, normalize=normalize)
        return (patch.apply(model, cfg, backend=backend, layers=parse_indices("layers", layers),
                            steps=parse_indices("steps", steps)),)


NODE_CLASS_MAPPINGS = {"DARRebalance": DARRebalance}
NODE_DISPLAY_NAME_MAPPINGS = {"DARRebalance": "DAR: Dynamic Attention Rebalancing"}
