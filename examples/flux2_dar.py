"""FLUX.2 with reference images: DAR off and on side by side, plus heatmaps.

Needs the FLUX.2 weights (black-forest-labs/FLUX.2-dev, gated on the Hugging Face Hub; or a local
folder) and a large CUDA GPU (--offload for less memory). FLUX.2 takes up to ten reference images;
the binding finds them from the transformer's ``img_ids`` (reference tokens carry a non-zero time
coordinate). Example:

    python examples/flux2_dar.py --images dog.png sofa.png \\
        --prompt "the dog from image 1 sleeping on the sofa from image 2" --out out/flux2_dar
"""

from __future__ import annotations

import argparse

from dar.ab import add_dar_options, place, run_off_on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (up to 10)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default="black-forest-labs/FLUX.2-dev", help="hub id or local folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    add_dar_options(p, "flux2_dar")
    args = p.parse_args(argv)
    if len(args.images) > 10:
        p.error(f"FLUX.2 takes at most 10 reference images, got {len(args.images)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers import Flux2Pipeline
    from PIL import Image

    refs = [Image.open(path).convert("RGB") for path in args.images]
    pipe = Flux2Pipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    place(pipe, args.offload)
    call = dict(image=refs, prompt=args.prompt, guidance_scale=args.guidance_scale, height=args.height,
                width=args.width, num_inference_steps=args.steps)
    return run_off_on(pipe, call, refs, args)


if __name__ == "__main__":
    raise SystemExit(main())
