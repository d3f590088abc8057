"""`dar.enable` on something it cannot rebalance says what is supported and how to supply what is missing."""

import pytest
import torch

import dar


@pytest.mark.parametrize("target", [42, "pipe", torch.nn.Linear(2, 2)], ids=["int", "str", "plain-module"])
def test_unsupported_object_names_every_supported_kind(target):
    with pytest.raises(TypeError) as info:
        dar.enable(target)
    msg = str(info.value)
    assert type(target).__name__ in msg
    for kind in ("diffusers pipeline", "transformers model", "OmniGen2", "BAGEL"):
        assert kind in msg, msg


def test_transformers_model_without_masks_points_at_image_token_masks():
    transformers = pytest.importorskip("transformers")
    from dar.bindings import transformers as dar_tf

    dar_tf.register()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "dar"
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(TypeError, match=r"ref_mask= and gen_mask=.*image_token_masks"):
        dar.enable(model)
    with pytest.raises(TypeError, match=r"needs gen_mask=:"):
        dar.enable(model, ref_mask=torch.zeros(1, 4, dtype=torch.bool))
