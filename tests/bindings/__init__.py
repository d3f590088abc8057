"""Model bindings: diffusers (binding, dispatch, pipelines, coverage), transformers, BAGEL, OmniGen2, ComfyUI, the
recorder, and the errors of dar.enable on what it cannot rebalance."""
