"""``dar demo``: DAR off and on through a small Qwen-Image-Edit-architecture transformer, with heatmaps.

Nothing is downloaded. The transformer is diffusers' ``QwenImageTransformer2DModel`` built from a
configuration with seeded random weights; the three reference images are drawn here and turned into
latent tokens by a fixed random projection of their pixels (a stand-in for the VAE, so that token
content follows the pictures). The demo runs a few flow-matching denoising steps with DAR off and
on through ``dar.enable``, checks the DAR output against the reference backend and gamma=0 against
DAR off, prints per-layer statistics and timings, and writes the heatmap PNG.

Random weights show the mechanism (which keys are boosted or damped and how attention moves between
the reference images), not image quality.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time

NOTE = ("note: the transformer has random weights: this shows the DAR mechanism (token layouts, key "
        "weights, how attention moves between the reference images), not image quality.")

# Model presets: a CPU one that runs in seconds on two cores and a larger CUDA one.
PRESETS = {
    "cpu": dict(layers=4, heads=4, head_dim=32, size=256, text_len=24),
    "cuda": dict(layers=12, heads=12, head_dim=64, size=512, text_len=64),
}
Z_DIM, TEXT_DIM = 16, 64  # latent channels (as Qwen-Image's VAE) and the stand-in text-encoder width


@dataclasses.dataclass
class DemoInputs:
    kwargs: dict  # transformer forward arguments except hidden_states/timestep
    noise: "torch.Tensor"  # noqa: F821  (B, L_gen, 4 * Z_DIM)
    ref_latents: "torch.Tensor"  # noqa: F821  (B, L_ref, 4 * Z_DIM)
    gen_grid: tuple[int, int]
    ref_grids: list[tuple[int, int]]
    num_text: list[int]


def _parser() -> argparse.ArgumentParser:
    from .config import CHOICES, FIELD_HELP, DARConfig

    p = argparse.ArgumentParser(
        prog="dar demo", allow_abbrev=False,
        description="DAR off/on through a small random-weight Qwen-Image-Edit-architecture transformer: "
                    "checks against the reference backend, per-layer statistics, timings and a heatmap PNG.")
    p.add_argument("--out", default="dar_demo", help="output folder (default ./dar_demo); the PNG is <out>/heatmaps.png")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available (a larger model), else cpu")
    p.add_argument("--size", type=int, default=None,
                   help="generated image size in pixels, a multiple of 16 (default 256 on cpu, 512 on cuda); "
                        "each reference image gets about the same number of tokens")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4 cpu / 12 cuda)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4 cpu / 12 cuda)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim, a multiple of 8 (default 32 cpu / 64 cuda)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, images, latents and text (default 0)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "flex", "reference"),
                   help="backend for DAR on (default auto); checked against backend='reference'")
    g = p.add_argument_group("DARConfig", "the knobs of dar.DARConfig (docs/semantics.md)")
    for field in dataclasses.fields(DARConfig):
        # --seed is the demo's own (weights, images); the sampler's seed is --sample-seed.
        flag = "--sample-seed" if field.name == "seed" else "--" + field.name.replace("_", "-")
        choices = CHOICES.get(field.name)
        g.add_argument(flag, dest=field.name, default=field.default, choices=choices,
                       type=None if choices else type(field.default),
                       help=f"{FIELD_HELP[field.name]} (default: %(default)s)")
    p.add_argument("--plot-layers", default=None,
                   help="comma-separated layer indices averaged in the heatmaps, or 'all' (default: the layer "
                        "where DAR moves the most attention between the reference images)")
    p.add_argument("--plot-step", default=None,
                   help="step shown in the heatmaps, or 'all' to average the steps (default: the last step)")
    p.add_argument("--check-all-steps", action="store_true",
                   help="check against the reference backend at every step (default: the first step)")
    p.add_argument("--verbose", action="store_true", help="print the statistics of every step and layer")
    return p


def _grid_for(area_tokens: int, ratio: float) -> tuple[int, int]:
    """Token grid (h, w) with about ``area_tokens`` tokens and width/height ``ratio``."""
    w = max(1, round(math.sqrt(area_tokens * ratio)))
    h = max(1, round(area_tokens / w))
    return h, w


def _pseudo_latents(image, grid: tuple[int, int], proj, bias):
    """Packed (h*w, 4*Z) tokens of ``image``: pixels at 2x the token grid, projected to Z channels.

    A fixed random projection instead of a VAE keeps the demo download-free while making each
    reference token's content follow the picture (colours and edges), so heatmaps line up with shapes.
    """
    import numpy as np
    import torch

    h, w = grid
    px = torch.from_numpy(np.asarray(image.convert("RGB").resize((2 * w, 2 * h)), dtype=np.float32) / 127.5 - 1.0)
    z = torch.tanh(px @ proj + bias)  # (2h, 2w, Z)
    # Pack 2x2 latent patches into one token, channel-major as the Qwen-Image pipelines do.
    z = z.permute(2, 0, 1).reshape(Z_DIM, h, 2, w, 2).permute(1, 3, 0, 2, 4)
    return z.reshape(h * w, Z_DIM * 4)


def build_inputs(images, size: int, text_len: int, seed: int, device, batch: int = 2) -> DemoInputs:
    """Latent tokens of the images, noise, and a 2-row text batch (row 1 shorter, padded: like CFG)."""
    import torch

    if size % 16:
        raise ValueError(f"--size must be a multiple of 16, got {size}")
    g = torch.Generator().manual_seed(seed + 1)
    gen_grid = (size // 16, size // 16)
    area = gen_grid[0] * gen_grid[1]
    proj = torch.randn(3, Z_DIM, generator=g) * 1.5
    bias = torch.randn(Z_DIM, generator=g) * 0.3
    ref_grids, refs = [], []
    for img in images:
        grid = _grid_for(area, img.width / img.height)
        ref_grids.append(grid)
        refs.append(_pseudo_latents(img, grid, proj, bias))
    ref_latents = torch.cat(refs)[None].expand(batch, -1, -1).contiguous()
    noise = torch.randn(batch, area, Z_DIM * 4, generator=g)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=g)
    num_text = [text_len] + [max(1, text_len * 2 // 3)] * (batch - 1)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for b, n in enumerate(num_text):
        mask[b, :n] = 1
    img_shapes = [[(1, *gen_grid), *[(1, *rg) for rg in ref_grids]]] * batch
    kwargs = dict(encoder_hidden_states=text.to(device), encoder_hidden_states_mask=mask.to(device),
                  img_shapes=img_shapes, return_dict=False)
    return DemoInputs(kwargs, noise.to(device), ref_latents.to(device), gen_grid, ref_grids, num_text)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model, inputs: DemoInputs, latents, sigma: float, device):
    """One transformer call on [noisy latents, reference latents]; returns (velocity, seconds)."""
    import torch

    x = torch.cat([latents, inputs.ref_latents], dim=1)
    t = torch.full((latents.shape[0],), sigma, device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, **inputs.kwargs)[0]
    _sync(device)
    return out[:, : latents.shape[1]], time.perf_counter() - start


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _int_list(text):
    """None, "all", or a list of ints from "1,2"."""
    if text is None or text == "all":
        return text
    return [int(x) for x in text.split(",") if x.strip()]


def _fmt(sel) -> str:
    return sel if isinstance(sel, str) else ",".join(map(str, sel))


def _most_shifted_layer(records: list[dict]) -> int:
    """The layer whose reference-image attention shares DAR changes the most (sum of |after - before|)."""
    best = max(records, key=lambda r: sum(abs(a - b) for a, b in zip(r["mass_after"], r["mass_before"])))
    return best["layer"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    import dar
    from .extras import require

    require("diffusers", "diffusers", "dar demo")  # the demo's model is a diffusers transformer
    require("matplotlib", "diffusers", "dar demo")  # for the heatmaps
    from .tiny import build_tiny_transformer, synthetic_reference_images

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("dar demo: --device cuda was asked for but torch.cuda.is_available() is False")
        device = torch.device(args.device)
    preset = dict(PRESETS["cuda" if device.type == "cuda" else "cpu"])
    for key in ("layers", "heads", "head_dim", "size"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["head_dim"] % 8 or preset["head_dim"] < 8:
        raise SystemExit(f"dar demo: --head-dim must be a positive multiple of 8, got {preset['head_dim']}")
    if args.steps < 1:
        raise SystemExit(f"dar demo: --steps must be >= 1, got {args.steps}")
    try:
        cfg = dar.DARConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(dar.DARConfig)})
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"dar demo: {exc}") from None
    try:
        plot_layers = _int_list(args.plot_layers)
        plot_step = _int_list(args.plot_step)
    except ValueError:
        raise SystemExit("dar demo: --plot-layers / --plot-step take comma-separated ints or 'all'") from None
    for name, sel, n in (("--plot-step", plot_step, args.steps), ("--plot-layers", plot_layers, preset["layers"])):
        if isinstance(sel, list) and (not sel or not all(0 <= x < n for x in sel)):
            raise SystemExit(f"dar demo: {name} must hold indices in 0..{n - 1}, got {sel}")

    print("dar demo: Dynamic Attention Rebalancing on a small Qwen-Image-Edit-architecture transformer")
    print(NOTE)
    t_build = time.perf_counter()
    model = build_tiny_transformer(z_dim=Z_DIM, text_dim=TEXT_DIM, num_layers=preset["layers"],
                                   num_heads=preset["heads"], head_dim=preset["head_dim"], seed=args.seed)
    model = model.to(device)
    images = synthetic_reference_images(preset["size"])
    inputs = build_inputs(images, preset["size"], preset["text_len"], args.seed, device)
    n_gen = inputs.gen_grid[0] * inputs.gen_grid[1]
    n_ref = [h * w for h, w in inputs.ref_grids]
    print(f"device {device}; model: {preset['layers']} blocks, {preset['heads']} heads x {preset['head_dim']} "
          f"(random, seed {args.seed}); built in {time.perf_counter() - t_build:.1f}s")
    print(f"tokens per row: text {inputs.num_text} (row 1 padded, like a CFG batch), generated "
          f"{inputs.gen_grid[0]}x{inputs.gen_grid[1]}={n_gen}, references "
          + ", ".join(f"{h}x{w}={h * w}" for h, w in inputs.ref_grids)
          + f"; joint sequence {preset['text_len'] + n_gen + sum(n_ref)}")
    print(f"config: {cfg}")
    print(f"backend for DAR on: {args.backend} (checked against backend='reference')\n")

    # One copy of the model per variant, each enabled once: a transformer enabled on its own counts
    # one step per forward call, so the recorded step index is the denoising step. The copies have
    # equal weights, and DAR on one model must not affect another (the DAR-off `model`).
    recorder = dar.Recorder()
    variants = {name: copy.deepcopy(model) for name in ("on", "recorded", "reference", "gamma0")}
    dar.enable(variants["on"], cfg, backend=args.backend)
    dar.enable(variants["recorded"], cfg, backend=args.backend, recorder=recorder)
    dar.enable(variants["reference"], cfg, backend="reference")
    dar.enable(variants["gamma0"], cfg.replace(gamma=0.0), backend=args.backend)
    sigmas = [1.0 - i / args.steps for i in range(args.steps + 1)]
    x_off = inputs.noise.clone()
    x_on = inputs.noise.clone()
    checks: list[tuple[str, float, float]] = []  # (what, error, tolerance)
    tol_ref = 1e-4 if device.type == "cpu" else 5e-3
    tol_zero = 1e-5 if device.type == "cpu" else 1e-4
    label_on = f"DAR on ({args.backend})"
    times: dict[str, list[float]] = {"DAR off": [], label_on: [], "DAR on + Recorder": [], "DAR on (reference)": []}
    changes = []
    try:
        for i in range(args.steps):
            sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
            v_off, t = _forward(model, inputs, x_off, sigma, device)
            times["DAR off"].append(t)
            v_on, t = _forward(variants["on"], inputs, x_on, sigma, device)
            times[label_on].append(t)
            v_rec, t = _forward(variants["recorded"], inputs, x_on, sigma, device)
            times["DAR on + Recorder"].append(t)
            checks.append((f"step {i}: recording leaves the DAR output unchanged", _rel_err(v_rec, v_on), 1e-6))
            if i == 0 or args.check_all_steps:  # the reference backend is slow (full Lq x Lk attention)
                v_ref, t = _forward(variants["reference"], inputs, x_on, sigma, device)
                times["DAR on (reference)"].append(t)
                checks.append((f"step {i}: DAR on ({args.backend}) vs the reference backend",
                               _rel_err(v_on, v_ref), tol_ref))
            v_zero, _ = _forward(variants["gamma0"], inputs, x_off, sigma, device)
            checks.append((f"step {i}: gamma=0 vs DAR off", _rel_err(v_zero, v_off), tol_zero))
            v_off_here = v_off if i == 0 else _forward(model, inputs, x_on, sigma, device)[0]
            changes.append(_rel_err(v_on, v_off_here))
            x_off = x_off + dt * v_off
            x_on = x_on + dt * v_on
    finally:
        for m in variants.values():
            dar.disable(m)
    # disable restores the original behaviour exactly.
    v_back, _ = _forward(variants["on"], inputs, x_on, sigmas[-2], device)
    v_orig, _ = _forward(model, inputs, x_on, sigmas[-2], device)
    checks.append(("after dar.disable, the model gives the DAR-off output bit for bit", _rel_err(v_back, v_orig), 0.0))

    print("per-layer statistics (averaged over steps and the two batch rows):")
    print(recorder.summary(group_by="layer"))
    if args.verbose or len(recorder) <= 24:
        print("\nper step and layer (row 0: full text, row 1: padded text):")
        print(recorder.summary())
    else:
        print("(--verbose prints every step and layer)")
    print("\nmass = share of the sampled generated-image queries' attention that lands on each reference image, "
          "before->after DAR")
    print("\nDAR changes the transformer's velocity by "
          + ", ".join(f"{c:.2%}" for c in changes) + " (max |on - off| / max |off|, per step)")

    print("\ntimings per transformer call, seconds, one per step (the first includes warm-up; wall clock, "
          "so other load on the machine shows):")
    for name, ts in times.items():
        print(f"  {name:<22} " + "  ".join(f"{t:.3f}" for t in ts))

    print("\nchecks:")
    ok = True
    for what, err, tol in checks:
        passed = err <= tol
        ok &= passed
        print(f"  [{'ok' if passed else 'FAIL'}] {what}: relative max error {err:.2e} (tolerance {tol:.0e})")
    if cfg.gamma > 0 and max(changes) == 0.0:
        ok = False
        print("  [FAIL] DAR on (gamma > 0) gave exactly the DAR-off output")

    path = os.path.join(args.out, "heatmaps.png")
    if plot_step is None:
        plot_step = [args.steps - 1]
    step_sel = None if plot_step == "all" else plot_step
    if plot_layers is None:
        plot_layers = [_most_shifted_layer(recorder.records(steps=step_sel, rows=0))]
    recorder.plot_heatmaps(images=images, path=path, step=step_sel,
                           layers=None if plot_layers == "all" else plot_layers, row=0)
    print(f"\nheatmaps: {path}  (step {_fmt(plot_step)}, layer {_fmt(plot_layers)}, batch row 0; "
          "see docs/demo.md for how to read them)")
    print(NOTE)
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
