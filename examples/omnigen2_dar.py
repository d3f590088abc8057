"""OmniGen2 with several reference images: DAR off and on side by side, plus heatmaps.

Needs your install of OmniGen2 (github.com/VectorSpaceLab/OmniGen2: run from its checkout or put it on
PYTHONPATH), its weights (a hub id or local folder) and a CUDA GPU. DAR rebalances the main transformer
layers through whichever attention processor OmniGen2 picked (flash-attn varlen, or SDPA without
flash-attn); see docs/models.md. Example:

    python examples/omnigen2_dar.py --images person.png hat.png scene.png \\
        --prompt "The person from image 1 wears the hat from image 2 in the scene of image 3" \\
        --out out/omnigen2_dar
"""

from __future__ import annotations

import argparse

from dar.ab import add_dar_options, place, run_off_on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (image 1, 2, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--model", default="OmniGen2/OmniGen2", help="hub id or local folder of the OmniGen2 weights")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--text-guidance-scale", type=float, default=5.0)
    p.add_argument("--image-guidance-scale", type=float, default=2.0)
    add_dar_options(p, "omnigen2_dar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    try:
        from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel
        from omnigen2.pipelines.omnigen2.pipeline_omnigen2 import OmniGen2Pipeline
    except ImportError as exc:
        raise SystemExit(f"this example needs OmniGen2 importable (run from its checkout or add it to PYTHONPATH): {exc}")

    refs = [Image.open(path).convert("RGB") for path in args.images]
    pipe = OmniGen2Pipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, trust_remote_code=True)
    pipe.transformer = OmniGen2Transformer2DModel.from_pretrained(args.model, subfolder="transformer",
                                                                  torch_dtype=torch.bfloat16)
    place(pipe, args.offload)
    call = dict(prompt=args.prompt, input_images=refs, width=args.width, height=args.height,
                num_inference_steps=args.steps, text_guidance_scale=args.text_guidance_scale,
                image_guidance_scale=args.image_guidance_scale, negative_prompt=args.negative_prompt,
                output_type="pil")
    return run_off_on(pipe, call, refs, args)


if __name__ == "__main__":
    raise SystemExit(main())
