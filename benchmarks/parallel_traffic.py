#!/usr/bin/env python
"""Bytes DAR adds under diffusers' context parallelism, against the model's own attention traffic.

    python benchmarks/parallel_traffic.py            # table on stdout, results in benchmarks/results/
    python benchmarks/parallel_traffic.py --out DIR

Arithmetic, not a measurement: for the Qwen-Image-Edit 3-reference shape (`dar.bench.shapes`) and
2, 4 and 8 ranks split as Ulysses, ring and both, it lists the collectives of one rebalanced attention
call exactly as the binding issues them (`dar_traffic`, the same function the gloo tests check against
the collectives a forward really issues) and diffusers' own (`model_traffic`: Ulysses' four
all-to-alls, the ring's K/V all-gather). Bytes are those one rank sends under ring algorithms
(`dar.parallel.wire_bytes`), the same on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dar import DARConfig
from dar.bench.shapes import qwen_image_edit
from dar.bindings.diffusers import parallel as bp
from dar.parallel import wire_bytes

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = 60  # Qwen-Image-Edit's MMDiT blocks: one joint attention call each per forward
FORWARDS_PER_STEP = 1  # true CFG runs the conditional and unconditional branch as one batch of 2


def splits(world: int):
    yield {"ulysses": world, "ring": 1}
    yield {"ulysses": 1, "ring": world}
    r = 2
    while r < world:
        yield {"ulysses": world // r, "ring": r}
        r *= 2


def rows(configs):
    shape = qwen_image_edit(3)
    layout = shape.layout()
    dtype_bytes = shape.torch_dtype.itemsize
    out = []
    for name, cfg in configs:
        for world in (2, 4, 8):
            for deg in splits(world):
                ring, ulysses = deg["ring"], deg["ulysses"]
                split = bp.Split(shape.text, shape.gen + sum(shape.refs), world)
                slots = bp.rank_slots([layout] * shape.batch, cfg, split, ring, ulysses)
                common = dict(batch=shape.batch, heads=shape.heads_q, head_dim=shape.head_dim, dtype_bytes=dtype_bytes)
                dar_call = sum(wire_bytes(*c) for c in bp.dar_traffic(
                    **common, split=split, ring=ring, ulysses=ulysses, rank_slots=slots,
                    num_groups=1 if cfg.normalize == "joint" else len(shape.refs), thresholds=cfg.thresholds,
                    masked=True))
                model = sum(wire_bytes(*c) for c in bp.model_traffic(**common, seq=shape.seq, ring=ring,
                                                                     ulysses=ulysses))
                out.append({
                    "config": name, "ranks": world, "ulysses": ulysses, "ring": ring,
                    "dar_bytes_per_call": dar_call, "model_bytes_per_call": model,
                    "dar_bytes_per_step": dar_call * LAYERS * FORWARDS_PER_STEP,
                    "model_bytes_per_step": model * LAYERS * FORWARDS_PER_STEP,
                    "fraction": dar_call / model, "sampled_rows_per_ring_member": list(slots),
                })
    return shape, out


def markdown(shape, table) -> str:
    lines = [f"DAR traffic under context parallelism: {shape.name} (B={shape.batch}, {shape.heads_q} heads x "
             f"{shape.head_dim}, {shape.dtype}, L={shape.seq}); bytes one rank sends; "
             f"per step = {LAYERS} attention calls; arithmetic, not measured.", "",
             "| DAR config | ranks | Ulysses x ring | DAR / call | model / call | DAR / step | model / step | DAR / model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['config']} | {r['ranks']} | {r['ulysses']} x {r['ring']} | "
                     f"{r['dar_bytes_per_call'] / 1e6:.3f} MB | {r['model_bytes_per_call'] / 1e6:.1f} MB | "
                     f"{r['dar_bytes_per_step'] / 1e6:.1f} MB | {r['model_bytes_per_step'] / 1e9:.2f} GB | "
                     f"{100 * r['fraction']:.3f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for parallel-traffic.json / .md")
    args = parser.parse_args(argv)
    configs = [("default", DARConfig()), ("per_image, quantile", DARConfig(normalize="per_image",
                                                                          thresholds="quantile"))]
    shape, table = rows(configs)
    text = markdown(shape, table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel-traffic.md").write_text(text)
    (args.out / "parallel-traffic.json").write_text(json.dumps({"shape": shape.describe(), "rows": table}, indent=1))
    worst = max(r["fraction"] for r in table)
    print(f"largest DAR / model fraction: {100 * worst:.3f}% (target <= 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
