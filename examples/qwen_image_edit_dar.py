"""Qwen-Image-Edit-2509 with several reference images: DAR off and on side by side, plus heatmaps.

Needs the real weights (about 58 GB in bfloat16, fetched by diffusers from the Hugging Face Hub or
read from a local folder) and a CUDA GPU (--offload for GPUs with less memory). Example:

    python examples/qwen_image_edit_dar.py --images person.png hat.png scene.png \\
        --prompt "The person from picture 1 wears the hat from picture 2 in the scene of picture 3" \\
        --out out/qwen_dar
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", required=True, help="reference image paths (Picture 1, 2, ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=" ", help="enables true CFG with --true-cfg-scale > 1")
    p.add_argument("--model", default="Qwen/Qwen-Image-Edit-2509", help="hub id or local folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--true-cfg-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=0.15)
    p.add_argument("--tau-high", type=float, default=0.7)
    p.add_argument("--tau-low", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "flex", "reference"))
    p.add_argument("--heatmap-step", type=int, default=None,
                   help="denoising step drawn in the heatmaps (default: the middle step)")
    p.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() instead of .to('cuda')")
    p.add_argument("--out", default="qwen_image_edit_dar", help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    import dar

    refs = [Image.open(path).convert("RGB") for path in args.images]
    pipe = QwenImageEditPlusPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    if args.offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to("cuda")
    call = dict(image=refs, prompt=args.prompt, negative_prompt=args.negative_prompt,
                true_cfg_scale=args.true_cfg_scale, num_inference_steps=args.steps)

    def generate():
        # The same seed for both runs, so the only difference is DAR.
        return pipe(**call, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]

    off = generate()
    cfg = dar.DARConfig(gamma=args.gamma, tau_high=args.tau_high, tau_low=args.tau_low, num_samples=args.num_samples)
    # Record a single step: per-key maps of all 60 layers x 2 CFG passes, a few tens of MB.
    step = args.steps // 2 if args.heatmap_step is None else args.heatmap_step
    recorder = dar.Recorder(steps=[step])
    with dar.rebalanced(pipe, cfg, backend=args.backend, recorder=recorder):
        on = generate()

    os.makedirs(args.out, exist_ok=True)
    off.save(os.path.join(args.out, "dar_off.png"))
    on.save(os.path.join(args.out, "dar_on.png"))
    pair = Image.new("RGB", (off.width + on.width, max(off.height, on.height)), "white")
    pair.paste(off, (0, 0))
    pair.paste(on, (off.width, 0))
    pair.save(os.path.join(args.out, "off_vs_on.png"))
    # Row 0 is the conditional (prompt) pass, row 1 the negative-prompt pass.
    recorder.plot_heatmaps(images=refs, path=os.path.join(args.out, "heatmaps.png"), step=step, row=0)
    print(recorder.summary(group_by="layer"))
    print(f"wrote {args.out}/off_vs_on.png (left: DAR off, right: DAR on) and {args.out}/heatmaps.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
