"""Judges over real HTTP against a scripted local OpenAI-compatible server, plus the local judge and faces."""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tests.eval.eval_fakes import FakeOpenAIServer, Reply, Status, make_png

from dar.eval.judges import ArcFaceEmbedder, JudgeError, OpenAIJudge, ResponseCache, TransformersJudge, ask_parsed
from dar.eval.judges.faces import cosine_similarity_matrix
from dar.eval.replies import parse_checkpoints, parse_score_pair

SECRET = "sk-test-judge-SECRET-0123456789"
VALID = '{"checkpoint_results": {"A_check_1": {"pass": 1}}}'


@pytest.fixture
def images(tmp_path):
    return [make_png(tmp_path / "ref.png", (1, 2, 3)), make_png(tmp_path / "out.jpg", (4, 5, 6))]


def judge_for(server, tmp_path=None, **kwargs):
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("max_retries", 2)
    return OpenAIJudge(server.base_url, "qwen3-vl-test", **kwargs)


def test_valid_reply_and_request_shape(images, monkeypatch):
    monkeypatch.setenv("DAR_EVAL_KEY", SECRET)
    with FakeOpenAIServer(lambda req, i: Reply(VALID)) as server:
        judge = judge_for(server, api_key_env="DAR_EVAL_KEY")
        reply = judge.complete("Judge this.", images, system="Be strict.")
    assert reply == VALID
    (req,) = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.body["model"] == "qwen3-vl-test" and req.body["temperature"] == 0
    assert [m["role"] for m in req.body["messages"]] == ["system", "user"]
    parts = req.body["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "Judge this."}
    assert [p["image_url"]["url"].split(";")[0] for p in parts[1:]] == ["data:image/png", "data:image/jpeg"]
    assert SECRET not in repr(judge) and SECRET not in json.dumps(judge.describe())


def test_fenced_reply_parses_and_malformed_is_retried_then_reported(images):
    replies = iter(["```json\n" + VALID + "\n```"])
    with FakeOpenAIServer(lambda req, i: Reply(next(replies, "I think it passes."))) as server:
        judge = judge_for(server)
        good = ask_parsed(judge, "q1", images, parse_checkpoints, parse_retries=2)
        bad = ask_parsed(judge, "q2", images, parse_checkpoints, parse_retries=2)
    assert good.ok and good.value == {"A_check_1": 1} and good.attempts == 1
    assert not bad.ok and bad.kind == "parse" and bad.attempts == 3
    assert bad.replies == ["I think it passes."] * 3
    assert len(server.requests) == 4  # 1 + 3


def test_malformed_then_valid_recovers(images, tmp_path):
    script = iter(["garbage", '{"score": [7, 8]}'])
    with FakeOpenAIServer(lambda req, i: Reply(next(script))) as server:
        judge = judge_for(server, cache_dir=tmp_path / "cache")
        result = ask_parsed(judge, "rate it", images, parse_score_pair)
    assert result.ok and result.value == (7.0, 8.0) and result.attempts == 2
    # the retry bypassed the cache, and the good reply is what got cached
    assert judge.complete("rate it", images) == '{"score": [7, 8]}'
    assert len(server.requests) == 2


@pytest.mark.parametrize("code", [500, 503, 429])
def test_transient_status_is_retried_with_backoff(images, code):
    with FakeOpenAIServer(lambda req, i: Status(code) if i == 0 else Reply(VALID)) as server:
        judge = judge_for(server, max_retries=2)
        start = time.monotonic()
        assert judge.complete("q", images) == VALID
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2
    assert elapsed >= 0.3  # waited (exponential backoff starts at ~0.5 s with jitter) before retrying


def test_persistent_5xx_becomes_a_judge_error_after_retries(images):
    with FakeOpenAIServer(lambda req, i: Status(500)) as server:
        judge = judge_for(server, max_retries=1)
        with pytest.raises(JudgeError, match="InternalServerError"):
            judge.complete("q", images)
        result = ask_parsed(judge, "q", images, parse_checkpoints)
    assert not result.ok and result.kind == "transport"
    assert len(server.requests) == 4  # (1 + 1 retry) x 2


def test_non_retryable_4xx_fails_at_once(images):
    with FakeOpenAIServer(lambda req, i: Status(400)) as server:
        with pytest.raises(JudgeError, match="BadRequest"):
            judge_for(server, max_retries=3).complete("q", images)
    assert len(server.requests) == 1


def test_slow_server_times_out_and_is_retried(images):
    # first request hangs past the timeout, the retry answers at once
    with FakeOpenAIServer(lambda req, i: Reply(VALID, delay=3.0 if i == 0 else 0.0)) as server:
        judge = judge_for(server, timeout=0.3, max_retries=1)
        start = time.monotonic()
        assert judge.complete("q", images) == VALID
        assert time.monotonic() - start < 2.5
    assert len(server.requests) == 2


def test_always_slow_server_gives_a_timeout_error(images):
    with FakeOpenAIServer(lambda req, i: Reply(VALID, delay=3.0)) as server:
        judge = judge_for(server, timeout=0.2, max_retries=1)
        with pytest.raises(JudgeError, match="Timeout"):
            judge.complete("q", images)
    assert len(server.requests) == 2


def test_cache_hits_misses_and_never_stores_the_key(images, tmp_path, monkeypatch):
    monkeypatch.setenv("DAR_EVAL_KEY", SECRET)
    cache = tmp_path / "cache"
    with FakeOpenAIServer(lambda req, i: Reply(f'{{"score": [{i}, 1]}}')) as server:
        judge = judge_for(server, cache_dir=cache, api_key_env="DAR_EVAL_KEY")
        first = judge.complete("q", images)
        assert judge.complete("q", images) == first  # hit
        assert len(server.requests) == 1
        judge.complete("q", images[:1])  # other images: miss
        judge.complete("q2", images)  # other prompt: miss
        make_png(images[0], (9, 9, 9))  # same path, new bytes: miss (keyed by content hash)
        judge.complete("q", images)
        assert len(server.requests) == 4
        judge.complete("q", images, refresh=True)  # forced
        assert len(server.requests) == 5
        other_model = OpenAIJudge(server.base_url, "another-model", cache_dir=cache)
        other_model.complete("q", images)  # model is part of the key
        assert len(server.requests) == 6
    files = list(cache.rglob("*.json"))
    assert len(files) == 5
    for path in files:
        assert SECRET not in path.read_text()


def test_key_is_the_same_for_equal_content(tmp_path):
    a = make_png(tmp_path / "a.png", (5, 5, 5))
    b = make_png(tmp_path / "b.png", (5, 5, 5))
    assert ResponseCache.key("m", "p", [a]) == ResponseCache.key("m", "p", [b])
    assert ResponseCache.key("m", "p", [a]) != ResponseCache.key("m", "p", [a], system="s")


def test_concurrency_is_bounded(images):
    with FakeOpenAIServer(lambda req, i: Reply(VALID, delay=0.25)) as server:
        judge = judge_for(server, concurrency=2)
        threads = [threading.Thread(target=judge.complete, args=(f"q{i}", images)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert len(server.requests) == 6
    assert server.max_in_flight == 2


def test_constructor_validation(monkeypatch):
    monkeypatch.delenv("DAR_EVAL_MISSING", raising=False)
    with pytest.raises(ValueError, match="api_key_env"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", api_key_env="DAR_EVAL_MISSING")
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(ValueError, match="timeout"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", timeout=0)
    judge = OpenAIJudge("http://127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="unsupported image type"):
        judge.complete("q", ["x.gif"])
    with pytest.raises(FileNotFoundError):
        judge.complete("q", ["missing.png"])


def test_unreachable_server_is_a_transport_failure(images):
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout=0.5, max_retries=0)  # port 9: discard, nothing listens
    result = ask_parsed(judge, "q", images, parse_checkpoints)
    assert not result.ok and result.kind == "transport" and "Connection" in result.error


class FakePipeline:
    def __init__(self, output):
        self.output = output
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.output


@pytest.mark.parametrize(
    "output",
    [
        [{"generated_text": VALID}],
        [[{"generated_text": [{"role": "user", "content": "q"}, {"role": "assistant", "content": VALID}]}]],
    ],
)
def test_transformers_judge_with_injected_pipeline(images, tmp_path, output):
    pipe = FakePipeline(output)
    judge = TransformersJudge("local-qwen", pipeline=pipe, cache_dir=tmp_path / "c", max_new_tokens=64)
    assert judge.complete("Judge it.", images, system="strict") == VALID
    assert judge.complete("Judge it.", images, system="strict") == VALID  # cached
    (call,) = pipe.calls
    assert call["return_full_text"] is False
    assert call["generate_kwargs"] == {"max_new_tokens": 64, "do_sample": False}
    system, user = call["text"]
    assert system["role"] == "system" and user["role"] == "user"
    assert user["content"][0] == {"type": "text", "text": "Judge it."}
    assert [p["type"] for p in user["content"][1:]] == ["image", "image"]
    assert user["content"][1]["image"].size == (8, 8)


def test_transformers_judge_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        TransformersJudge(str(tmp_path / "no-model"))
    with pytest.raises(JudgeError, match="unexpected local judge output"):
        TransformersJudge("m", pipeline=FakePipeline([{"text": "x"}])).complete("q", images)


def test_arcface_refuses_missing_model_dir_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ArcFaceEmbedder(tmp_path / "insightface")


def test_cosine_similarity_matrix():
    sims = cosine_similarity_matrix([np.array([1.0, 0.0]), np.array([0.0, 2.0])], [np.array([3.0, 0.0]), np.array([1.0, 1.0])])
    assert sims == pytest.approx(np.array([[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]]))
    assert cosine_similarity_matrix([np.zeros(2)], [np.ones(2)]) == pytest.approx(np.zeros((1, 1)))
    assert cosine_similarity_matrix([], [np.ones(2)]).shape == (0, 1)
    with pytest.raises(ValueError, match="embedding sizes"):
        cosine_similarity_matrix([np.ones(2)], [np.ones(3)])


def test_response_cache_removes_orphaned_temp_files_but_not_live_ones(tmp_path):
    import subprocess
    import sys

    from dar.eval.atomic import TMP_MARKER
    from dar.eval.judges.cache import ResponseCache

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sub = tmp_path / "ab"
    sub.mkdir()
    orphan = sub / f".abc.json{TMP_MARKER}{int(dead.stdout)}-x1"
    live = sub / f".abd.json{TMP_MARKER}{os.getpid()}-x2"
    orphan.write_text("partial")
    live.write_text("in progress")
    ResponseCache(tmp_path)
    assert not orphan.exists() and live.exists()
