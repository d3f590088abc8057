"""DAR in a transformers model: register "dar", build the masks from image tokens, generate with DAR off and on.

By default a tiny Llama with random weights is built from a config (nothing is downloaded, CPU is fine): its
prompt holds two reference images and the generated image as runs of a placeholder token, the way unified
multimodal models (BAGEL-, Janus-style) lay images out in the language model's sequence. The output shows
the mechanism, not quality. With ``--model`` a real causal LM is loaded instead; its prompt must contain the
image placeholder token(s) given by ``--image-token-id``:

    python examples/transformers_dar.py
    python examples/transformers_dar.py --model path/or/hub-id --prompt "..." --image-token-id 151655
"""

from __future__ import annotations

import argparse

import torch

import dar
from dar.bindings import transformers as dar_tf

IMAGE = 7  # the tiny model's image placeholder token


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="hub id or local folder of a causal LM (default: tiny random Llama)")
    p.add_argument("--prompt", default=None, help="prompt for --model; must contain image placeholder tokens")
    p.add_argument("--image-token-id", type=int, nargs="+", default=[IMAGE], help="image placeholder token id(s)")
    p.add_argument("--generated", type=int, nargs="*", default=[-1],
                   help="which image run(s) of the prompt are the generated image (default: the last one)")
    p.add_argument("--num-generated", type=int, default=0,
                   help="generated-image tokens that follow the prompt (autoregressive image generation)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def tiny_model_and_prompt():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.4)
    model = LlamaForCausalLM._from_config(config, attn_implementation="dar")
    # text, reference image 1, separator, reference image 2, separator, the generated image, text
    ids = [1, 20, 21] + [IMAGE] * 9 + [22] + [IMAGE] * 9 + [23] + [IMAGE] * 16 + [24, 25]
    return model, torch.tensor([ids])


def hub_model_and_prompt(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.prompt is None:
        raise SystemExit("--prompt is required with --model")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="dar", dtype="auto")
    return model, tok(args.prompt, return_tensors="pt").input_ids


def main(argv=None):
    args = parse_args(argv)
    dar_tf.register()  # adds "dar" to transformers' AttentionInterface; must precede attn_implementation="dar"
    model, input_ids = hub_model_and_prompt(args) if args.model else tiny_model_and_prompt()
    model = model.to(args.device).eval()
    input_ids = input_ids.to(args.device)

    ref_mask, gen_mask = dar_tf.image_token_masks(input_ids, args.image_token_id, generated=args.generated,
                                                  num_generated=args.num_generated)
    if not ref_mask.any():
        raise SystemExit(f"no reference image tokens {args.image_token_id} in the prompt")
    runs = lambda m: [(int(s), int(e)) for s, e in dar_tf._runs(m[0].cpu())]  # noqa: E731
    print(f"reference images at {runs(ref_mask)}, generated image at {runs(gen_mask)}")

    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, attention_mask=torch.ones_like(input_ids))
    cfg = dar.DARConfig(gamma=args.gamma, num_samples=args.num_samples)
    with torch.no_grad():
        # Outside a dar.rebalanced block the "dar" implementation is exactly transformers' sdpa.
        off_logits = model(input_ids).logits
        off = model.generate(input_ids, **gen_kw)
        with dar.rebalanced(model, cfg, ref_mask=ref_mask, gen_mask=gen_mask):
            on_logits = model(input_ids).logits
            on = model.generate(input_ids, **gen_kw)
    change = (on_logits.float() - off_logits.float()).abs().amax(dim=-1)[0]  # per prompt position
    prompt_gen = gen_mask[0, :input_ids.shape[1]]
    if prompt_gen.any():
        print(f"forward pass, largest logit change: generated-image positions {change[prompt_gen].max():.4g}, "
              f"other positions {change[~prompt_gen].max():.4g}")
    new = input_ids.shape[1]
    print("generate, DAR off:", off.sequences[0, new:].tolist())
    print("generate, DAR on: ", on.sequences[0, new:].tolist())


if __name__ == "__main__":
    main()
