"""The example command lines: kill-and-resume in a subprocess, secrets never written, compare, generation."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.eval.eval_fakes import FakeOpenAIServer, Reply, build_micon, build_mico, micon_reply
from PIL import Image

from dar.eval.jobs import benchmark_jobs
from dar.eval.runs import RunStore

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SECRET = "sk-test-NEVER-WRITE-ME-5f1c2a9e"


# Runs an example script in a fresh interpreter with the parent package ``dar`` stubbed: the
# core package's __init__ imports torch (seconds of CPU per process), which nothing in
# dar.eval needs and which would dominate the subprocess tests' run time.
LAUNCH = """
import runpy, sys, types
pkg = types.ModuleType("dar"); pkg.__path__ = [sys.argv[1]]; sys.modules["dar"] = pkg
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"dar_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_kill_and_resume_loses_and_duplicates_nothing_and_never_writes_the_key(tmp_path):
    n = 12
    paths = build_micon(tmp_path, {"object_composition": n})
    out = tmp_path / "run"
    case_dir = out / "cases" / "object_composition"
    env = dict(os.environ, PYTHONPATH=str(REPO), DAR_EVAL_TEST_KEY=SECRET)
    with FakeOpenAIServer(lambda req, i: Reply(micon_reply(req.prompt), delay=0.3)) as server:
        cmd = [
            sys.executable, "-c", LAUNCH, str(REPO / "dar"), str(EXAMPLES / "micon_bench_eval.py"), "score",
            "--data", str(paths["data"]), "--templates", str(paths["templates"]),
            "--generations", str(paths["generations"]), "--model", "model_x", "--out", str(out),
            "--judge-model", "judge-vl", "--judge-base-url", server.base_url,
            "--judge-api-key-env", "DAR_EVAL_TEST_KEY", "--judge-concurrency", "2", "--no-progress",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        try:
            while len(list(case_dir.glob("*.json")) if case_dir.is_dir() else []) < 3:
                assert proc.poll() is None, "scoring finished before it could be killed"
                assert time.monotonic() < deadline, "no case finished in time"
                time.sleep(0.02)
        finally:
            proc.kill()  # SIGKILL: no cleanup handlers run
            out1, err1 = proc.communicate(timeout=30)
        before = {p.name: p.read_bytes() for p in case_dir.glob("*.json")}
        assert 3 <= len(before) < n, "the kill must land mid-run"
        first_run_requests = len(server.requests)

        second = subprocess.run(cmd, env=env, capture_output=True, timeout=180)
        assert second.returncode == 0, second.stderr.decode()[-3000:]
        run2 = server.requests[first_run_requests:]

    # nothing lost, nothing duplicated
    records = [json.loads(p.read_text()) for p in sorted(case_dir.glob("*.json"))]
    assert sorted(r["case_id"] for r in records) == [f"case_{i:04d}" for i in range(n)]
    assert all(r["status"] == "ok" and r["score"] == 100.0 for r in records)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temp file survived"
    # results written before the kill were kept as they were, and their cases were not asked again
    assert {p.name: p.read_bytes() for p in case_dir.glob("*.json") if p.name in before} == before
    asked_again = {m.group(1) for r in run2 for m in [re.search(r"generated for case (\S+?)\)", r.prompt)] if m}
    assert not asked_again & {name[: -len(".json")] for name in before}
    assert len(asked_again) == len(run2)  # one request per remaining case: no duplicates
    assert f"skipped {len(before)} already finished" in second.stdout.decode()
    report = json.loads((out / "report.json").read_text())
    assert report["overall"]["count"] == n and report["overall"]["pending"] == 0

    # the key was used on the wire but never written to any file or log
    assert any(r.headers.get("authorization") == f"Bearer {SECRET}" for r in server.requests)
    assert files_containing(tmp_path, SECRET.encode()) == []
    for stream in (out1, err1, second.stdout, second.stderr):
        assert SECRET.encode() not in stream


def mico_responder(req, index):
    prompt = req.prompt
    if "Answer with exactly one word" in prompt:
        return Reply("Yes.")
    if "Prompt following" in prompt:
        return Reply('```json\n{"score": [8, 8], "reasoning": "ok"}\n```')
    if "Naturalness" in prompt:
        return Reply('{"score": [9, 9]}')
    return Reply("?")


def test_mico_example_scores_over_http_and_reports(tmp_path, capsys):
    groups = {
        "mico_bench_object_centric": [
            {"idx": i, "input": [f"mico_bench_object_centric/{i}/0.png", f"mico_bench_object_centric/{i}/1.png"],
             "reference": f"mico_bench_object_centric/{i}/reference.png", "Task": "Object", "editing_type": "2 Objects",
             "prompt": f"Objects {i}", "human_indices": []}
            for i in range(3)
        ]
    }
    fx = build_mico(tmp_path, groups=groups)
    module = load_example("mico_bench_eval")
    out = tmp_path / "run"
    with FakeOpenAIServer(mico_responder) as server:
        code = module.main([
            "score", "--bench", str(fx.bench), "--results", str(fx.results), "--model", fx.model, "--out", str(out),
            "--judge-model", "judge-vl", "--judge-base-url", server.base_url, "--no-progress", "--formula", "paper",
        ])
    assert code == 0
    assert len(server.requests) == 3 * (2 + 2)  # per case: 2 visibility + SC + PQ
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"]["mico_bench_object_centric"]["mean"] == pytest.approx(72.0)  # W=1, SC=8, PQ=9
    assert "W x SC x PQ (paper definition, 0-100; upstream eval_score.py f58070c" in capsys.readouterr().out
    assert RunStore.load(out).meta["details"]["judge"]["api_key_env"] is None

    assert module.main(["report", "--run", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "report.png").is_file()


def test_compare_subcommand(tmp_path, capsys):
    identity = {"benchmark": "micon", "model": "m", "judge_model": "j", "compat": "strict", "story_scoring": "hybrid"}
    for name, bump in (("off", 0.0), ("on", 10.0)):
        with RunStore.open(tmp_path / name, dict(identity, model=name), {}, {"object_composition": ["a", "b", "c"]}) as store:
            for i, case in enumerate("abc"):
                store.write_record({"task": "object_composition", "case_id": case, "status": "ok", "score": 50.0 + i + bump})
    module = load_example("micon_bench_eval")
    assert module.main(["compare", "--run-a", str(tmp_path / "off"), "--run-b", str(tmp_path / "on"),
                        "--out", str(tmp_path / "ab"), "--resamples", "500"]) == 0
    text = capsys.readouterr().out
    assert "DAR on better" in text and "+10.00" in text
    data = json.loads((tmp_path / "ab" / "comparison.json").read_text())
    assert data["overall"]["wins"] == 3 and data["label_b"] == "DAR on"


class FakePipe:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), (len(self.calls), 0, 0))])


