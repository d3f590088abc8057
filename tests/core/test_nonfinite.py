"""Non-finite inputs (docs/semantics.md, "Non-finite inputs"): every class of NaN / inf in q, k, v and
a float mask, on every backend, against the float64 oracle (tests/support/oracle.py).

Weights must equal the oracle's exactly (they never see a non-finite value); outputs must match it on
the entries the semantics pins, and the clean batch row must still be rebalanced.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dar
from dar.backends import get_backend
from tests.support.oracle import dar_float64, pinned
from tests.support.tolerances import assert_close

BACKENDS = ["reference", "torch", "flex", "triton"]
# NaN/inf arithmetic inside the reference, numpy and Triton's interpreter warns; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NAN, INF = math.nan, math.inf
LAY = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
# strided: S = P[1], P[4], P[7], P[10] = queries 13, 16, 19, 22
CFG = dar.DARConfig(gamma=0.5, num_samples=4, sampling="strided")
SAMPLED_ROW = 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 24, 8, generator=g) * 2
    k = torch.randn(2, 1, 24, 8, generator=g) * 2
    v = torch.randn(2, 1, 24, 8, generator=g)
    return q, k, v


def _poison(q, k, v, where: str, value: float):
    """Put ``value`` into batch row 0 at ``where``; batch row 1 stays clean. Returns the float key mask."""
    mask = None
    if where == "sampled_query":  # one element of one head's sampled row
        q[0, 0, SAMPLED_ROW, 3] = value
    elif where == "other_query":  # a query row that is not sampled
        q[0, 1, 2, 0] = value
    elif where == "reference_key":
        k[0, 0, 5, 1] = value
    elif where == "other_key":  # a key outside R
        k[0, 0, 20, 2] = value
    elif where == "value":
        v[0, 0, 7, 4] = value
    elif where == "key_mask":  # (B, 1, 1, Lk) additive bias: NaN/+inf at reference key 3, -inf at key 0
        mask = torch.zeros(2, 1, 1, 24)
        mask[0, 0, 0, 3] = value
        mask[:, 0, 0, 0] = -INF
    else:
        raise AssertionError(where)
    return mask


def _backend_or_skip(name):
    try:
        get_backend(name)
    except (ImportError, ValueError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"{name}: {exc}")


_PLACES = [(w, x) for w in ("sampled_query", "other_query", "reference_key", "other_key", "value")
           for x in (NAN, INF, -INF)] + [("key_mask", NAN), ("key_mask", INF)]
# Both modes, alternating over the classes (the weights do not depend on the mode; CI time does).
CLASSES = [(w, x, ("key_scale", "prob_scale")[i % 2]) for i, (w, x) in enumerate(_PLACES)]


@pytest.mark.parametrize("where, value, mode", CLASSES, ids=[f"{w}={x}-{m}" for w, x, m in CLASSES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_input_class(backend, mode, where, value):
    _backend_or_skip(backend)
    q, k, v = _inputs()
    mask = _poison(q, k, v, where, value)
    cfg = CFG.replace(mode=mode)
    out64, w64, _, _ = dar_float64(q, k, v, LAY, cfg, attn_mask=mask)
    out, w = dar.dar_attention(q, k, v, LAY, cfg, attn_mask=mask, backend=backend, return_weights=True)
    # Weights: always finite, exactly the oracle's (w is float32 by contract).
    assert torch.isfinite(w).all()
    np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32))
    assert (w[1] != 1).any(), "the clean batch row must still be rebalanced"
    if where in ("sampled_query", "other_query", "value"):
        assert (w[0] != 1).any(), "batch row 0 keeps its other sampled rows' mass"
    elif value != value or where == "key_mask":  # a NaN / +inf logit on a key every sampled row may attend
        assert (w[0] == 1).all()
    # Outputs: equal to the oracle wherever the semantics pins them.
    keep = torch.from_numpy(pinned(q, k, v, mask))
    assert keep[1].all() and (keep[0].any() or where in ("reference_key", "other_key", "key_mask"))
    out_pinned = torch.where(keep, out.double(), 0.0)
    assert_close(out_pinned, np.where(keep.numpy(), out64, 0.0), torch.float32, what=f"{backend} pinned output")


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_nan_logit_rows_output_nan_in_ieee_backends(backend):
    # Not pinned by the semantics (the torch backend's SDPA on CPU returns 0 for a row whose logits are
    # all NaN), but the reference evaluates the definition in IEEE arithmetic, and the flex and triton
    # kernels do likewise: a NaN or +inf logit on an allowed key makes the row NaN, never 0 or a 0 bias.
    _backend_or_skip(backend)
    q, k, v = _inputs()
    q[0, 1, SAMPLED_ROW, :] = NAN
    out = dar.dar_attention(q, k, v, LAY, CFG, backend=backend)
    assert out[0, 1, SAMPLED_ROW].isnan().all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all()
    q, k, v = _inputs()
    for value in (NAN, INF):
        mask = torch.zeros(2, 1, 1, 24)
        mask[0, 0, 0, 3] = value
        out = dar.dar_attention(q, k, v, LAY, CFG, attn_mask=mask, backend=backend)
        assert out[0].isnan().all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("value", [NAN, INF])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_nonfinite_mask_entry_of_one_sampled_row(backend, value):
    # A per-row float mask (reference and torch only): a NaN / +inf bias on one sampled row drops that
    # row from the mass and nothing else; the key stays in R (only -inf forbids a key).
    q, k, v = _inputs(seed=1)
    mask = torch.zeros(2, 1, 24, 24)
    mask[0, 0, SAMPLED_ROW, 4] = value
    out64, w64, _, _ = dar_float64(q, k, v, LAY, CFG, attn_mask=mask)
    out, w = dar.dar_attention(q, k, v, LAY, CFG, attn_mask=mask, backend=backend, return_weights=True)
    np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32))
    assert (w[0] != 1).any() and w64[0, 4] != 1  # key 4 still scored by the other rows
    keep = torch.from_numpy(pinned(q, k, v, mask))
    assert not keep[0, :, SAMPLED_ROW].any() and keep[0, :, :SAMPLED_ROW].all()
    assert_close(torch.where(keep, out.double(), 0.0), np.where(keep.numpy(), out64, 0.0), torch.float32)


def test_every_sampled_row_dropped_leaves_weights_one():
    q, k, v = _inputs()
    q[0, :, 12:] = NAN  # every generated-image query of batch row 0
    for backend in BACKENDS:
        _backend_or_skip(backend)
        w = dar.compute_key_weights(q, k, LAY, CFG, backend=backend)
        assert (w[0] == 1).all() and (w[1] != 1).any(), backend


# -- Rows with no allowed key, and non-finite v (docs/semantics.md, "Non-finite inputs": one rule) ---------
# Such a row outputs exactly 0 in every pinned entry (every column whose v is finite), in every backend,
# dense and packed; a column of v holding NaN / +-inf is unpinned in every row of its key head, this row
# included (0 * NaN: a kernel that loads that value gives NaN, one that skips the tile gives 0).

def _no_key_rows_check(out, out64, keep, no_key, poisoned_column, what):
    """``no_key``: bool (..., Lq) rows with no allowed key; ``poisoned_column``: index of v's bad column."""
    keep_t = torch.from_numpy(keep)
    assert_close(torch.where(keep_t, out.double(), 0.0), np.where(keep, out64, 0.0), torch.float32, what=what)
    rows = out[torch.from_numpy(no_key)]  # (n, Dv)
    kept = keep_t[torch.from_numpy(no_key)]
    assert rows.shape[0] > 0 and kept.any(), "the case must hold pinned entries of rows with no allowed key"
    assert (rows[kept] == 0).all(), f"{what}: a row with no allowed key outputs exactly 0 in its pinned entries"
    if poisoned_column is not None:
        assert not kept[:, poisoned_column].any()  # unpinned, whatever the backend gives


