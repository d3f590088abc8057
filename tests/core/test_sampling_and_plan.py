"""Query sampling (semantics step 2) and the plan's index tensors."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import dar
from dar.call import make_call
from dar.sampling import sample_positions, sampled_queries


@given(n=st.integers(1, 500), num=st.integers(1, 80))
def test_strided_matches_formula(n, num):
    m = min(n, num)
    got = sample_positions(n, m, "strided", 0)
    assert got == tuple(math.floor((j + 0.5) * n / m) for j in range(m))
    assert len(set(got)) == m and list(got) == sorted(got)


@given(n=st.integers(1, 500), num=st.integers(1, 80), seed=st.integers(0, 100))
def test_random_matches_definition_and_is_deterministic(n, num, seed):
    m = min(n, num)
    expected = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].tolist())
    assert sample_positions(n, m, "random", seed) == tuple(expected)
    assert sample_positions(n, m, "random", seed) == sample_positions(n, m, "random", seed)


def test_random_sampling_ignores_global_rng_state():
    torch.manual_seed(0)
    a = sample_positions(1000, 64, "random", 5)
    torch.manual_seed(123)
    torch.randn(10)
    from dar.sampling import _sample_positions
    _sample_positions.cache_clear()  # recompute rather than read the cache
    assert sample_positions(1000, 64, "random", 5) == a


def test_sampled_queries_map_positions_into_ranges():
    gen = ((10, 13), (20, 22), (30, 35))
    P = [10, 11, 12, 20, 21, 30, 31, 32, 33, 34]
    for method in ("strided", "random"):
        for num in (1, 3, 10, 50):
            pos = sample_positions(len(P), min(num, len(P)), method, 7)
            assert sampled_queries(gen, num, method, 7) == tuple(P[p] for p in pos)
    assert sampled_queries((), 4, "random", 0) == ()


def test_plan_tensors_describe_layouts():
    q, k = torch.randn(2, 1, 10, 4), torch.randn(2, 1, 12, 4)
    lays = [dar.TokenLayout(ref=[(0, 3), (5, 7)], gen=[(6, 10)]), dar.TokenLayout(ref=[(1, 2)], gen=[])]
    call = make_call(q, k, None, lays, dar.DARConfig(num_samples=3, normalize="per_image", sampling="strided"),
                     None, None, False)
    pt = call.plan.tensors("cpu")
    assert pt.samples.tolist() == [[6, 8, 9], [-1, -1, -1]]  # P=[6..9], floor((j+.5)*4/3) = 0, 2, 3
    assert pt.key_groups(12).tolist() == [[0, 0, 0, -1, -1, 1, 1, -1, -1, -1, -1, -1], [-1, 0] + [-1] * 10]
    rows = pt.rebalanced_rows(10)
    assert rows[0].tolist() == [False] * 6 + [True] * 4 and not rows[1].any()  # row 1 has no P: plain
    assert call.plan.active and call.plan.num_groups == 2


def test_plan_is_inactive_for_gamma_zero_or_no_references():
    q, k = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    lay = dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)])
    assert not make_call(q, k, None, lay, dar.DARConfig(gamma=0.0), None, None, False).plan.active
    assert not make_call(q, k, None, dar.TokenLayout(gen=[(0, 8)]), dar.DARConfig(), None, None, False).plan.active
    assert make_call(q, k, None, lay, dar.DARConfig(), None, None, False).plan.active
