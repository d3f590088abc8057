"""Every path a manifest or card names stays inside its benchmark folder; bad cases are input errors (issue 15, item 3)."""

import os
from pathlib import Path

import pytest
import yaml
from tests.eval.eval_fakes import ScriptedJudge, build_micon, make_png, micon_reply, write_jsonl

from dar.eval.inputs import case_id_problem, image_content_problem, image_path_problem
from dar.eval.jobs import benchmark_jobs
from dar.eval.mico import run_mico
from dar.eval.micon import run_micon
from dar.eval.report import summarize
from dar.eval.runs import RunStore

GROUP = "mico_bench_object_centric"
SECRET_TEXT = b"TOP SECRET: not an image, and outside the benchmark folder"


def mico_reply(prompt, images):
    if "Answer with exactly one word" in prompt:
        return "yes"
    return "[8, 8]"


def good_case(bench, results, model, idx):
    record = {"idx": idx, "input": [f"{GROUP}/{idx}/0.png"], "reference": f"{GROUP}/{idx}/reference.png",
              "prompt": f"Object {idx}.", "human_indices": []}
    make_png(bench / GROUP / str(idx) / "0.png", (idx, 1, 1))
    make_png(bench / GROUP / str(idx) / "reference.png", (idx, 2, 2))
    make_png(results / model / GROUP / f"{idx}.png", (idx, 3, 3))
    return record


def mico_bad_case(tmp_path, bench, results, model, kind):
    """A manifest line of the given kind, with files laid out so that the old code would read (or crash on) them."""
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(SECRET_TEXT)
    record = good_case(bench, results, model, 9)
    if kind == "dotdot input":
        record["input"] = ["../outside/secret.png"]
    elif kind == "absolute input":
        record["input"] = [str(secret)]
    elif kind == "dotdot reference":
        record["reference"] = "../outside/secret.png"
    elif kind == "symlinked reference":
        link = bench / GROUP / "9" / "linked.png"
        os.symlink(secret, link)
        record["reference"] = f"{GROUP}/9/linked.png"
    elif kind == "reference without image extension":
        make_png(bench / GROUP / "9" / "reference")
        record["reference"] = f"{GROUP}/9/reference"
    elif kind == "absolute case id":
        record["idx"] = str(tmp_path / "outside" / "secret")  # the output would be <that>.png, the secret
    elif kind == "dotdot case id":
        record["idx"] = "../../../outside/secret"
    elif kind == "non-image inside the folder":
        (bench / GROUP / "9" / "0.png").write_bytes(SECRET_TEXT)
    else:
        raise AssertionError(kind)
    return record


MICO_KINDS = ["dotdot input", "absolute input", "dotdot reference", "symlinked reference",
              "reference without image extension", "absolute case id", "dotdot case id", "non-image inside the folder"]


@pytest.mark.parametrize("kind", MICO_KINDS)
def test_mico_case_naming_files_outside_the_benchmark_is_an_input_error_and_the_run_goes_on(tmp_path, kind):
    bench, results, model = tmp_path / "bench", tmp_path / "results", "m"
    bad = mico_bad_case(tmp_path, bench, results, model, kind)
    write_jsonl(bench / f"{GROUP}.jsonl", [good_case(bench, results, model, 0), bad, good_case(bench, results, model, 1)])
    judge = ScriptedJudge(mico_reply)
    run_mico(bench_dir=bench, results_dir=results, model=model, out_dir=tmp_path / "run", judge=judge, progress=False)

    store = RunStore.load(tmp_path / "run")
    records = {r["case_id"]: r for r in store.records()}
    assert records["0"]["status"] == records["1"]["status"] == "ok"
    bad_record = records[str(bad["idx"])]
    assert bad_record["status"] == "input_error" and bad_record["score"] is None, bad_record
    assert bad_record["failures"][0]["stage"] == "inputs" and bad_record["failures"][0]["error"]
    # nothing outside the benchmark and results folders reached the judge, and no non-image did
    sent = {Path(p).resolve() for _, paths, _ in judge.calls for p in paths}
    assert all(p.is_relative_to(bench.resolve()) or p.is_relative_to(results.resolve()) for p in sent)
    assert all(image_content_problem(p) is None for p in sent)
    assert len(judge.calls) == 2 * 3
    assert summarize(store)["overall"]["input_errors"] == 1


