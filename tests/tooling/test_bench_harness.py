"""The benchmark harness: quick mode end to end in-process, and its parts on their own.

Timings are never asserted (shared CI cores); what is checked is that every figure is produced,
consistent with the others, and that correctness gates timing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import dar
from dar.bench import correctness, e2e, impls, kernels, main, report, shapes, table, timing

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def quick_kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["kernels", "--quick", "--out", str(out)]) == 0
    path = _only(out, "kernels-cpu-*-quick.json")
    return out, path, json.loads(path.read_text())


def test_quick_kernels_writes_json_markdown_png(quick_kernels):
    out, path, res = quick_kernels
    for key in ("schema", "kind", "mode", "created", "device", "versions", "git", "config", "implementations",
                "correctness", "shapes", "results", "files"):
        assert key in res, key
    assert (res["schema"], res["kind"], res["mode"]) == ("dar-bench/1", "kernels", "quick")
    assert res["device"]["type"] == "cpu"
    for lib in ("torch", "triton", "diffusers"):
        assert lib in res["versions"]
    assert res["git"]["commit"] is None or len(res["git"]["commit"]) == 40
    md = (out / res["files"]["md"]).read_text()
    assert "CPU quick mode" in md and "quick-qwen-2ref" in md
    assert (out / res["files"]["png"]).read_bytes()[:8] == PNG_MAGIC
    assert set(res["implementations"]) == set(impls.IMPLS) - set(impls.OPT_IN)
    assert res["config"]["input_layout"] == "blhd" and res["config"]["interleaved"]


def test_quick_kernels_correctness_and_figures(quick_kernels):
    _, _, res = quick_kernels
    avail = {n for n, i in res["implementations"].items() if i["available"]}
    # torch/flex DAR, SDPA math/flash, plain flex and eager always run on CPU.
    assert {"dar-torch", "dar-flex", "sdpa-math", "flex", "eager"} <= avail
    checked = [c for c in res["correctness"] if c["status"] != "unavailable"]
    assert {c["impl"] for c in checked} >= {"dar-torch", "dar-flex", "sdpa-math", "flex", "eager"}
    for c in checked:
        assert c["passed"] is True, c
        assert c["shape"] in {s.name for s in shapes.PRESETS["quick"]}  # checked at the timed shape
        assert c["max_abs_err"] <= c["tolerance"]
        if c["impl"].startswith("dar-"):
            assert c["weight_mismatches"] == 0 and c["rebalanced_keys"] > 0
    shape_by_name = {s["name"]: s for s in res["shapes"]}
    assert set(shape_by_name) == {s.name for s in shapes.PRESETS["quick"]}
    rows = res["results"]
    assert len(rows) == len(shape_by_name) * (len(impls.IMPLS) - len(impls.OPT_IN))
    for r in rows:
        if r["impl"] in ("dar-torch", "dar-flex", "sdpa-math", "flex", "eager"):
            assert r["status"] == "ok", r
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        assert r["correct"] is True
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert math.isclose(r["iqr_ms"], r["q3_ms"] - r["q1_ms"], rel_tol=1e-9, abs_tol=1e-12)
        flops = shape_by_name[r["shape"]]["flops"]
        assert math.isclose(r["tflops"], flops / (r["median_ms"] * 1e-3) / 1e12, rel_tol=1e-9)
        assert r["peak_mem_mib"] is None  # CPU: n/a, not invented
        assert r["best_sdpa"] is not None and r["overhead_vs_best_sdpa"] > 0
    # The overhead reference is the fastest plain SDPA on each shape.
    for name in shape_by_name:
        sdpa = [r for r in rows if r["shape"] == name and r["kind"] == "sdpa" and r["status"] == "ok"]
        best = min(sdpa, key=lambda r: r["median_ms"])
        assert math.isclose(best["overhead_vs_best_sdpa"], 1.0)


def test_quick_e2e_runs_tiny_models(tmp_path):
    assert main(["e2e", "--quick", "--out", str(tmp_path), "--backend", "torch", "--backend", "flex",
                 "--reps", "1"]) == 0
    res = json.loads(_only(tmp_path, "e2e-cpu-*-quick.json").read_text())
    assert res["kind"] == "e2e" and [m["name"] for m in res["models"]] == list(e2e.MODELS)
    for m in res["models"]:
        assert m["status"] == "ok", m
        runs = {r["backend"]: r for r in m["runs"]}
        assert set(runs) == {"off", "torch", "flex"}
        for name in ("torch", "flex"):
            r = runs[name]
            assert r["status"] == "ok", r
            assert r["finite"] and r["dar_changed_output"], r  # DAR ran and did something
            assert r["ratio_vs_off"] == pytest.approx(r["median_ms"] / runs["off"]["median_ms"])
        # Two DAR backends agree on the whole model's output.
        assert runs["flex"]["max_abs_diff_vs_torch"] < 1e-3
    assert "target" in _only(tmp_path, "e2e-*.md").read_text()


def test_patched_dispatch_matches_binding():
    # The fallback route (patched dispatch_attention_fn) and dar.enable give the same step output.
    spec = e2e.MODELS["qwen-image-edit"]
    tok = spec.tokens_quick
    model = e2e._build(spec, spec.quick, torch.device("cpu"), torch.float32)
    kw = spec.inputs(spec.quick, tok, "cpu", torch.float32)
    cfg = dar.DARConfig()
    with torch.no_grad():
        off = model(**kw)[0]
        calls = [0]
        with e2e.patched_dispatch(model, tok.layout(), tok.seq, cfg, "torch", calls):
            patched = model(**kw)[0]
        assert calls[0] == spec.quick["num_layers"]
        dar.enable(model, cfg, backend="torch")
        try:
            bound = model(**kw)[0]
        finally:
            dar.disable(model)
        again = model(**kw)[0]
    assert not torch.equal(patched, off)
    torch.testing.assert_close(patched, bound, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, off, atol=0, rtol=0)


def test_model_presets_match_published_shapes():
    q3 = shapes.ALL_SHAPES["qwen-edit-3ref"]
    assert (q3.batch, q3.heads_q, q3.head_dim, q3.seq) == (2, 24, 128, 200 + 4 * 4096)
    lay = q3.layout()
    assert lay.gen == ((200, 4296),) and lay.ref == ((4296, 8392), (8392, 12488), (12488, 16584))
    assert lay.image_shapes == ((64, 64),) * 3
    f4 = shapes.ALL_SHAPES["flux2-4ref"]
    from diffusers import Flux2Transformer2DModel

    defaults = {k: p.default for k, p in __import__("inspect").signature(Flux2Transformer2DModel).parameters.items()}
    assert (f4.heads_q, f4.head_dim) == (defaults["num_attention_heads"], defaults["attention_head_dim"])
    assert f4.seq == 512 + 5 * 4096 and len(f4.layout().ref) == 4
    assert q3.flops == 4 * 2 * 24 * q3.seq * q3.seq * 128
    sweep = shapes.PRESETS["sweep"]
    assert {s.seq for s in sweep} == set(shapes.SWEEP_LENGTHS)
    assert {s.head_dim for s in sweep} == {64, 128} and {s.dtype for s in sweep} == {"fp16", "bf16"}
    assert any(s.gqa for s in sweep) and any(not s.gqa for s in sweep)
    for s in sweep:
        assert s.text + s.gen + sum(s.refs) == s.seq


def test_preset_resolution():
    assert shapes.resolve(["qwen-edit"]) == shapes.PRESETS["qwen-edit"]
    assert [s.name for s in shapes.resolve(["flux2-2ref", "flux2-2ref"])] == ["flux2-2ref"]
    assert {s.seq for s in shapes.resolve(["sweep-L4096-*"])} == {4096}
    with pytest.raises(ValueError, match="matches no preset"):
        shapes.resolve(["nope"])
    with pytest.raises(ValueError, match="--impl"):
        impls.resolve(["dar-nope"])
    assert main(["kernels", "--preset", "nope"]) == 2


def test_timing_statistics():
    calls = []
    t = timing.measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=5)
    assert len(calls) == 7 and len(t.times_ms) == 5
    s = dataclasses.replace(t, times_ms=[5.0, 1.0, 3.0, 2.0, 4.0]).summary()
    assert (s["min_ms"], s["q1_ms"], s["median_ms"], s["q3_ms"], s["max_ms"]) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert s["iqr_ms"] == 2.0 and s["peak_mem_mib"] is None and s["timer"] == "perf_counter"
    with pytest.raises(ValueError):
        timing.measure(lambda: None, torch.device("cpu"), warmup=0, reps=0)


@dataclasses.dataclass(frozen=True)
class _WrongImpl(impls.Impl):
    """Plain attention off by 1e-2: must fail the check and never be timed."""

    def build(self, q, k, v, layout, cfg):
        return lambda: impls.eager_attention(q, k, v) + 1e-2

    def outputs(self, q, k, v, layout, cfg):
        return self.build(q, k, v, layout, cfg)(), None


@dataclasses.dataclass(frozen=True)
class _CrashImpl(impls.Impl):
    """Right on its first call (the correctness check), then raises: reported as an error of the timing."""

    def build(self, q, k, v, layout, cfg):
        calls = []

        def boom():
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("kernel exploded")
            return impls.eager_attention(q, k, v)
        return boom

    def outputs(self, q, k, v, layout, cfg):
        return impls.eager_attention(q, k, v), None


@dataclasses.dataclass(frozen=True)
class _MissingImpl(impls.Impl):
    def prepare(self):
        raise impls.Unavailable("not installed here")


def test_bad_implementations_are_reported_not_fatal():
    shape = shapes.ALL_SHAPES["quick-L64-d16-fp32-mha"]
    chosen = [impls.IMPLS["eager"], _WrongImpl("wrong", "sdpa", "off by 1e-2"), _CrashImpl("crash", "eager", "raises"),
              _MissingImpl("missing", "dar", "absent")]
    res = kernels.run([shape], chosen, torch.device("cpu"), dar.DARConfig(), warmup=0, reps=1, min_warmup_s=0.0,
                      mode="quick")
    rows = {r["impl"]: r for r in res["results"]}
    assert rows["eager"]["status"] == "ok"
    assert rows["wrong"]["status"] == "skipped" and rows["wrong"]["correct"] is False
    assert "correctness" in rows["wrong"]["reason"]
    assert rows["crash"]["status"] == "error" and "kernel exploded" in rows["crash"]["reason"]
    assert rows["missing"]["status"] == "unavailable" and rows["missing"]["reason"] == "not installed here"
    assert res["implementations"]["missing"] == {"kind": "dar", "description": "absent", "available": False,
                                                 "reason": "not installed here"}
    wrong = next(c for c in res["correctness"] if c["impl"] == "wrong")
    assert wrong["status"] == "fail" and wrong["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)


def test_unimportable_backend_is_unavailable(monkeypatch):
    def fail(name):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(impls, "get_backend", fail)
    why = impls.availability([impls.IMPLS["dar-torch"]])["dar-torch"]
    assert why is not None and "cannot be imported" in why and "triton" in why


def _load_make_table():
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_table_rewrites_readme_region(quick_kernels, tmp_path, capsys):
    _, path, res = quick_kernels
    results = tmp_path / "results"
    results.mkdir()
    (results / path.name).write_text(path.read_text())
    (results / "unrelated.json").write_text('{"not": "ours"}')
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{table.START}\nstale\n{table.END}\nafter\n")
    mt = _load_make_table()
    assert mt.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert mt.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{table.END}\nafter\n")
    assert "quick-qwen-2ref" in text and "CPU quick mode" in text and "No GPU results yet" in text
    assert mt.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0  # idempotent
    nomarkers = tmp_path / "plain.md"
    nomarkers.write_text("no markers\n")
    assert mt.main(["--results", str(results), "--readme", str(nomarkers)]) == 2
    assert nomarkers.read_text() == "no markers\n"
    assert mt.main(["--results", str(results)]) == 0
    assert "| shape |" in capsys.readouterr().out


def test_newest_result_per_device_wins():
    base = {"schema": "dar-bench/1", "kind": "kernels", "device_slug": "cpu", "mode": "quick",
            "device": {"type": "cpu", "name": "x"}}
    old, new = dict(base, created="2025-01-01T00:00:00"), dict(base, created="2026-01-01T00:00:00")
    gpu = dict(base, device_slug="nvidia-h100", device={"type": "cuda", "name": "H100"}, mode="full",
               created="2024-01-01T00:00:00")
    assert table.latest([old, new, gpu]) == [gpu, new]


def test_committed_results_are_real_runs():
    # benchmarks/results holds harness output only, each naming the commit it measured.
    results = table.load_results(ROOT / "benchmarks" / "results")
    assert results, "commit at least the CPU quick-mode run (python benchmarks/run.py --quick)"
    for r in results:
        assert r["git"]["commit"] and r["results" if r["kind"] == "kernels" else "models"]
        assert report.stem(r) == Path(r["_file"]).stem
        if r["device"]["type"] == "cpu" and r["mode"] != "quick":
            # A full CPU run says what it was measured under (shared cores, load) in its report.
            assert r["device"]["cores"] and r["device"]["load_avg_start"] is not None
            assert report.CPU_NOTE in (ROOT / "benchmarks" / "results" / r["files"]["md"]).read_text()
            assert all(c["passed"] for c in r["correctness"] if c["status"] != "unavailable")


def test_interleaved_rounds_rotate_and_flush_before_each_timed_call():
    log = []
    fns = {n: (lambda n=n: log.append(n)) for n in "abc"}
    out = timing.measure_interleaved(fns, torch.device("cpu"), warmup=1, reps=3,
                                     flush=lambda: log.append("flush"))
    assert log[:3] == ["a", "b", "c"]  # warm-up
    timed = log[3:]
    assert timed[0::2] == ["flush"] * 9
    assert timed[1::2] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.times_ms) == 3 and len(t.cpu_ms) == 3 for t in out.values())
    flush = timing.cache_flusher(torch.device("cpu"))
    flush()


def test_failing_function_leaves_the_rounds_with_its_error():
    def boom():
        raise RuntimeError("no kernel")

    out = timing.measure_interleaved({"ok": lambda: None, "bad": boom}, torch.device("cpu"), warmup=1, reps=2)
    assert isinstance(out["bad"], RuntimeError) and len(out["ok"].times_ms) == 2


def test_inputs_are_strided_like_diffusers_by_default():
    shape = shapes.ALL_SHAPES["quick-L64-d16-fp32-gqa"]
    q, k, v = kernels._inputs(shape, torch.device("cpu"))
    assert q.shape == (1, 4, 64, 16) and q.transpose(1, 2).is_contiguous() and not q.is_contiguous()
    qc, _, _ = kernels._inputs(shape, torch.device("cpu"), layout="bhld")
    assert qc.is_contiguous() and qc.shape == q.shape


def test_check_at_large_shapes_uses_rows_and_catches_a_wrong_row(monkeypatch):
    monkeypatch.setattr(correctness, "FULL_CHECK_ELEMENTS", 0)  # force the rows check on a small shape
    shape = shapes.ALL_SHAPES["quick-qwen-2ref"]
    q, k, v = kernels._inputs(shape, torch.device("cpu"))
    lay = shape.layout()
    for name in ("dar-torch", "dar-torch:prob_scale", "sdpa-flash", "flex"):
        impl = next(i for i in impls.with_modes([impls.IMPLS[name.split(":")[0]]], ["key_scale", "prob_scale"])
                    if i.name == name)
        rec = correctness.check(impl, impl.build(q, k, v, lay, dar.DARConfig()), q, k, v, lay, dar.DARConfig(), "fp32")
        assert rec["passed"] and rec["rows_checked"] > 0 and "rows" in rec["reference"], rec
    impl = impls.IMPLS["dar-torch"]
    right = impl.build(q, k, v, lay, dar.DARConfig())

    def wrong():
        out, w = right()
        out = out.clone()
        out[:, :, 40] += 1e-2  # one generated-image row, spread over the rows the check reads
        out[:, :, 4:40] += 1e-2
        return out, w

    rec = correctness.check(impl, wrong, q, k, v, lay, dar.DARConfig(), "fp32")
    assert rec["status"] == "fail" and rec["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)


def test_modes_expand_dar_rows_and_the_table_shows_them():
    chosen = impls.with_modes(impls.resolve(["dar-torch", "sdpa-flash", "dar-weights"]), ["key_scale", "prob_scale"])
    assert [i.name for i in chosen] == ["dar-torch", "dar-torch:prob_scale", "sdpa-flash", "dar-weights"]
    res = kernels.run([shapes.ALL_SHAPES["quick-L64-d16-fp32-mha"]], chosen, torch.device("cpu"), dar.DARConfig(),
                      warmup=0, reps=2, min_warmup_s=0.0, mode="quick")
    assert all(r["status"] == "ok" for r in res["results"]), res["results"]
    assert res["config"]["modes"] == ["key_scale", "prob_scale"]
    text = "\n".join(table.kernels_table(dict(res, _file="x.json")))
    assert "DAR torch prob_scale" in text and "DAR weights alone" in text
