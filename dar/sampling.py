"""Which generated-image queries are scored: the sampled set S drawn from P (docs/semantics.md, step 2)."""

from __future__ import annotations

import functools

import torch


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result` without importing ``torch._dynamo``.

    That decorator imports dynamo (several seconds, most of a first CPU call of `dar.dar_attention`) only to set
    this attribute, which dynamo reads when a compiled function calls ``fn``. Setting it directly keeps the
    import for code that compiles; tests/tooling/test_first_use.py checks that the two decorators mark a function alike.
    """
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def sample_positions(n: int, m: int, method: str, seed: int) -> tuple[int, ...]:
    """Sorted positions ``0 <= p < n`` of the ``m`` sampled entries of a list of length ``n``.

    A compile-time constant under torch.compile (it draws from a CPU generator).
    """
    return _sample_positions(n, m, method, seed)


@functools.lru_cache(maxsize=1024)
def _sample_positions(n: int, m: int, method: str, seed: int) -> tuple[int, ...]:
    """Sorted positions ``0 <= p < n`` of the ``m`` sampled entries of a list of length ``n``.

    ``"strided"``: ``floor((j + 0.5) * n / m)`` for ``j = 0..m-1`` (exact integer arithmetic).
    ``"random"``:  the first ``m`` of ``torch.randperm(n)`` on a CPU generator seeded with ``seed``,
    sorted. The CPU generator makes every backend and device pick the same queries.
    """
    if not 0 <= m <= n:
        raise ValueError(f"need 0 <= m <= n, got m={m}, n={n}")
    if m == 0:
        return ()
    if method == "strided":
        return tuple(((2 * j + 1) * n) // (2 * m) for j in range(m))
    if method == "random":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return tuple(sorted(torch.randperm(n, generator=gen)[:m].tolist()))
    raise ValueError(f"sampling must be 'random' or 'strided', got {method!r}")


def gen_positions(gen: tuple[tuple[int, int], ...]) -> list[int]:
    """P: the gen ranges' query indices concatenated in ascending order."""
    return [i for s, e in sorted(gen) for i in range(s, e)]


def sampled_queries(gen: tuple[tuple[int, int], ...], num_samples: int, method: str, seed: int) -> tuple[int, ...]:
    """S: the query indices scored for one batch row."""
    n = sum(e - s for s, e in gen)
    m = min(num_samples, n)
    pos = sample_positions(n, m, method, seed)
    if not pos:
        return ()
    # Map positions in P back to query indices without materialising P when the ranges are long.
    starts, out, k = [], [], 0
    for s, e in sorted(gen):
        starts.append((k, s, e - s))
        k += e - s
    j = 0
    for p in pos:
        while p >= starts[j][0] + starts[j][2]:
            j += 1
        base, s, _ = starts[j]
        out.append(s + p - base)
    return tuple(out)
