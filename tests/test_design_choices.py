"""The design-choice switches (attention_type, norm_type): each against a naive reference or an invariance, each
through the cache and a save/load round trip. The defaults stay the paper's model."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, random_batch, tiny_model
from transformers import AutoModelForSeq2SeqLM

from hf_vanilla_transformer import VanillaTransformerConfig
from hf_vanilla_transformer.modeling_vanilla_transformer import additive_attention

SWITCHES = [
    {"attention_type": "dot_product"},
    {"attention_type": "additive"},
    {"norm_type": "batchnorm"},
    {"norm_type": "batchnorm", "normalize_before": True},
    {"position_embedding_type": "learned"},
]


def test_defaults_are_the_papers():
    config = VanillaTransformerConfig()
    assert config.attention_type == "scaled_dot_product" and config.norm_type == "layernorm"
    with pytest.raises(ValueError, match="cosine"):
        VanillaTransformerConfig(attention_type="cosine")
    with pytest.raises(ValueError, match="rmsnorm"):
        VanillaTransformerConfig(norm_type="rmsnorm")


def test_dot_product_drops_only_the_scale():
    scaled, plain = tiny_model(seed=3), tiny_model(seed=3, attention_type="dot_product")
    assert scaled.model.encoder.layers[0].self_attn.scaling == pytest.approx(4**-0.5)  # d_k = 12 / 3
    assert plain.model.encoder.layers[0].self_attn.scaling == 1.0
    # Scaling the query projection by 1/sqrt(d_k) turns dot-product attention back into the scaled model.
    with torch.no_grad():
        for module in plain.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(4**-0.5)  # bias-free (§3.2.2): the weight is the whole projection
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        a = scaled(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        b = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_additive_attention_equals_a_naive_reference():
    model = tiny_model(seed=4, attention_type="additive")
    attn = model.model.decoder.layers[0].encoder_attn
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, n, 4, generator=g) for n in (2, 5, 5))
    mask = torch.ones(2, 1, 2, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False
    out, weights = additive_attention(attn, query, key, value, mask)
    for b in range(2):
        for h in range(3):
            for i in range(2):
                scores = []
                for j in range(5):
                    hidden = torch.tanh(query[b, h, i] @ attn.additive_query[h] + key[b, h, j] @ attn.additive_key[h])
                    score = hidden @ attn.additive_score[h]
                    scores.append(score if mask[b, 0, i, j] else torch.tensor(-float("inf")))
                expected_weights = torch.softmax(torch.stack(scores), dim=0)
                assert torch.allclose(weights[b, h, i], expected_weights, atol=1e-6)
                assert torch.allclose(out[b, i, h], expected_weights @ value[b, h], atol=1e-6)


def test_batchnorm_statistics_ignore_padding():
    model = tiny_model(seed=5, norm_type="batchnorm").train()
    input_ids, attention_mask, labels = random_batch(batch=3)
    norm = model.model.encoder.layers[0].self_attn_block.batch_norm
    seen = {}
    norm.register_forward_hook(lambda module, args, output: seen.update(x=args[0].detach()))
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    real = seen["x"][attention_mask.bool()]
    assert torch.allclose(norm.running_mean, 0.1 * real.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, 0.9 + 0.1 * real.var(0, unbiased=True), atol=1e-5)

    # In training mode too, what stands at padded positions cannot change any real position's output.
    changed = input_ids.clone()
    changed[attention_mask == 0] = 7
    outputs = [
        tiny_model(seed=5, norm_type="batchnorm").train()(input_ids=ids, attention_mask=attention_mask, labels=labels)
        for ids in (input_ids, changed)
    ]
    real = attention_mask.bool()
    a, b = (out.encoder_last_hidden_state[real] for out in outputs)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_decodes_the_same_with_and_without_the_cache(switch, tmp_path):
    model = tiny_model(seed=6, **switch)
    if switch.get("norm_type") == "batchnorm":  # give the running statistics something to hold
        model.train()
        input_ids, attention_mask, labels = random_batch(seed=1, batch=3)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        model.eval()
    input_ids, attention_mask, _ = random_batch(seed=2, batch=3)
    kwargs = {"attention_mask": attention_mask, "max_new_tokens": 8}
    for beams in (1, 3):
        cached = model.generate(input_ids, num_beams=beams, use_cache=True, **kwargs)
        uncached = model.generate(input_ids, num_beams=beams, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for key, value in switch.items():
        assert getattr(loaded.config, key) == value
    assert torch.equal(
        loaded.generate(input_ids, num_beams=1, **kwargs), model.generate(input_ids, num_beams=1, **kwargs)
    )


@pytest.mark.parametrize("switch", SWITCHES[:3], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_trains_and_keeps_padding_out(switch):
    model = tiny_model(seed=7, **switch)
    input_ids, attention_mask, labels = random_batch(seed=3, batch=3)
    input_ids[2] = PAD
    attention_mask[2] = 0
    model.train()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
