"""backend="auto": the tuner's logic with injected timings (no real timing asserted), its caches, and
the overrides (backend=, DAR_BACKEND)."""

from __future__ import annotations

import json

import pytest
import torch

import dar
from dar import backends
from dar.backends import get_backend, tuner
from dar.call import make_call

LAYOUT = dar.TokenLayout(ref=[(0, 8)], gen=[(8, 16)])
CFG = dar.DARConfig(num_samples=4, gamma=0.5)


def _call(lq=16, lk=16, cfg=CFG, **kw):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    return make_call(q, k, v, LAYOUT, cfg, kw.get("attn_mask"), None, kw.get("is_causal", False))


class FakeTimer:
    """Injected timings: ms per candidate name; counts how often the tuner measured."""

    def __init__(self, ms: dict[str, float], fail: dict[str, str] | None = None):
        self.ms, self.fail, self.runs = ms, fail or {}, []

    def __call__(self, candidates, call, reps):
        self.runs.append(sorted(candidates))
        times = {n: self.ms[n] for n in candidates if n not in self.fail}
        return times, {n: why for n, why in self.fail.items() if n in candidates}


CANDIDATES = ("torch", "torch:math", "reference", "flex")


def _tuner(timer, path=None):
    return tuner.Tuner(get_backend, backends.default_backend, timer=timer, cache_path=path,
                       candidate_names=lambda device: CANDIDATES)


def test_fastest_candidate_wins_and_is_cached_per_kind():
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})
    t = _tuner(timer)
    assert t.choose(_call(lq=20, lk=20)).name == "torch:math"
    assert t.choose(_call(lq=20, lk=20)).name == "torch:math"
    assert t.choose(_call(lq=17, lk=30)).name == "torch:math"  # lengths in the same bucket (<= 32)
    assert len(timer.runs) == 1 and timer.runs[0] == sorted(CANDIDATES)
    t.choose(_call(lq=40, lk=40))  # another bucket: measured again
    t.choose(_call(cfg=CFG.replace(mode="prob_scale")))  # another mode
    t.choose(_call(is_causal=True))  # another mask kind
    assert len(timer.runs) == 4
    (key, entry), *_ = t.table()
    assert "float32" in key and "Lq<=" in key and entry.ranking[0] == entry.choice


def test_failed_and_unsupported_candidates_are_excluded_with_reasons():
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0},
                      fail={"torch:math": "RuntimeError: No available kernel"})
    t = _tuner(timer)
    mask = torch.rand(1, 2, 16, 16) > 0.2  # a full mask: flex refuses it
    call = _call(attn_mask=mask)
    assert t.choose(call).name == "torch"
    ((_, entry),) = t.table()
    assert "flex" not in timer.runs[0] and "flex" in entry.excluded and "torch:math" in entry.excluded


def test_cached_choice_that_cannot_run_a_call_uses_the_next_fastest(monkeypatch):
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})
    t = _tuner(timer)
    call = _call()
    assert t.choose(call).name == "torch:math"
    monkeypatch.setattr(get_backend("torch:math"), "unsupported", lambda call: "not today")
    assert t.choose(call).name == "flex" and len(timer.runs) == 1


def test_disk_cache_round_trip(tmp_path):
    path = tmp_path / "tune.json"
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})
    _tuner(timer, path).choose(_call())
    data = json.loads(path.read_text())
    assert data["schema"] == tuner.SCHEMA and len(data["entries"]) == 1
    fresh = FakeTimer({})
    t2 = _tuner(fresh, path)
    assert t2.choose(_call()).name == "torch:math" and not fresh.runs
    path.write_text("{ not json")
    t3 = _tuner(FakeTimer({"torch": 1.0, "torch:math": 2.0, "reference": 3.0, "flex": 4.0}), path)
    assert t3.choose(_call()).name == "torch"  # a corrupt cache is ignored (and rewritten)
    assert json.loads(path.read_text())["schema"] == tuner.SCHEMA


def test_cache_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    monkeypatch.setenv(tuner.CACHE_ENV, str(path))
    _tuner(FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})).choose(_call())
    assert path.exists()


def test_never_tunes_while_tracing(monkeypatch):
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})
    t = _tuner(timer)
    call = _call()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert t.choose(call).name == "torch"  # the documented default on CPU
    assert not timer.runs
    monkeypatch.undo()
    t.choose(call)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert t.choose(call).name == "torch:math"  # the cached choice
    assert len(timer.runs) == 1


def test_auto_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    f = lambda q, k, v: dar.dar_attention(q, k, v, LAYOUT, CFG)  # noqa: E731  backend="auto"
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), f(q, k, v))


def test_single_candidate_is_not_timed():
    timer = FakeTimer({})
    t = tuner.Tuner(get_backend, backends.default_backend, timer=timer, candidate_names=lambda d: ("torch",))
    assert t.choose(_call()).name == "torch" and not timer.runs


class _Broken(backends.Backend):
    name = "broken"

    def key_weights(self, call):
        raise AssertionError("a compile error of some library")

    def attention(self, call, weights):
        raise AssertionError("unreachable")


