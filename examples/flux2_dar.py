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
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (up to 10)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default="black-forest-labs/FLUX.2-dev", help="hub id or local folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.15)
    p.add_argument("--tau-high", type=float, default=0.7)
    p.add_argument("--tau-low", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "flex", "reference"))
    p.add_argument("--heatmap-step", type=int, default=None, help="step drawn in the heatmaps (default: middle)")
    p.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() instead of .to('cuda')")
    p.add_argument("--out", default="flux2_dar", help="output folder")
    args = p.parse_args(argv)
    if len(args.images) > 10:
        p.error(f"FLUX.2 takes at most 10 reference images, got {len(args.images)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers import Flux2Pipeline
    from PIL import Image

    import dar

    refs = [Image.open(path).convert("RGB") for path in args.images]
    pipe = Flux2Pipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    if args.offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda")
    call = dict(image=refs, prompt=args.prompt, guidance_scale=args.guidance_scale, height=args.height,
                width=args.width, num_inference_steps=args.steps)

    def generate():
        return pipe(**call, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]

    off = generate()
    cfg = dar.DARConfig(gamma=args.gamma, tau_high=args.tau_high, tau_low=args.tau_low, num_samples=args.num_samples)
    step = args.steps // 2 if args.heatmap_step is None else args.heatmap_step
    recorder = dar.Recorder(steps=[step])  # one step keeps the per-key maps small
    with dar.rebalanced(pipe, cfg, backend=args.backend, recorder=recorder):
        on = generate()

    os.makedirs(args.out, exist_ok=True)
    pair = Image.new("RGB", (off.width + on.width, max(off.height, on.height)), "white")
    pair.paste(off, (0, 0))
    pair.paste(on, (off.width, 0))
    pair.save(os.path.join(args.out, "off_vs_on.png"))
    recorder.plot_heatmaps(images=refs, path=os.path.join(args.out, "heatmaps.png"), step=step, row=0)
    print(recorder.summary(group_by="layer"))
    print(f"wrote {args.out}/off_vs_on.png (left: DAR off, right: DAR on) and {args.out}/heatmaps.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
