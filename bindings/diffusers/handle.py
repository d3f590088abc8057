"""The diffusers binding's per-model state (`DiffusersState`: its attention processors' interception
sites and layer hooks) and the validation of `enable`'s arguments; the handle and the lifecycle they
share with the other bindings live in `bindings.runtime.state`."""

from __future__ import annotations

import warnings

import torch

from dar.backends import check_backend
from dar.call import resolve_config
from dar.config import DARConfig

from ..runtime import context
from ..runtime.state import DARHandle, ModelState, Settings, user_layout_fn  # noqa: F401 (DARHandle: re-exported)
from ..runtime.steps import StepFilter
from . import intercept, layouts, parallel

LAYOUT_FN_HELP = ("pass layout_fn=callable(module, call_kwargs) -> TokenLayout | list[TokenLayout] | None "
                  "(call_kwargs: the transformer forward's arguments by name)")


class DiffusersState(ModelState):
    """DAR on one diffusers transformer: its processors' interception sites and attention-layer hooks."""

    # -- install --------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> None:
        attn = [(name, mod) for name, mod in model.named_modules() if getattr(mod, "processor", None) is not None]
        if not attn:
            raise TypeError(f"dar.enable: {type(model).__name__} has no diffusers attention modules (modules with a "
                            f"`processor`); DAR can only be enabled on diffusers transformers")
        found, skipped = [], []
        for name, mod in attn:
            site = intercept.find_site(mod.processor)
            (found if site is not None else skipped).append((name, mod, site))
        if not found:
            raise TypeError(f"dar.enable: none of the attention processors of {type(model).__name__} "
                            f"({sorted({type(m.processor).__name__ for _, m in attn})}) reach attention through "
                            f"diffusers' dispatch_attention_fn or F.scaled_dot_product_attention")
        if skipped:
            warnings.warn(f"dar: {len(skipped)} attention modules of {type(model).__name__} use processors DAR cannot "
                          f"intercept ({sorted({type(m.processor).__name__ for _, m, _ in skipped})}); they run "
                          f"unchanged", stacklevel=4)
        try:
            sites = {}
            for _, mod, (namespace, sname, kind) in found:
                sites.setdefault((id(namespace), sname), (namespace, sname, kind))
            for namespace, sname, kind in sites.values():
                self.sites.append(intercept.acquire(namespace, sname, kind))
            for index, (name, mod, _) in enumerate(found):
                context.hook_layer(self, index, name, mod)
            self.hooks.append(model.register_forward_pre_hook(self._forward_enter, with_kwargs=True))
            self.hooks.append(model.register_forward_hook(self._forward_exit, with_kwargs=True, always_call=True))
        except BaseException:
            self.remove()
            raise

    def forward_split(self, module, kw: dict):
        return parallel.forward_split(module, kw, self.settings.family)


def check_options(config, backend, recorder, backends=None) -> DARConfig:
    """Validate `enable`'s ``config``, ``backend`` and ``recorder``; the config (default ``DARConfig()``).

    ``backend``: a name of `dar.backends.NAMES` (`dar.backends.check_backend`); ``backends``: the names
    the binding's calls can run, e.g. ``dar.varlen.VARLEN_BACKENDS`` for a model whose attention is
    packed (a name outside them is refused with that backend's reason).
    """
    config = resolve_config(config, "config")
    check_backend(backend)
    if backends is not None and backend not in backends:
        from dar.varlen import VARLEN_BACKENDS

        check_backend(backend, "packed" if tuple(backends) == tuple(VARLEN_BACKENDS) else None)
        raise ValueError(f"backend must be one of {tuple(backends)} for this model, got {backend!r}")
    if recorder is not None and not callable(getattr(recorder, "observe", None)):
        raise TypeError(f"recorder must have an observe(...) method (e.g. a dar.Recorder), got {type(recorder).__name__}")
    return config


def make_settings(model, config, backend, layout_fn, steps, recorder) -> Settings:
    """Validate `enable`'s arguments for ``model`` (raising before anything is installed)."""
    if not any(getattr(m, "processor", None) is not None for m in model.modules()):
        raise TypeError(f"dar.enable: {type(model).__name__} has no diffusers attention modules (modules with a "
                        f"`processor`); DAR can only be enabled on diffusers transformers")
    config = check_options(config, backend, recorder)
    if layout_fn is not None:
        fn, family, after = user_layout_fn(layout_fn), "layout_fn", None
    else:
        fam = layouts.family_of(model)
        if fam is None:
            why = layouts.unsupported_reason(model)
            raise ValueError(f"dar.enable: no automatic token layout for {type(model).__name__}"
                             f"{f' ({why})' if why else ''} (supported: {', '.join(layouts.SUPPORTED)}); "
                             f"{LAYOUT_FN_HELP}")
        fn, family, after = fam.derive, fam.name, fam.after
    return Settings(config, backend, fn, family, after, StepFilter(steps), recorder)
