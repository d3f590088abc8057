"""Every transformer of the installed diffusers is accounted for: supported with a layout test, or
listed in `bindings.diffusers.layouts.NOT_SUPPORTED` with a reason.

A diffusers release that adds a transformer turns this red until someone decides what DAR does with
it, so a new multi-reference model cannot silently run without DAR. Works with every diffusers the
project declares: classes an older release lacks are simply not enumerated.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

from dar.bindings.diffusers import layouts

# The tests that verify each supported family's layout (module, function).
BINDING, MULTIREF = "tests.bindings.test_diffusers", "tests.bindings.test_diffusers_pipeline_multiref"
QWEN_EDIT = "tests.bindings.test_diffusers_pipeline_qwen_edit"
LAYOUT_TESTS = {
    "QwenImageTransformer2DModel": [(BINDING, "test_matches_reference_on_captured_calls"),
                                    (QWEN_EDIT, "test_dar_on_off_gamma0_and_recorder")],
    "Flux2Transformer2DModel": [(BINDING, "test_matches_reference_on_captured_calls"),
                                (MULTIREF, "test_flux2_klein_kv_pipeline")],
    "FluxTransformer2DModel": [(BINDING, "test_matches_reference_on_captured_calls"),
                               (MULTIREF, "test_visualcloze_pipeline")],
    "QwenImage21Transformer2DModel": [(MULTIREF, "test_qwenimage21_kv_cache")],
    "JoyImageEditPlusTransformer3DModel": [(MULTIREF, "test_joyimage_edit_plus")],
    "Flux3Transformer2DModel": [(MULTIREF, "test_flux3_references")],
    "BriaFiboTransformer2DModel": [(MULTIREF, "test_bria_fibo_edit_ids")],
    "OmniGenTransformer2DModel": [(BINDING, "test_matches_reference_on_captured_calls")],
    "GlmImageTransformer2DModel": [(MULTIREF, "test_glm_image_kv_cache_pipeline")],
    "ZImageTransformer2DModel": [(MULTIREF, "test_zimage_omni_pipeline")],
    "BriaFibo2Transformer2DModel": [(MULTIREF, "test_bria_fibo2_edit_pipeline")],
}


def _reaches_attention(module) -> bool:
    """Whether a transformer module's processors can reach ``dispatch_attention_fn`` or SDPA: it names
    one of them, or uses diffusers' shared attention modules (whose processors call SDPA)."""
    g = vars(module)
    if callable(g.get("dispatch_attention_fn")):
        return True
    try:
        if "scaled_dot_product_attention" in inspect.getsource(module):
            return True
    except (OSError, TypeError):
        pass
    return any(str(getattr(v, "__module__", "")).startswith("diffusers.models.attention") for v in g.values())


def transformer_classes() -> dict[str, type]:
    """Every ModelMixin class defined in ``diffusers.models.transformers`` whose attention DAR could
    intercept, by class name."""
    import diffusers.models.transformers as pkg
    from diffusers.models.modeling_utils import ModelMixin

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if not _reaches_attention(module):
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def test_every_transformer_is_supported_or_listed_with_a_reason():
    classes = transformer_classes()
    assert len(classes) > 20  # the enumeration itself works
    supported = set(layouts.SUPPORTED)
    assert not supported & set(layouts.NOT_SUPPORTED), "a class is both supported and listed as unsupported"
    missing = sorted(set(classes) - supported - set(layouts.NOT_SUPPORTED))
    assert not missing, (f"diffusers transformers neither supported nor listed in bindings/diffusers/layouts.py "
                         f"NOT_SUPPORTED: {missing}. Decide for each: write a layout rule with a test, or list it "
                         f"with a reason.")
    for name, (status, reason) in layouts.NOT_SUPPORTED.items():
        assert status in (layouts.NOT_MULTI_REFERENCE, layouts.NOT_YET) and reason.strip(), name


def test_every_supported_family_has_a_layout_test():
    assert set(LAYOUT_TESTS) == set(layouts.SUPPORTED)
    for name, tests in LAYOUT_TESTS.items():
        for module, function in tests:
            assert callable(getattr(importlib.import_module(module), function, None)), (name, module, function)


def test_supported_classes_resolve_to_their_family():
    classes = transformer_classes()
    for name in layouts.SUPPORTED:
        if name in classes:  # present in this diffusers
            fam = layouts.family_of(classes[name].__new__(classes[name]))
            assert fam is not None and callable(fam.derive), name


@pytest.mark.parametrize("name", ["WanVACETransformer3DModel", "LTX2VideoTransformer3DModel"])
def test_enable_names_the_reason_for_an_unsupported_model(name):
    import dar

    cls = transformer_classes().get(name)
    if cls is None:
        pytest.skip(f"{name} is not in this diffusers")
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    proc = type("Processor", (), {"__call__": lambda self: None})()
    model.attn = torch.nn.Module()
    model.attn.processor = proc
    with pytest.raises(ValueError, match=layouts.NOT_SUPPORTED[name][1][:30]):
        dar.enable(model)
