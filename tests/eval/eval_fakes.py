"""Test doubles for dar.eval: a scripted OpenAI-compatible HTTP server, fake judges/embedders, fixtures on disk."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from PIL import Image

from dar.eval.micon.protocol import TASKS


# --------------------------------------------------------------------------------------
# Fake OpenAI-compatible server
# --------------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str
    delay: float = 0.0


@dataclass
class Status:
    code: int
    delay: float = 0.0


Action = Reply | Status


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        texts = []
        for message in self.body.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            else:
                texts += [part.get("text", "") for part in content if part.get("type") == "text"]
        return "\n".join(texts)

    @property
    def n_images(self) -> int:
        return sum(
            part.get("type") == "image_url"
            for message in self.body.get("messages", [])
            if not isinstance(message.get("content"), str)
            for part in message["content"]
        )


class FakeOpenAIServer:
    """ThreadingHTTPServer on 127.0.0.1:<random port> answering ``POST .../chat/completions``.

    ``responder(request, index)`` returns the :class:`Reply`/:class:`Status` for the
    ``index``-th request (0-based). Delays wait on a stop event, so shutdown is prompt.
    """

    def __init__(self, responder: Callable[[Request, int], Action]):
        self.responder = responder
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with server.lock:
                    index = len(server.requests)
                    server.requests.append(request)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if not self.path.endswith("/chat/completions"):
                        action: Action = Status(404)
                    else:
                        action = server.responder(request, index)
                    if action.delay:
                        server.stop.wait(action.delay)
                    if isinstance(action, Status):
                        payload = {"error": {"message": f"scripted status {action.code}", "type": "test", "code": action.code}}
                        self._send(action.code, payload)
                    else:
                        self._send(200, completion(action.text, body.get("model", "m")))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


# --------------------------------------------------------------------------------------
# Scripted judges and embedders (in-process)
# --------------------------------------------------------------------------------------
class ScriptedJudge:
    """A Judge whose replies come from ``reply(prompt, images, attempt_refresh)``; records calls."""

    def __init__(self, reply: Callable[[str, list[Path]], str], name: str = "scripted-judge"):
        self.name = name
        self._reply = reply
        self.calls: list[tuple[str, list[Path], bool]] = []
        self.lock = threading.Lock()

    def complete(self, prompt, images=(), *, system=None, refresh=False):
        paths = [Path(p) for p in images]
        with self.lock:
            self.calls.append((prompt, paths, refresh))
        return self._reply(prompt, paths)


def tail(path) -> str:
    """The last two path components, e.g. "7/0.png" or "mico_bench_hoi/0.png"."""
    parts = Path(path).parts
    return "/".join(parts[-2:])


class FakeEmbedder:
    """Face 'detector' looking embeddings up by :func:`tail` of the path; unknown files have no face."""

    name = "fake-embedder"

    def __init__(self, table: dict[str, list[np.ndarray]]):
        self.table = table
        self.calls: list[str] = []

    def embed(self, image_path):
        self.calls.append(tail(image_path))
        return [np.asarray(v, dtype=np.float32) for v in self.table.get(tail(image_path), [])]


def unit(angle_deg: float) -> np.ndarray:
    """A 2-D unit vector; cos(angle difference) is the cosine similarity of two of them."""
    rad = np.deg2rad(angle_deg)
    return np.array([np.cos(rad), np.sin(rad)], dtype=np.float64)


# --------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------
def make_png(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


JUDGE_TEMPLATE = """\
Evaluate the LAST image against the references.
Task: {TASK_TYPE}
References:
{REFS_BLOCK}
Instruction: {GEN_PROMPT_BLOCK}
Candidate: {CANDIDATE_PATH}
{GOAL_AND_CONSTRAINTS}

{TASK_QA_BLOCK}