# flex and triton take key-only masks (a per-row mask is refused with the reason), so no "row" case there.
_NO_KEY = [(b, m) for b in BACKENDS for m in ("key", "row") if m == "key" or b in ("reference", "torch")]


@pytest.mark.parametrize("value", [NAN, INF, -INF, None], ids=["nan", "inf", "-inf", "finite"])
@pytest.mark.parametrize("backend, mask_kind", _NO_KEY, ids=[f"{b}-{m}" for b, m in _NO_KEY])
def test_rows_with_no_allowed_key_dense(backend, mask_kind, value):
    _backend_or_skip(backend)
    q, k, v = _inputs(seed=2)
    if value is not None:
        v[0, 0, 7, 4] = value
    if mask_kind == "key":  # batch row 0 may attend no key at all
        mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        mask[0] = False
    else:  # rows 3 (not generated) and 16 (sampled) of batch row 0 may attend no key; the rest rebalance
        mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
        mask[0, 0, (3, SAMPLED_ROW)] = False
    for m in (mask, torch.where(mask, 0.0, -INF)):
        out64, w64, _, _ = dar_float64(q, k, v, LAY, CFG, attn_mask=m)
        out, w = dar.dar_attention(q, k, v, LAY, CFG, attn_mask=m, backend=backend, return_weights=True)
        np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32))
        no_key = np.broadcast_to((~mask).all(-1).numpy(), (2, 2, 24)).copy()
        _no_key_rows_check(out, out64, pinned(q, k, v, m), no_key, None if value is None else 4,
                           f"{backend} {mask_kind} {m.dtype}")


