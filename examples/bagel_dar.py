"""BAGEL with several reference images: DAR off and on side by side, plus heatmaps.

Needs your install of BAGEL (github.com/ByteDance-Seed/Bagel), its weights and a CUDA GPU. BAGEL's
loading code lives in its repository (see its README / app.py), so this example asks for it: pass
``--loader module:function``, a function of yours (importable, e.g. a file next to BAGEL's checkout)
that loads the model and returns BAGEL's ``InterleaveInferencer``. DAR is enabled before the context is
built, as the binding requires (docs/models.md). Example:

    python examples/bagel_dar.py --loader my_bagel:load --images person.png hat.png \\
        --prompt "The person from image 1 wears the hat from image 2" --out out/bagel_dar
"""

from __future__ import annotations

import argparse
import importlib
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--loader", required=True, help="module:function returning BAGEL's InterleaveInferencer")
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (image 1, 2, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=50, help="num_timesteps")
    p.add_argument("--cfg-text-scale", type=float, default=4.0)
    p.add_argument("--cfg-img-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.15)
    p.add_argument("--tau-high", type=float, default=0.7)
    p.add_argument("--tau-low", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"))
    p.add_argument("--heatmap-step", type=int, default=None, help="step drawn in the heatmaps (default: middle)")
    p.add_argument("--out", default="bagel_dar", help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    import dar

    module, _, fn = args.loader.partition(":")
    inferencer = getattr(importlib.import_module(module), fn)()
    refs = [Image.open(path).convert("RGB") for path in args.images]

    def generate():
        torch.manual_seed(args.seed)  # BAGEL draws its initial noise from the global generator
        out = inferencer.interleave_inference([*refs, args.prompt], num_timesteps=args.steps,
                                              cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale)
        return out[-1]

    off = generate()
    cfg = dar.DARConfig(gamma=args.gamma, tau_high=args.tau_high, tau_low=args.tau_low, num_samples=args.num_samples)
    step = args.steps // 2 if args.heatmap_step is None else args.heatmap_step
    recorder = dar.Recorder(steps=[step])
    with dar.rebalanced(inferencer, cfg, backend=args.backend, recorder=recorder):
        on = generate()

    os.makedirs(args.out, exist_ok=True)
    off.save(os.path.join(args.out, "dar_off.png"))
    on.save(os.path.join(args.out, "dar_on.png"))
    pair = Image.new("RGB", (off.width + on.width, max(off.height, on.height)), "white")
    pair.paste(off, (0, 0))
    pair.paste(on, (off.width, 0))
    pair.save(os.path.join(args.out, "off_vs_on.png"))
    # Each reference is written as VAE then ViT tokens: the maps come in that order per image.
    recorder.plot_heatmaps(images=[im for im in refs for _ in ("vae", "vit")],
                           path=os.path.join(args.out, "heatmaps.png"), step=step, row=0)
    print(recorder.summary(group_by="layer"))
    print(f"wrote {args.out}/off_vs_on.png (left: DAR off, right: DAR on) and {args.out}/heatmaps.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
