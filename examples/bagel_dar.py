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

from dar.ab import add_dar_options, off_on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--loader", required=True, help="module:function returning BAGEL's InterleaveInferencer")
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (image 1, 2, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=50, help="num_timesteps")
    p.add_argument("--cfg-text-scale", type=float, default=4.0)
    p.add_argument("--cfg-img-scale", type=float, default=2.0)
    # BAGEL's attention is packed (varlen): no flex path; the model is placed by the loader.
    add_dar_options(p, "bagel_dar", backends=("auto", "triton", "torch", "reference"), offload=False)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    module, _, fn = args.loader.partition(":")
    inferencer = getattr(importlib.import_module(module), fn)()
    refs = [Image.open(path).convert("RGB") for path in args.images]

    def generate():
        torch.manual_seed(args.seed)  # BAGEL draws its initial noise from the global generator
        out = inferencer.interleave_inference([*refs, args.prompt], num_timesteps=args.steps,
                                              cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale)
        return out[-1]

    # Each reference is written as VAE then ViT tokens: the maps come in that order per image.
    return off_on(inferencer, generate, [im for im in refs for _ in ("vae", "vit")], args)


if __name__ == "__main__":
    raise SystemExit(main())