def test_generate_benchmark_layout_resume_and_seeds(tmp_path):
    module = load_example("generate_benchmark")
    paths = build_micon(tmp_path, {"object_composition": 3}, model="unused")
    jobs = benchmark_jobs("micon", paths["data"])
    pipe = FakePipe()
    counts = module.generate(pipe, jobs, tmp_path / "gens", "dar_on", seed=5, make_generator=lambda s: ("gen", s),
                             call_kwargs={"num_inference_steps": 2}, progress=False)
    assert counts == {"generated": 3, "skipped": 0}
    for job, call in zip(jobs, pipe.calls):
        assert (tmp_path / "gens" / "dar_on" / "object_composition" / f"{job.case_id}.png").is_file()
        assert call["prompt"] == job.prompt and call["num_inference_steps"] == 2
        assert [img.size for img in call["image"]] == [(8, 8), (8, 8)]  # RA and RB, in card order
        assert call["generator"] == ("gen", module.case_seed(5, job))
    assert len({module.case_seed(5, j) for j in jobs}) == 3  # distinct per case, and stable:
    assert module.case_seed(5, jobs[0]) == module.case_seed(5, jobs[0])
    # resume: nothing left to do
    assert module.generate(pipe, jobs, tmp_path / "gens", "dar_on", seed=5, make_generator=lambda s: s, progress=False) == {
        "generated": 0, "skipped": 3}

    fx = build_mico(tmp_path / "mico")
    dere = [j for j in benchmark_jobs("mico", fx.bench) if j.task == "mico_bench_dere"]
    assert dere[0].case_id == "7" and dere[0].prompt == "Two friends at a cafe with a red umbrella." and len(dere[0].images) == 3


