"""Helpers the tests share: the float64 oracle, hypothesis strategies, tolerances, packed cases, the
multi-process harness and stand-ins for models outside diffusers / transformers. Imported as
``from tests.support import oracle`` or ``from tests.support.tolerances import assert_close``."""
