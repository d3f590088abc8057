"""Secrets: no argument prefix matching, no echoed key, URL credentials never stored or printed (issue 15, item 1)."""

import ast
import json
from pathlib import Path

import pytest
from tests.eval.eval_fakes import FakeOpenAIServer, Reply, build_mico

from dar.eval.judges import OpenAIJudge, ask_parsed
from dar.eval.replies import parse_yes_no
from dar.eval.runs import RunStore

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-live-DO-NOT-LEAK-93f0c1d2"


def _parsers_without_allow_abbrev_false(path: Path) -> list[str]:
    """Calls building an argparse parser (``ArgumentParser(...)``, ``subparsers.add_parser(...)``) that keep prefix matching."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in ("ArgumentParser", "add_parser"):
            continue
        if not any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False for k in node.keywords):
            bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return bad


def test_every_parser_in_the_package_examples_and_benchmarks_refuses_abbreviations():
    files = [p for folder in ("dar", "bindings", "kernels", "examples", "benchmarks") for p in sorted((REPO / folder).rglob("*.py"))]
    bad = [where for path in files for where in _parsers_without_allow_abbrev_false(path)]
    assert bad == []


def _mico_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dar_example_mico_secrets", REPO / "examples" / "mico_bench_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spelling", [["--judge-api-key", KEY], [f"--judge-api-key={KEY}"], ["--judge-api-key-e", KEY]])
def test_a_key_on_the_command_line_is_refused_and_never_echoed(tmp_path, capsys, spelling):
    argv = ["score", "--bench", str(tmp_path), "--results", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o"),
            "--judge-model", "j", *spelling]
    with pytest.raises(BaseException) as info:  # argparse exits with 2; before the fix a ValueError quoted the key
        _mico_example().main(argv)
    captured = capsys.readouterr()
    assert isinstance(info.value, SystemExit) and info.value.code == 2, repr(info.value)
    assert KEY not in captured.out + captured.err + str(info.value)
    assert "--judge-api-key-env" in captured.err  # says how to pass a key instead


@pytest.mark.parametrize("value", [KEY, "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123"])  # not a name / a name that is not set
def test_api_key_env_errors_never_repeat_the_value(monkeypatch, value):
    monkeypatch.delenv(value, raising=False)
    with pytest.raises(ValueError, match="api_key_env") as info:
        OpenAIJudge("http://127.0.0.1:1/v1", "m", api_key_env=value)
    assert value not in str(info.value)


def test_redact_url():
    from dar.eval.redact import redact, redact_url

    assert redact_url(f"http://u:{KEY}@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url(f"https://{KEY}@host/v1") == "https://***@host/v1"
    assert redact_url(f"https://h/v1?api-key={KEY}&deployment=x") == "https://h/v1?api-key=***&deployment=x"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact(f"POST http://u:pw@h/v1/chat/completions failed (token {KEY})", [KEY]) == \
        "POST http://***@h/v1/chat/completions failed (token ***)"


def mico_responder(req, index):
    if "Answer with exactly one word" in req.prompt:
        return Reply("Yes.")
    return Reply('{"score": [8, 8]}')


def test_url_credentials_are_used_but_never_stored_or_printed(tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("DAR_EVAL_SECRETS_TEST_KEY", KEY)
    groups = {"mico_bench_object_centric": [
        {"idx": 0, "input": ["mico_bench_object_centric/0/0.png"], "reference": "mico_bench_object_centric/0/reference.png",
         "prompt": "An object.", "human_indices": []}]}
    fx = build_mico(tmp_path, groups=groups)
    out = tmp_path / "run"
    with FakeOpenAIServer(mico_responder) as server:
        url = server.base_url.replace("http://", f"http://user:{KEY}@")
        code = _mico_example().main([
            "-v", "score", "--bench", str(fx.bench), "--results", str(fx.results), "--model", fx.model, "--out", str(out),
            "--judge-model", "judge-vl", "--judge-base-url", url, "--judge-api-key-env", "DAR_EVAL_SECRETS_TEST_KEY",
            "--no-progress",
        ])
        assert code == 0 and len(server.requests) == 3
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err + caplog.text
    assert [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()] == []
    judge = RunStore.load(out).meta["details"]["judge"]
    assert judge["base_url"] == server.base_url.replace("http://", "http://***@")
    assert json.loads((out / "report.json").read_text())["overall"]["count"] == 1

    # the HTTP stack's own request logs (INFO, with the full URL) are masked as well
    caplog.clear()
    for name in ("httpx", "httpx2", "openai"):
        caplog.set_level("DEBUG", logger=name)
    with FakeOpenAIServer(mico_responder) as server:
        url = server.base_url.replace("http://", f"http://user:{KEY}@")
        judge = OpenAIJudge(url, "judge-vl", api_key_env="DAR_EVAL_SECRETS_TEST_KEY")
        assert judge.complete("Answer with exactly one word") == "Yes."
    assert "HTTP Request" in caplog.text and KEY not in caplog.text

    # an error naming the URL (nothing listens on port 9) is redacted too, as is the judge's repr
    judge = OpenAIJudge(f"http://user:{KEY}@127.0.0.1:9/v1?api-key={KEY}", "m", timeout=0.5, max_retries=0)
    result = ask_parsed(judge, "q", [fx.results / fx.model / "mico_bench_object_centric" / "0.png"], parse_yes_no)
    assert result.kind == "transport" and KEY not in result.error
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.describe())
