"""What the installed Triton offers the kernels, probed once at import.

The kernels run on Triton >= 3.2 (torch >= 2.6). Releases differ in what they offer, and each
difference is decided here, once, by looking for the feature rather than comparing versions:

- ``INTERPRETED``: whether ``@triton.jit`` functions run in the CPU interpreter (``TRITON_INTERPRET=1``,
  decided by Triton when a function is decorated). ``triton.knobs`` (3.4+) is not needed for this.
- ``TensorDescriptor``: host-side TMA descriptors (``triton.tools.tensor_descriptor``, 3.4+), None
  without them. Without them every GPU, Hopper included, loads K/V through pointers.
- `lazy_autotune`: ``triton.autotune`` looks up the CUDA driver when the decorator runs on 3.2 / 3.3
  (an error on a machine without a GPU, where the ahead-of-time compiler still works), and the 3.2
  interpreter hands a config's keys to the kernel twice. The autotuner is therefore built at the
  first launch, and under the interpreter the single interpreter config is applied directly.
- `interpreter_descriptor_strides_in_elements`: the 3.3-3.5 interpreter checks a descriptor's strides
  for 16-divisibility in elements instead of bytes.
- in `aot` (ahead-of-time compilation): ``get_ptxas(arch)`` takes the architecture from 3.6 on, nothing
  before; Triton 3.2 takes its compile attributes as an ``AttrsDescriptor`` and no constexprs in the
  signature, and resolves a kernel's names in its module's globals only.
- ``PIPELINED_KEY_MASS``: scoring stage 2 compiles with ``num_stages >= 3`` (Triton 3.2's software
  pipeliner fails on its loop; the only check here that reads the version, since nothing short of
  compiling the kernel shows it).

Two things every supported Triton accepts are written the way the oldest one does: no chained boolean
operators (``a and b and c``) in kernels, and no ``~`` on booleans (the interpreter before 3.4
rejects it; ``x == 0`` or `tl.where` instead).

Older than 3.2 (Triton 3.1, torch 2.5): importing a kernel module raises ImportError naming the
version, and the triton backend reports itself unavailable with that reason (``dar info``).
"""

from __future__ import annotations

import functools

import triton

MIN_TRITON = (3, 2)


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


VERSION = major_minor(triton.__version__)
if VERSION < MIN_TRITON:
    raise ImportError(f"the dar triton kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, found "
                      f"{triton.__version__} (it comes with torch; torch >= 2.6 brings a recent enough one)")


def _interpreted() -> bool:
    @triton.jit
    def probe():
        pass

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    return isinstance(probe, InterpretedFunction)


INTERPRETED = _interpreted()

try:  # host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

PIPELINED_KEY_MASS = VERSION >= (3, 3)


@functools.lru_cache(maxsize=None)
def interpreter_descriptor_strides_in_elements() -> bool:
    """Whether this interpreter refuses a descriptor whose strides are 16-byte aligned but not
    multiples of 16 elements (Triton 3.3-3.5). Probed by interpreting one load; False when not
    interpreting or without descriptors."""
    if not INTERPRETED or TensorDescriptor is None:
        return False
    import torch
    import triton.language as tl

    @triton.jit
    def probe(desc, out):
        tl.store(out + tl.arange(0, 8), desc.load([0, 0]).reshape(8))

    t = torch.zeros(2, 8, dtype=torch.float16)  # row stride 8 elements = 16 bytes
    try:
        probe[(1,)](TensorDescriptor(t, [2, 8], [8, 1], [1, 8]), torch.empty(8, dtype=torch.float16))
    except AssertionError:
        return True
    return False


class lazy_autotune:
    """``triton.autotune(configs, key, prune_configs_by=...)(fn)``, built at the first launch; under
    the interpreter, ``fn`` launched with the single config (its pre-hook run), never the autotuner.

    ``fn`` and ``configs`` stay readable (the static report compiles ``fn``).
    """

    def __init__(self, fn, configs: list, key: list[str], prune=None):
        self.fn, self.configs, self.key, self.prune = fn, configs, key, prune

    @functools.cached_property
    def _tuner(self):
        by = {"early_config_prune": self.prune} if self.prune else None
        return triton.autotune(configs=self.configs, key=self.key, prune_configs_by=by)(self.fn)

    def __getitem__(self, grid):
        if not INTERPRETED:
            return self._tuner[grid]
        (config,) = self.configs

        def launch(**kwargs):
            nargs = {**kwargs, **config.kwargs}
            if config.pre_hook is not None:
                config.pre_hook(nargs)
            return self.fn[grid(nargs) if callable(grid) else grid](**nargs)

        return launch


__all__ = ["INTERPRETED", "MIN_TRITON", "PIPELINED_KEY_MASS", "TensorDescriptor", "VERSION",
           "interpreter_descriptor_strides_in_elements", "lazy_autotune", "major_minor"]