def test_real_measurement_reports_medians_and_rules_out_failures():
    call = _call()
    times, excluded = tuner.measure({"torch": get_backend("torch"), "torch:math": get_backend("torch:math"),
                                     "broken": _Broken()}, call, reps=2)
    assert set(times) == {"torch", "torch:math"} and all(t > 0 for t in times.values())
    assert excluded == {"broken": "AssertionError: a compile error of some library"}


def test_backend_argument_and_environment_override_the_tuner(monkeypatch):
    call = _call()
    monkeypatch.setattr(backends.TUNER, "choose", lambda call: pytest.fail("the tuner must not run"))
    assert backends.select_backend("reference", call).name == "reference"
    monkeypatch.setenv(backends.ENV, "torch:math")
    assert backends.select_backend("auto", call).name == "torch:math"
    assert backends.select_backend("torch", call).name == "torch"  # backend= wins over the environment
    monkeypatch.setenv(backends.ENV, "fastest")
    with pytest.raises(ValueError, match="DAR_BACKEND"):
        backends.select_backend("auto", call)


def test_dar_info_prints_the_table(capsys, monkeypatch):
    from dar import cli

    monkeypatch.setattr(backends, "TUNER", _tuner(FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0,
                                                                 "flex": 2.0})))
    backends.TUNER.choose(_call())
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto" in out and "torch:math" in out and "1.000" in out and "key_scale/generation" in out


@pytest.mark.parametrize("entries", [[], None, "text", 3])
def test_cache_whose_entries_are_not_a_mapping_is_ignored_with_a_warning(tmp_path, caplog, monkeypatch, entries):
    # docs/backends.md: a corrupt cache file is ignored with a logged warning, in `auto` calls and `dar info`.
    from dar import cli

    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"schema": tuner.SCHEMA, "entries": entries}))
    t = _tuner(FakeTimer({"torch": 1.0, "torch:math": 2.0, "reference": 3.0, "flex": 4.0}), path)
    with caplog.at_level("WARNING", logger="dar"):
        assert t.choose(_call()).name == "torch"
    assert "ignoring the tuning cache" in caplog.text and "entries" in caplog.text
    assert len(json.loads(path.read_text())["entries"]) == 1  # rewritten as a good file
    path.write_text(json.dumps({"schema": tuner.SCHEMA, "entries": entries}))
    monkeypatch.setattr(backends, "TUNER", _tuner(FakeTimer({}), path))
    assert cli.main(["info"]) == 0


@pytest.mark.parametrize("cached", ["no-such-backend", "torch:math"])
def test_cached_choice_that_cannot_load_here_is_measured_again(tmp_path, caplog, monkeypatch, cached):
    path = tmp_path / "tune.json"
    key = tuner.tune_key(_call())
    entry = {"choice": cached, "times_ms": {cached: 0.5}, "excluded": {}, "created": ""}
    path.write_text(json.dumps({"schema": tuner.SCHEMA, "entries": {key: entry}}))
    real_get = get_backend

    def get(name):  # torch:math "cannot load on this machine"
        if name == "torch:math":
            raise ImportError("not built here")
        return real_get(name)

    timer = FakeTimer({"torch": 3.0, "reference": 9.0, "flex": 2.0})
    t = tuner.Tuner(get, backends.default_backend, timer=timer, cache_path=path,
                    candidate_names=lambda device: ("torch", "torch:math", "reference", "flex"))
    with caplog.at_level("WARNING", logger="dar"):
        assert t.choose(_call()).name == "flex"
    assert len(timer.runs) == 1 and cached in caplog.text and "measur" in caplog.text
    assert json.loads(path.read_text())["entries"][key]["choice"] == "flex"


def _tune_many(path, heads, count, barrier):
    t = _tuner(FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0}), path)
    barrier.wait()
    for batch in range(1, count + 1):  # each batch size is its own kind of call
        q, k, v = (torch.randn(batch, heads, 16, 8) for _ in range(3))
        t.choose(make_call(q, k, v, LAYOUT, CFG, None, None, False))


def test_two_processes_tuning_into_one_file_lose_no_entries(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "tune.json"
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_tune_many, args=(path, heads, 40, barrier)) for heads in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 80, f"{80 - len(entries)} of 80 entries lost"


def test_cached_choice_that_cannot_load_is_measured_again_after_dar_info_read_it(tmp_path):
    path = tmp_path / "tune.json"
    key = tuner.tune_key(_call())
    entry = {"choice": "gone", "times_ms": {"gone": 0.5}, "excluded": {}, "created": ""}
    path.write_text(json.dumps({"schema": tuner.SCHEMA, "entries": {key: entry}}))
    timer = FakeTimer({"torch": 3.0, "torch:math": 1.0, "reference": 9.0, "flex": 2.0})
    t = _tuner(timer, path)
    assert [e.choice for _, e in t.table()] == ["gone"]  # `dar info` lists it as it is
    assert t.choose(_call()).name == "torch:math" and len(timer.runs) == 1
