"""The oldest Triton the kernels run on; importing them with an older one is an ImportError that says so.

The kernels use Triton APIs (``triton.knobs``, host-side tensor descriptors, ...) that older releases lack;
3.7.1 (with torch 2.13) is the oldest CI runs them on. Older tritons come with older torches (torch 2.5.1
brings 3.1.0): the triton backend and the packed triton path are then unavailable, and say why, rather than
failing with an AttributeError somewhere inside a kernel module.
"""

import triton

MIN_TRITON = (3, 7)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if _major_minor(triton.__version__) < MIN_TRITON:
    raise ImportError(f"the dar triton kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, found "
                      f"{triton.__version__} (it comes with torch; torch >= 2.13 brings a recent enough one)")
