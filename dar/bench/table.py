"""The README's performance table, generated from committed result JSONs (never written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
DAR_IMPLS = ("dar-triton", "dar-torch", "dar-flex")
E2E_BACKENDS = ("triton", "torch", "flex")


def load_results(folder: Path) -> list[dict]:
    """Every ``*.json`` result in ``folder`` (files that are not dar-bench results are ignored)."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not readable JSON: {exc}") from exc
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("dar-bench/"):
            data["_file"] = path.name
            out.append(data)
    return out


def latest(results: list[dict]) -> list[dict]:
    """The newest result per (kind, device, mode), GPU results first."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["kind"], r["device_slug"], r["mode"])
        if key not in best or r["created"] > best[key]["created"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["device"]["type"] != "cuda", r["kind"] != "kernels",
                                                r["device_slug"], r["mode"]))


def _heading(r: dict) -> str:
    commit = (r["git"].get("commit") or "?")[:7]
    ver = r["versions"]
    dirty = " + uncommitted changes" if r["git"].get("dirty") else ""
    line = (f"**{'Kernels' if r['kind'] == 'kernels' else 'End-to-end step'} — {r['device']['name']}** "
            f"(commit `{commit}`{dirty}, torch {ver.get('torch')}, triton {ver.get('triton')}, {r['created'][:10]}, "
            f"`benchmarks/results/{r.get('_file', '?')}`)")
    if r["mode"] == "quick":
        line += "  \n*CPU quick mode: a smoke run of the harness on tiny shapes, not a performance claim.*"
    elif r["device"]["type"] == "cpu":
        dev = r["device"]
        line += (f"  \n*CPU, {dev.get('threads')} thread(s) on a {dev.get('cores')}-core machine shared with other jobs "
                 f"(possibly contended; load average {dev.get('load_avg_start')} at the start): implementations "
                 f"interleaved, so ratios within the run compare; medians over {r['config']['reps']} calls, IQR in "
                 f"the JSON.*")
    return line


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"]
    ratio = row.get("overhead_vs_best_sdpa")
    interp = " interpreted" if row.get("interpreted") else ""
    cpu = row.get("cpu_overhead_vs_best_sdpa")
    cpu_txt = f"; CPU time {cpu:.2f}×" if cpu is not None else ""
    return f"{row['median_ms']:.3g} ms" + (f" ({ratio:.2f}×{cpu_txt})" if ratio is not None else "") + interp


def _keep_shape(shape: dict, all_shapes: bool) -> bool:
    if all_shapes or shape["family"] != "sweep":
        return True
    return shape["head_dim"] == 128 and shape["dtype"] == "bf16"  # the README shows one sweep slice


def _columns(r: dict) -> list[str]:
    """The implementation columns of a result: DAR ones (every mode run), then plain flex and eager."""
    present = list(dict.fromkeys(x["impl"] for x in r["results"]))
    dar = [n for n in present if n.startswith("dar-") and n != "dar-weights"]
    dar.sort(key=lambda n: (DAR_IMPLS.index(n.split(":")[0]) if n.split(":")[0] in DAR_IMPLS else len(DAR_IMPLS), n))
    return dar + [n for n in ("dar-weights", "flex", "eager") if n in present]


def _label(name: str) -> str:
    if name == "dar-weights":
        return "DAR weights alone"
    if name.startswith("dar-"):
        base, _, mode = name.removeprefix("dar-").partition(":")
        return f"DAR {base}" + (f" {mode}" if mode else "")
    return {"flex": "plain flex", "eager": "eager"}.get(name, name)


def kernels_table(r: dict, all_shapes: bool = False) -> list[str]:
    rows = {(x["shape"], x["impl"]): x for x in r["results"]}
    columns = _columns(r)
    lines = [_heading(r), "",
             "| shape | B×Hq/Hkv×D | L | best plain SDPA | " + " | ".join(_label(c) for c in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for s in r["shapes"]:
        if not _keep_shape(s, all_shapes):
            continue
        name = s["name"]
        sdpa = [x for x in r["results"] if x["shape"] == name and x["kind"] == "sdpa" and x["status"] == "ok"]
        best = min(sdpa, key=lambda x: x["median_ms"], default=None)
        best_txt = "–" if best is None else f"{best['median_ms']:.3g} ms ({best['impl'].removeprefix('sdpa-')})"
        cells = [_cell(rows.get((name, i))) for i in columns]
        lines.append(f"| {name} | {s['batch']}×{s['heads_q']}/{s['heads_kv']}×{s['head_dim']} {s['dtype']} | "
                     f"{s['seq']} | {best_txt} | " + " | ".join(cells) + " |")
    lines += ["", "Median time per attention call; (×) = relative to the best plain SDPA backend on the same "
              "shape (the no-DAR ceiling)."]
    return lines


def e2e_table(r: dict) -> list[str]:
    lines = [_heading(r), "", "| model | tokens | DAR off | DAR triton | DAR torch | DAR flex |",
             "|---|---|---|---|---|---|"]
    for m in r["models"]:
        if m["status"] != "ok":
            lines.append(f"| {m['name']} | – | {m['status']} | | | |")
            continue
        runs = {x["backend"]: x for x in m["runs"]}
        cells = []
        for b in ("off", *E2E_BACKENDS):
            x = runs.get(b)
            if x is None:
                cells.append("–")
            elif x["status"] != "ok":
                cells.append(x["status"])
            else:
                ratio = "" if b == "off" else f" ({x['ratio_vs_off']:.3f}×)"
                cells.append(f"{x['median_ms']:.4g} ms{ratio}" + (" interpreted" if x.get("interpreted") else ""))
        tok = m["tokens"]
        lines.append(f"| {m['name']} | {tok['batch']}×{tok['seq']} | " + " | ".join(cells) + " |")
    lines += ["", "One denoising step (transformer forward); (×) = relative to DAR off. Target on H100: ≤ 1.03×."]
    return lines


def build(results: list[dict], all_shapes: bool = False) -> str:
    chosen = latest(results)
    if not chosen:
        return "*No benchmark results committed yet (run `python benchmarks/run.py`).*\n"
    blocks = [kernels_table(r, all_shapes) if r["kind"] == "kernels" else e2e_table(r) for r in chosen]
    if not any(r["device"]["type"] == "cuda" for r in chosen):
        blocks.insert(0, ["*No GPU results yet: the figures below come from CPU runs. "
                          "See docs/benchmarks.md for the command that produces them on an H100/H200.*"])
    body = "\n\n".join("\n".join(b) for b in blocks)
    return "<!-- generated by benchmarks/make_table.py from benchmarks/results/*.json; do not edit -->\n" + body + "\n"


def replace_region(text: str, table: str) -> str:
    """``text`` with everything between the perf-table markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected exactly one {START} ... {END} region (start before end)")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table.rstrip()}\n{END}{tail}"
