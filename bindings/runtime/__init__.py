"""The engine-neutral runtime every model binding shares (diffusers, OmniGen2, BAGEL, ComfyUI).

- `context`: per-thread stacks of the running forward and attention layer, the layer hooks;
- `steps`: the step clock, step and layer filters;
- `outcomes`: what a layout rule says about one forward (`Derived`, `NoLayout`);
- `state`: a binding's settings, its per-model lifecycle (`ModelState`: hooks, sites, one `Active` per
  forward, warn-once) and the handle `dar.enable` returns (`DARHandle`);
- `WarnOnce`: warn once per reason (ComfyUI's patched models, which have no `ModelState`).

Nothing here imports diffusers, transformers or a model package.
"""

from __future__ import annotations

import threading
import warnings


class WarnOnce:
    """Say each message once per key (``warnings.warn``); shared, not copied, by deep copies of its owner."""

    def __init__(self):
        self.keys: set[str] = set()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def __call__(self, key: str, message: str, stacklevel: int = 3) -> None:
        with self.lock:
            if key in self.keys:
                return
            self.keys.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)