Answer in this JSON format:
{CHECKPOINT_JSON_FORMAT}
"""


def write_micon_templates(templates: Path, tasks=None) -> Path:
    """A small templates folder of our own (not the released texts) with the right checkpoint ids."""
    from dar.eval.micon.prompts import QA_FILES

    (templates / "Q&A").mkdir(parents=True, exist_ok=True)
    (templates / "judge_prompt.template.txt").write_text(JUDGE_TEMPLATE, encoding="utf-8")
    for task in tasks or TASKS:
        spec = TASKS[task]
        lines = ["[Checks]"]
        for dim in spec.dimensions:
            for cp in spec.checkpoints(dim):
                mark = " (hard)" if cp in spec.hard else ""
                lines.append(f"- {cp}{mark}: is requirement {cp} met?")
        (templates / "Q&A" / QA_FILES[task]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return templates


def build_micon(root: Path, cases_per_task: dict[str, int], model: str = "model_x", missing: set[tuple[str, str]] = frozenset()) -> dict[str, Path]:
    """data/, templates/, generations/<model>/ for a tiny MICON-Bench; returns the paths."""
    data = root / "data"
    gens = root / "generations"
    story_entries = []
    for task, n in cases_per_task.items():
        for i in range(n):
            case_id = f"case_{i:04d}"
            ref_a = make_png(data / task / "refs" / f"{case_id}_RA.png", (10 * i % 255, 20, 30))
            make_png(data / task / "refs" / f"{case_id}_RB.png", (30, 10 * i % 255, 20))
            card = {
                "task_type": task,
                "case_id": case_id,
                "refs": {"RA": f"data/{task}/refs/{ref_a.name}", "RB": f"data/{task}/refs/{case_id}_RB.png"},
                "generation_prompt": f"Compose the subjects of RA and RB ({task} {case_id}).",
                "goal": "Combine both references.",
                "constraints_hard": ["Both subjects appear."],
                "constraints_soft": ["Natural lighting."],
                "expectation_list": ["Subject A visible"],
                "participating_dimensions": list(TASKS[task].dimensions),
            }
            (data / task / "cases").mkdir(parents=True, exist_ok=True)
            (data / task / "cases" / f"{case_id}.yaml").write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
            if (task, case_id) not in missing:
                make_png(gens / model / task / f"{case_id}.png", (i * 7 % 255, 100, 100))
            if task == "story_infer":
                story_entries.append(
                    {
                        "case_id": case_id,
                        "background_summary": "A ball rolls toward a cliff.",
                        "positive_candidates": ["The ball falls off the cliff."],
                        "negative_candidates": ["The ball flies upward."],
                    }
                )
    if story_entries:
        (data / "story_infer").mkdir(parents=True, exist_ok=True)
        (data / "story_infer" / "simple_candidate_template.json").write_text(json.dumps({"cases": story_entries}), encoding="utf-8")
    templates = write_micon_templates(root / "templates", list(cases_per_task))
    return {"data": data, "templates": templates, "generations": gens}


CHECKPOINT_IN_PROMPT = re.compile(r'"([A-G]_check_\d+)": \{"pass"')
CASE_IN_PROMPT = re.compile(r"generated for case (\S+?)\)")
TASK_IN_PROMPT = re.compile(r"Task: (\S+)")


def micon_reply(prompt: str, fails: dict[tuple[str, str], set[str]] | None = None, candidate: float = 8.0) -> str:
    """A plausible judge reply: every checkpoint in the prompt's JSON skeleton passes except ``fails``."""
    if "acceptable next steps" in prompt:
        return json.dumps({"score": candidate, "reasoning": "matches", "matches_positive": True, "matches_negative": False})
    ids = CHECKPOINT_IN_PROMPT.findall(prompt)
    case = CASE_IN_PROMPT.search(prompt)
    task = TASK_IN_PROMPT.search(prompt)
    failed = (fails or {}).get((task.group(1) if task else "", case.group(1) if case else ""), set())
    results = {cp: {"pass": 0 if cp in failed else 1} for cp in ids}
    return "Here is my verdict:\n```json\n" + json.dumps({"checkpoint_results": results, "rationale_short": "ok"}) + "\n```"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


@dataclass
class MicoFixture:
    bench: Path
    results: Path
    model: str
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def build_mico(root: Path, model: str = "model_y", groups: dict[str, list[dict[str, Any]]] | None = None) -> MicoFixture:
    """A tiny MICo-Bench: manifests in the released format, source/reference images, outputs."""
    bench = root / "MICo-Bench"
    results = root / "results"
    if groups is None:
        groups = {
            "mico_bench_hoi": [
                {"idx": 0, "input": ["mico_bench_hoi/0/0.png", "mico_bench_hoi/0/1.png"], "reference": "mico_bench_hoi/0/reference.png",
                 "Task": "HOI", "editing_type": "1 Human + 1 Object", "prompt": "A man holds a cup.", "human_indices": [0]},
                {"idx": 1, "input": ["mico_bench_hoi/1/0.png", "mico_bench_hoi/1/1.png"], "reference": "mico_bench_hoi/1/reference.png",
                 "Task": "HOI", "editing_type": "1 Human + 1 Object", "prompt": "A woman rides a bike.", "human_indices": [0]},
            ],
            "mico_bench_dere": [
                {"ed_idx": 7, "input": ["mico_bench_dere/7/0.png", "mico_bench_dere/7/1.png", "mico_bench_dere/7/2.png"],
                 "reference": "mico_bench_dere/7/reference.png", "Task": "De&Re", "editing_type": "recompose",
                 "prompt": "old prompt", "refined_prompt": "Two friends at a cafe with a red umbrella.", "human_indices": [0, 1]},
            ],
        }
    fixture = MicoFixture(bench=bench, results=results, model=model, records=groups)
    for g, (group, records) in enumerate(groups.items()):
        write_jsonl(bench / f"{group}.jsonl", records)
        for i, rec in enumerate(records):
            # distinct pixels per case, so no two cases share a judge question (and its cache entry)
            for k, rel in enumerate(rec["input"]):
                make_png(bench / rel, (40 * k % 255, 10 * g, 10 * i))
            make_png(bench / rec["reference"], (1, 10 * g, 10 * i))
            case_id = str(rec.get("idx", rec.get("ed_idx")))
            make_png(results / model / group / f"{case_id}.png", (9, 10 * g, 10 * i))
    return fixture
