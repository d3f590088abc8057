"""DAR off and on, side by side: the A/B the model examples in examples/ share (a module, not a script).

``off_on`` generates twice with the same seed, DAR off then on (so DAR is the only difference),
records one denoising step, and writes ``dar_off.png``, ``dar_on.png``, ``off_vs_on.png`` and
``heatmaps.png`` into the output folder. ``run_off_on`` is that for a diffusers-style pipeline.
"""

from __future__ import annotations

import os


def add_dar_options(p, out_default: str, backends=("auto", "triton", "torch", "flex", "reference"),
                    offload: bool = True) -> None:
    """The seed, DAR's settings, the heatmap step and the output folder (and ``--offload`` for pipelines)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.15)
    p.add_argument("--tau-high", type=float, default=0.7)
    p.add_argument("--tau-low", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=backends)
    p.add_argument("--heatmap-step", type=int, default=None,
                   help="denoising step drawn in the heatmaps (default: the middle step)")
    if offload:
        p.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() instead of .to('cuda')")
    p.add_argument("--out", default=out_default, help="output folder")


def place(pipe, offload: bool):
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda")
    return pipe


def run_off_on(pipe, call: dict, refs, args) -> int:
    """`off_on` for a pipeline called as ``pipe(**call, generator=...)``, seeded with ``args.seed``.
    Row 0 of the heatmaps is the conditional (prompt) pass; with true CFG, row 1 is the negative one."""
    import torch

    def generate():
        return pipe(**call, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]

    return off_on(pipe, generate, refs, args)


def off_on(model, generate, heatmap_images, args) -> int:
    """``generate()`` (one seeded image) with DAR off, then on ``model`` recording one step; the images,
    the pair side by side and the heatmaps of row 0 over ``heatmap_images`` go to ``args.out``."""
    from PIL import Image

    import dar

    off = generate()
    cfg = dar.DARConfig(gamma=args.gamma, tau_high=args.tau_high, tau_low=args.tau_low, num_samples=args.num_samples)
    # Record a single step: the per-key maps of every layer and CFG pass of one step are tens of MB.
    step = args.steps // 2 if args.heatmap_step is None else args.heatmap_step
    recorder = dar.Recorder(steps=[step])
    with dar.rebalanced(model, cfg, backend=args.backend, recorder=recorder):
        on = generate()

    os.makedirs(args.out, exist_ok=True)
    off.save(os.path.join(args.out, "dar_off.png"))
    on.save(os.path.join(args.out, "dar_on.png"))
    pair = Image.new("RGB", (off.width + on.width, max(off.height, on.height)), "white")
    pair.paste(off, (0, 0))
    pair.paste(on, (off.width, 0))
    pair.save(os.path.join(args.out, "off_vs_on.png"))
    recorder.plot_heatmaps(images=heatmap_images, path=os.path.join(args.out, "heatmaps.png"), step=step, row=0)
    print(recorder.summary(group_by="layer"))
    print(f"wrote {args.out}/off_vs_on.png (left: DAR off, right: DAR on) and {args.out}/heatmaps.png")
    return 0
