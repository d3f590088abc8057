"""Qwen-Image-Edit-2509 with several reference images: DAR off and on side by side, plus heatmaps.

Needs the real weights (about 58 GB in bfloat16, fetched by diffusers from the Hugging Face Hub or
read from a local folder) and a CUDA GPU (--offload for GPUs with less memory). Example:

    python examples/qwen_image_edit_dar.py --images person.png hat.png scene.png \\
        --prompt "The person from picture 1 wears the hat from picture 2 in the scene of picture 3" \\
        --out out/qwen_dar
"""

from __future__ import annotations

import argparse

from dar.ab import add_dar_options, place, run_off_on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (Picture 1, 2, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=" ", help="enables true CFG with --true-cfg-scale > 1")
    p.add_argument("--model", default="Qwen/Qwen-Image-Edit-2509", help="hub id or local folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--true-cfg-scale", type=float, default=4.0)
    add_dar_options(p, "qwen_image_edit_dar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    refs = [Image.open(path).convert("RGB") for path in args.images]
    pipe = QwenImageEditPlusPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    place(pipe, args.offload)
    call = dict(image=refs, prompt=args.prompt, negative_prompt=args.negative_prompt,
                true_cfg_scale=args.true_cfg_scale, num_inference_steps=args.steps)
    return run_off_on(pipe, call, refs, args)


if __name__ == "__main__":
    raise SystemExit(main())