def micon_card(data, task, case_id, refs):
    card = {"task_type": task, "case_id": case_id, "refs": refs, "generation_prompt": "Compose them.",
            "participating_dimensions": ["A"]}
    (data / task / "cases" / f"bad_{len(list((data / task / 'cases').glob('bad_*')))}.yaml").write_text(yaml.safe_dump(card))


def test_micon_cards_naming_files_outside_the_data_folder_are_input_errors_and_the_run_goes_on(tmp_path):
    task = "object_composition"
    paths = build_micon(tmp_path / "b", {task: 1})
    data, gens = paths["data"], paths["generations"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET_TEXT)
    make_png(data / task / "refs" / "no_extension")
    (data / task / "refs" / "fake.png").write_bytes(SECRET_TEXT)
    good_ref = f"data/{task}/refs/case_0000_RA.png"
    bad = {
        "dotdot_ref": {"RA": good_ref, "RB": "../../secret.png"},
        "absolute_ref": {"RA": str(secret)},
        "ref_without_extension": {"RA": f"{task}/refs/no_extension"},
        "not_an_image": {"RA": f"{task}/refs/fake.png"},
        "../../../secret": {"RA": good_ref},
        str(tmp_path / "secret"): {"RA": good_ref},
    }
    for case_id, refs in bad.items():
        micon_card(data, task, case_id, refs)
        if "/" not in case_id:  # an output to find, so only the paths make these cases bad
            make_png(gens / "model_x" / task / f"{case_id}.png")
    judge = ScriptedJudge(lambda prompt, images: micon_reply(prompt))
    run_micon(data_dir=data, templates_dir=paths["templates"], generations_dir=gens, model="model_x",
              out_dir=tmp_path / "run", judge=judge, progress=False)
    records = {r["case_id"]: r for r in RunStore.load(tmp_path / "run").records()}
    assert records["case_0000"]["status"] == "ok"
    for case_id in bad:
        assert records[case_id]["status"] == "input_error", records[case_id]
    sent = {Path(p).resolve() for _, paths_, _ in judge.calls for p in paths_}
    assert secret.resolve() not in sent and (data / task / "refs" / "fake.png").resolve() not in sent
    assert len(judge.calls) == 1


def test_generation_leaves_unsafe_cases_out_with_a_warning(tmp_path):
    bench, results = tmp_path / "bench", tmp_path / "results"
    bad = mico_bad_case(tmp_path, bench, results, "m", "dotdot input")
    write_jsonl(bench / f"{GROUP}.jsonl", [good_case(bench, results, "m", 0), bad])
    with pytest.warns(RuntimeWarning, match=r"mico_bench_object_centric/'9' is not generated: input 0 .*outside"):
        jobs = benchmark_jobs("mico", bench)
    assert [j.case_id for j in jobs] == ["0"]


def test_rules(tmp_path):
    assert case_id_problem("case_0001") is None and case_id_problem("12") is None
    for bad in ("", " ", ".", "..", "a/b", "../x", "/abs", "a\\b", "a\x00b"):
        assert case_id_problem(bad) is not None, bad
    root = tmp_path / "root"
    make_png(root / "a" / "x.png")
    assert image_path_problem(root, root / "a" / "x.png", "input 0") is None
    assert image_path_problem(root, root / "a" / ".." / "a" / "x.JPG", "input 0") is None
    assert "outside" in image_path_problem(root, root / ".." / "x.png", "input 0")
    assert "outside" in image_path_problem(root, tmp_path / "x.png", "input 0")
    assert "not an image path" in image_path_problem(root, root / "a" / "x", "reference")
    assert "not an image path" in image_path_problem(root, root / "a" / "x.gif", "reference")
    assert image_content_problem(root / "a" / "x.png") is None
    (root / "t.png").write_bytes(b"hello")
    assert "not a PNG, JPEG or WebP" in image_content_problem(root / "t.png")