@pytest.mark.parametrize("value", [NAN, INF, None], ids=["nan", "inf", "finite"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_rows_with_no_allowed_key_packed(backend, value):
    from tests.support.varlen_cases import VarlenCase, cu, oracle

    _backend_or_skip(backend)
    # Sequence 0: Lq 10 > Lk 6, causal (bottom-right), so its first 4 queries see no key, and a non-finite
    # value in its v; sequence 1: clean, every entry pinned, so nothing may leak across sequences.
    lens_q, lens_k = [10, 8], [6, 8]
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(18, 2, 8, generator=g) * 2, torch.randn(14, 1, 8, generator=g) * 2, torch.randn(14, 1, 8, generator=g)
    if value is not None:
        v[2, 0, 5] = value
    layouts = [dar.TokenLayout(ref=[(0, 4)], gen=[(4, 10)]), dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)])]
    case = VarlenCase(q, k, v, cu(lens_q), cu(lens_k), lens_q, lens_k, layouts, CFG, True, None)
    out64, w64, _, _ = oracle(case)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32))
    # Pinned (q, k finite): in sequence 0 the columns whose v is finite over its keys; all of sequence 1.
    keep = np.concatenate([np.broadcast_to(np.isfinite(v[:6].numpy()).all(0), (10, 2, 8)), np.ones((8, 2, 8), bool)])
    no_key = np.zeros((18, 2), dtype=bool)
    no_key[:4] = True
    _no_key_rows_check(out, out64, keep, no_key, None if value is None else 5, f"{backend} packed")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_packed_nonfinite_stays_in_its_sequence(backend, where, causal):
    # "Exactly dar_attention applied to each sequence on its own": a NaN in sequence 1 never reaches
    # sequence 0, even where a backend pads sequence 0 to the longest one (found by the packed fuzz:
    # the torch backend's padding columns held sequence 1's keys and values).
    from tests.support.varlen_cases import VarlenCase, cu, oracle

    _backend_or_skip(backend)
    lens = [3, 9]
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(12, 2, 8, generator=g), torch.randn(12, 1, 8, generator=g), torch.randn(12, 1, 8, generator=g)
    (k if where == "k" else v)[4:] = NAN  # every key / value of sequence 1 but its first
    layouts = [dar.TokenLayout(ref=[(0, 1)], gen=[(1, 3)]), dar.TokenLayout(ref=[(0, 4)], gen=[(4, 9)])]
    case = VarlenCase(q, k, v, cu(lens), cu(lens), lens, lens, layouts, CFG, causal, None)
    out64, w64, _, _ = oracle(case)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32))
    assert torch.isfinite(out[:3]).all(), f"{backend}: sequence 1's non-finite {where} reached sequence 0"
    assert_close(out[:3].double(), out64[:3], torch.float32, what=f"{backend} sequence 0")