def test_generate_benchmark_dar_switch(tmp_path):
    import dar

    module = load_example("generate_benchmark")
    enabled = []
    fake_dar = SimpleNamespace(DARConfig=dar.DARConfig, enable=lambda pipe, cfg, **kw: enabled.append((pipe, cfg, kw)))
    used = module.apply_dar("PIPE", "on", {"gamma": 0.2, "num_samples": 16}, dar_module=fake_dar)
    assert enabled[0] == ("PIPE", dar.DARConfig(gamma=0.2, num_samples=16), {})
    assert used["gamma"] == 0.2 and used["num_samples"] == 16
    module.apply_dar("PIPE", "on", {}, dar_module=fake_dar, backend="torch")
    assert enabled[1] == ("PIPE", dar.DARConfig(), {"backend": "torch"})
    assert module.apply_dar("PIPE", "off", {}, dar_module=fake_dar) is None and len(enabled) == 2
    with pytest.raises(ValueError, match="off"):
        module.apply_dar("PIPE", "off", {"gamma": 0.2}, dar_module=fake_dar)
    with pytest.raises(ValueError):
        module.apply_dar("PIPE", "on", {"gamma": 2.0}, dar_module=fake_dar)  # DARConfig validates

    cfg = tmp_path / "dar.yaml"
    cfg.write_text("gamma: 0.1\nsampling: strided\n")
    assert module.parse_dar_settings(cfg, ["gamma=0.3", "seed=4"]) == {"gamma": 0.3, "sampling": "strided", "seed": 4}
    with pytest.raises(ValueError, match="key=value"):
        module.parse_dar_settings(None, ["gamma"])
    paths = build_micon(tmp_path / "b", {"object_composition": 1})
    with pytest.raises(SystemExit, match="--dar off"):
        module.main(["--benchmark", "micon", "--data", str(paths["data"]), "--pipeline", "none", "--out", str(tmp_path / "g"),
                     "--model", "m", "--dar", "off", "--dar-set", "gamma=0.2"])


def test_eval_package_imports_nothing_heavy_and_scores_without_openai():
    # dar/__init__.py belongs to the core package (and imports torch); this checks dar.eval itself,
    # with the parent package stubbed so only dar.eval's own imports are measured.
    code = f"""
import sys, types
pkg = types.ModuleType("dar"); pkg.__path__ = [{str(REPO / "dar")!r}]; sys.modules["dar"] = pkg
sys.modules["openai"] = None  # simulate openai not being installed
import dar.eval, dar.eval.micon, dar.eval.mico, dar.eval.judges, dar.eval.report, dar.eval.compare
import dar.eval.runs, dar.eval.jobs, dar.eval.cli
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "matplotlib", "scipy", "transformers", "diffusers", "insightface"}})
assert not heavy, heavy
from dar.eval.micon import score_checkpoints
from dar.eval.mico import case_score, face_score
assert score_checkpoints("object_composition", {{"A_check_1": 1}})[1] == 6.67
assert face_score(0.5) == 1.0 and case_score(1, 10, 10, 10, 10) == 100.0
from dar.eval.judges import OpenAIJudge
try:
    OpenAIJudge("http://127.0.0.1:1/v1", "m")
except ImportError as err:
    assert "openai" in str(err)
else:
    raise AssertionError("OpenAIJudge built without openai")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
