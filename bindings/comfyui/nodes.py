"""The ComfyUI nodes: ``DARRebalance`` ("DAR: Dynamic Attention Rebalancing") and ``DARAttentionMap``
("DAR: Attention Map").

ComfyUI's node contract (plain classes, no ComfyUI import): ``INPUT_TYPES()`` describes the inputs,
``RETURN_TYPES`` the outputs, ``FUNCTION`` names the method to run, ``CATEGORY`` the menu.
"""

from __future__ import annotations

import torch

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
        }, "optional": {
            "record_attention": ("BOOLEAN", {"default": False,
                                             "tooltip": "keep where the attention went, for DAR: Attention Map"}),
        }}

    def patch(self, model, gamma, tau_high, tau_low, num_samples, mode, thresholds, normalize, layers="", steps="",
              backend="auto", record_attention=False):
        from dar.bindings.recorder import Recorder

        cfg = DARConfig(gamma=gamma, tau_high=tau_high, tau_low=tau_low, num_samples=num_samples, mode=mode,
                        thresholds=thresholds, normalize=normalize)
        return (patch.apply(model, cfg, backend=backend, layers=parse_indices("layers", layers),
                            steps=parse_indices("steps", steps), recorder=Recorder() if record_attention else None),)


def _heat(m: torch.Tensor, scale: float, height: int) -> torch.Tensor:
    """A (h, w) map -> (height, w * height / h, 3) RGB in [0, 1] (black, red, yellow, white), nearest-upsampled."""
    x = (m.float() / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(m, dtype=torch.float32)
    rgb = torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], dim=-1)
    f = max(1, height // m.shape[0])
    return rgb.repeat_interleave(f, 0).repeat_interleave(f, 1)


def attention_map_image(maps: list[dict], height: int = 256) -> torch.Tensor:
    """`Recorder.reference_maps` -> a ComfyUI IMAGE ``(1, H, W, 3)``: one row per reference image, its
    attention before DAR (left) and after (right), both on one colour scale per reference."""
    rows = []
    for ref in maps:
        scale = float(torch.maximum(ref["before"].max(), ref["after"].max()))
        before, after = _heat(ref["before"], scale, height), _heat(ref["after"], scale, height)
        gap = torch.ones(before.shape[0], max(2, height // 32), 3)
        rows.append(torch.cat([before, gap, after], dim=1))
    width = max(r.shape[1] for r in rows)
    rows = [torch.cat([r, torch.zeros(r.shape[0], width - r.shape[1], 3)], dim=1) for r in rows]
    sep = torch.ones(max(2, height // 32), width, 3)
    out = [rows[0]]
    for r in rows[1:]:
        out += [sep, r]
    return torch.cat(out, dim=0).unsqueeze(0)


class DARAttentionMap:
    """Where the generated image's attention went in each reference image, before and after DAR.

    Takes the MODEL from ``DARRebalance`` with ``record_attention`` on and the sampler's LATENT output
    (so it runs after sampling); renders the recorded maps (averaged over the selected steps and
    layers) and clears the record for the next run.
    """

    CATEGORY = "model_patches/attention"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "samples": ("LATENT",),
            "layers": ("STRING", {"default": "", "tooltip": "joint attention calls to average, empty = all"}),
            "steps": ("STRING", {"default": "", "tooltip": "sampling steps to average, empty = all"}),
            "height": ("INT", {"default": 256, "min": 32, "max": 2048}),
        }}

    def render(self, model, samples, layers="", steps="", height=256):
        recorder = patch.recorder_of(model)
        if recorder is None:
            raise ValueError("DAR: Attention Map needs the MODEL output of DAR: Dynamic Attention Rebalancing with "
                             "record_attention on")
        chosen_layers = parse_indices("layers", layers)
        chosen_steps = parse_indices("steps", steps)
        maps = recorder.reference_maps(step=sorted(chosen_steps) if chosen_steps else None,
                                       layers=sorted(chosen_layers) if chosen_layers else None)
        image = attention_map_image(maps, height)
        recorder.clear()
        return (image,)


NODE_CLASS_MAPPINGS = {"DARRebalance": DARRebalance, "DARAttentionMap": DARAttentionMap}
NODE_DISPLAY_NAME_MAPPINGS = {"DARRebalance": "DAR: Dynamic Attention Rebalancing",
                              "DARAttentionMap": "DAR: Attention Map"}
