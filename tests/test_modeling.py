"""The model against independent references: the paper's formulas, `torch.nn.Transformer` with copied weights,
and invariances any correct implementation has (causality, padding, batch independence)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BOS,
    D_MODEL,
    EOS,
    FFN,
    HEADS,
    PAD,
    SRC_LEN,
    TGT_LEN,
    VOCAB,
    decode_step_by_step,
    random_batch,
    tiny_config,
    tiny_model,
)
from transformers import AutoModel, AutoModelForSeq2SeqLM

from hf_vanilla_transformer import (
    VanillaTransformerConfig,
    VanillaTransformerForConditionalGeneration,
    VanillaTransformerModel,
)
from hf_vanilla_transformer import modeling_vanilla_transformer as modeling
from hf_vanilla_transformer.modeling_vanilla_transformer import shift_tokens_right, sinusoidal_table

# ----------------------------------------------------------------------------------------------- §3.5 positions


@pytest.mark.parametrize(("pos", "i"), [(0, 0), (1, 0), (3, 2), (17, 5), (50, 1), (1999, 7)])
def test_sinusoid_matches_the_formula(pos, i):
    d = 16
    table = sinusoidal_table(2000, d)
    angle = pos / 10000 ** (2 * i / d)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=2e-5)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=2e-5)


def test_sinusoid_is_a_buffer_not_saved_and_serves_any_length():
    model = tiny_model()
    pe = model.model.encoder.embed_positions
    assert not any("embed_positions" in name for name, _ in model.named_parameters())
    assert not any("embed_positions" in key for key in model.state_dict())
    # Far beyond max_position_embeddings (64): computed on the fly, still the formula.
    rows = pe(10, past_length=1000)
    assert torch.allclose(rows, sinusoidal_table(1010, D_MODEL)[1000:], atol=1e-5)
    long_input = torch.randint(3, VOCAB, (1, 100))
    assert torch.isfinite(model(input_ids=long_input, labels=long_input).logits).all()


def test_learned_positions_refuse_inputs_longer_than_the_table():
    model = tiny_model(position_embedding_type="learned", max_position_embeddings=8)
    assert "model.encoder.embed_positions.weight" in model.state_dict()
    model(input_ids=torch.randint(3, VOCAB, (1, 8)), labels=torch.randint(3, VOCAB, (1, 8)))
    with pytest.raises(ValueError, match=r"9 is longer than the 8 learned positions"):
        model(input_ids=torch.randint(3, VOCAB, (1, 9)), labels=torch.randint(3, VOCAB, (1, 3)))


# ----------------------------------------------------------------------------------------- the nn.Transformer oracle


def _torch_transformer_with_our_weights(model: VanillaTransformerForConditionalGeneration) -> torch.nn.Transformer:
    cfg = model.config
    ref = torch.nn.Transformer(
        d_model=cfg.d_model,
        nhead=cfg.encoder_attention_heads,
        num_encoder_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers,
        dim_feedforward=cfg.encoder_ffn_dim,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=False,
    ).eval()
    # nn.Transformer always adds a final LayerNorm to each stack; the post-LN paper model has none.
    ref.encoder.norm = None
    ref.decoder.norm = None

    def bias(linear: torch.nn.Linear) -> torch.Tensor:  # nn.Transformer always has biases: zeros for the paper's none
        return linear.bias if linear.bias is not None else torch.zeros(linear.out_features)

    def copy_attention(theirs: torch.nn.MultiheadAttention, ours) -> None:
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([bias(ours.q_proj), bias(ours.k_proj), bias(ours.v_proj)]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(bias(ours.out_proj))

    def copy_ffn(theirs, ours) -> None:
        theirs.linear1.load_state_dict(ours.ffn.fc1.state_dict())
        theirs.linear2.load_state_dict(ours.ffn.fc2.state_dict())

    with torch.no_grad():
        for theirs, ours in zip(ref.encoder.layers, model.model.encoder.layers, strict=True):
            copy_attention(theirs.self_attn, ours.self_attn)
            copy_ffn(theirs, ours)
            theirs.norm1.load_state_dict(ours.self_attn_block.layer_norm.state_dict())
            theirs.norm2.load_state_dict(ours.ffn_block.layer_norm.state_dict())
        for theirs, ours in zip(ref.decoder.layers, model.model.decoder.layers, strict=True):
            copy_attention(theirs.self_attn, ours.self_attn)
            copy_attention(theirs.multihead_attn, ours.encoder_attn)
            copy_ffn(theirs, ours)
            theirs.norm1.load_state_dict(ours.self_attn_block.layer_norm.state_dict())
            theirs.norm2.load_state_dict(ours.encoder_attn_block.layer_norm.state_dict())
            theirs.norm3.load_state_dict(ours.ffn_block.layer_norm.state_dict())
    return ref


@pytest.mark.parametrize("attention_bias", [False, True])  # the paper's bias-free W^Q..W^O, and nn.Transformer's
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_torch_nn_transformer_with_copied_weights(attn_implementation, attention_bias):
    model = tiny_model(seed=3, attention_bias=attention_bias)
    if attention_bias:  # random biases, so that a bias copied to the wrong place shows
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.1)
    model.set_attn_implementation(attn_implementation)
    ref = _torch_transformer_with_our_weights(model)
    input_ids, attention_mask, labels = random_batch(seed=1)
    decoder_input_ids = shift_tokens_right(labels, PAD, BOS)
    decoder_input_ids[1, -1] = PAD  # target padding too
    decoder_mask = (decoder_input_ids != PAD).long()
    decoder_mask[:, 0] = 1

    with torch.no_grad():
        ours = model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
        )
        # Same embedded inputs (token * sqrt(d) + PE; no dropout in eval) into the reference stacks.
        src = model.model.encoder.embed(input_ids, None)
        tgt = model.model.decoder.embed(decoder_input_ids, None)
        memory = ref.encoder(src, src_key_padding_mask=attention_mask == 0)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(TGT_LEN)
        out = ref.decoder(
            tgt,
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=decoder_mask == 0,
            memory_key_padding_mask=attention_mask == 0,
            tgt_is_causal=True,
        )
    real_src = attention_mask.bool()
    real_tgt = decoder_mask.bool()
    assert torch.allclose(ours.encoder_last_hidden_state[real_src], memory[real_src], atol=1e-5)
    assert torch.allclose(ours.last_hidden_state[real_tgt], out[real_tgt], atol=1e-5)


# ----------------------------------------------------------------------------------------------- invariances


def test_later_target_tokens_never_change_earlier_logits(model):
    input_ids, attention_mask, labels = random_batch()
    decoder_input_ids = shift_tokens_right(labels, PAD, BOS)
    changed = decoder_input_ids.clone()
    changed[:, 3:] = (changed[:, 3:] + 5) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        b = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=changed).logits
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_extra_padding_and_batch_neighbours_change_nothing(attn_implementation):
    model = tiny_model(seed=1)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, labels = random_batch(seed=2, batch=3)
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        for row in range(3):
            length = int(attention_mask[row].sum())
            alone = model(input_ids=input_ids[row : row + 1, :length], labels=labels[row : row + 1]).logits
            padded_ids = F.pad(input_ids[row : row + 1, :length], (0, 6), value=PAD)
            padded_mask = F.pad(torch.ones(1, length, dtype=torch.long), (0, 6), value=0)
            extra = model(input_ids=padded_ids, attention_mask=padded_mask, labels=labels[row : row + 1]).logits
            assert torch.allclose(batched[row], alone[0], atol=1e-5)
            assert torch.allclose(extra[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_source_row_that_is_all_padding_gives_finite_outputs(attn_implementation):
    model = tiny_model()
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, labels = random_batch()
    attention_mask[1] = 0
    input_ids[1] = PAD
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # ... and the other row does not notice.
    with torch.no_grad():
        alone = model(input_ids=input_ids[:1], labels=labels[:1]).logits
    assert torch.allclose(out.logits[0], alone[0], atol=1e-5)


def test_eager_equals_sdpa_with_padding_and_in_training_mode_without_dropout():
    eager, sdpa = tiny_model(seed=5), tiny_model(seed=5)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    input_ids, attention_mask, labels = random_batch(seed=4)
    out_e = eager(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out_s = sdpa(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.allclose(out_e.logits, out_s.logits, atol=1e-5)
    out_e.loss.backward()
    out_s.loss.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), sdpa.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


# ----------------------------------------------------------------------------------------------- §3.1 post-LN


def test_layer_is_post_ln_layernorm_of_x_plus_sublayer_of_x():
    model = tiny_model(seed=2)
    layer = model.model.encoder.layers[0]
    x = torch.randn(2, SRC_LEN, D_MODEL)
    with torch.no_grad():
        attn, _ = layer.self_attn(x)
        y = F.layer_norm(
            x + attn, (D_MODEL,), layer.self_attn_block.layer_norm.weight, layer.self_attn_block.layer_norm.bias
        )
        h = torch.relu(y @ layer.ffn.fc1.weight.T + layer.ffn.fc1.bias) @ layer.ffn.fc2.weight.T + layer.ffn.fc2.bias
        expected = F.layer_norm(y + h, (D_MODEL,), layer.ffn_block.layer_norm.weight, layer.ffn_block.layer_norm.bias)
        actual = layer(x)
    assert torch.allclose(actual, expected, atol=1e-6)
    # Post-LN: every layer output is normalised (mean 0, std 1 per position, with LayerNorm's initial 1/0).
    assert torch.allclose(actual.mean(-1), torch.zeros(2, SRC_LEN), atol=1e-5)


def test_pre_ln_variant_adds_final_norms_and_differs():
    post, pre = tiny_model(seed=7), tiny_model(seed=7, normalize_before=True)
    assert post.model.encoder.layer_norm is None and post.model.decoder.layer_norm is None
    assert pre.model.encoder.layer_norm is not None and pre.model.decoder.layer_norm is not None
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        a = post(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        b = pre(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert torch.isfinite(b).all() and not torch.allclose(a, b, atol=1e-3)


# ----------------------------------------------------------------------------------------------- §3.4 and the head


def test_embeddings_tied_three_ways_and_scaled():
    model = tiny_model()
    enc = model.model.encoder.embed_tokens.weight
    assert model.model.decoder.embed_tokens.weight is enc and model.lm_head.weight is enc
    assert model.lm_head.bias is None
    ids = torch.tensor([[5, 9]])
    expected = enc[ids] * math.sqrt(D_MODEL) + sinusoidal_table(2, D_MODEL)
    assert torch.allclose(model.model.encoder.embed(ids, None), expected, atol=1e-6)
    untied = tiny_model(tie_word_embeddings=False)
    weights = {id(untied.model.encoder.embed_tokens.weight), id(untied.model.decoder.embed_tokens.weight)}
    assert len(weights | {id(untied.lm_head.weight)}) == 3


def test_initialisation_is_as_documented():
    model = VanillaTransformerForConditionalGeneration(tiny_config(vocab_size=4000, d_model=48, init_std=None))
    emb = model.model.encoder.embed_tokens.weight
    assert emb.std().item() == pytest.approx(48**-0.5, rel=0.05)
    assert torch.count_nonzero(emb[PAD]) == 0
    fc1 = model.model.encoder.layers[0].ffn.fc1
    bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))  # Xavier-uniform
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(fc1.bias) == 0


def test_loss_ignores_minus_100_and_decoder_inputs_are_shifted_labels(model):
    input_ids, attention_mask, labels = random_batch()
    labels[1, -2:] = -100
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    shifted = shift_tokens_right(labels, PAD, BOS)
    assert shifted[:, 0].tolist() == [BOS, BOS] and shifted[1, -1].item() == PAD
    again = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=shifted)
    assert torch.allclose(again.logits, out.logits)


def test_outputs_attentions_and_hidden_states():
    model = tiny_model()
    model.set_attn_implementation("eager")
    input_ids, attention_mask, labels = random_batch()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        output_attentions=True,
        output_hidden_states=True,
    )
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3  # embeddings + 2 layers
    assert out.encoder_attentions[0].shape == (2, HEADS, SRC_LEN, SRC_LEN)
    assert out.decoder_attentions[0].shape == (2, HEADS, TGT_LEN, TGT_LEN)
    assert out.cross_attentions[1].shape == (2, HEADS, TGT_LEN, SRC_LEN)
    assert torch.allclose(out.cross_attentions[0].sum(-1), torch.ones(2, HEADS, TGT_LEN), atol=1e-5)
    assert out.cross_attentions[0][1, :, :, int(attention_mask[1].sum()) :].abs().max() < 1e-6  # padding unseen
    assert out.decoder_attentions[0][0, :, 0, 1:].abs().max() < 1e-6  # causal
    sdpa = tiny_model()
    with pytest.raises(ValueError, match="eager"):
        sdpa(input_ids=input_ids, labels=labels, output_attentions=True)


def test_return_dict_false_gives_a_tuple(model):
    input_ids, attention_mask, labels = random_batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (2, TGT_LEN, VOCAB)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    """With dropout too: the recomputation in backward must redraw the very masks of the forward pass."""
    plain, ckpt = tiny_model(seed=4, dropout=dropout), tiny_model(seed=4, dropout=dropout)
    plain.train()
    ckpt.train()
    ckpt.activation_checkpointing_enable()
    assert ckpt.is_activation_checkpointing
    input_ids, attention_mask, labels = random_batch()
    for m in (plain, ckpt):
        torch.manual_seed(7)
        m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_dropout_is_active_in_training_only():
    model = tiny_model(dropout=0.3)
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        e1 = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        e2 = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        model.train()
        t1 = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert torch.equal(e1, e2) and not torch.allclose(e1, t1, atol=1e-4)


# ----------------------------------------------------------------------------------------------- sizes (Table 3)


def _count(config: VanillaTransformerConfig) -> int:
    with torch.device("meta"):
        model = VanillaTransformerForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@pytest.mark.parametrize(("preset", "paper_millions"), [("base", 65), ("big", 213)])
def test_parameter_counts_match_table_3(preset, paper_millions):
    count = _count(VanillaTransformerConfig.from_preset(preset))
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.05, count


# ----------------------------------------------------------------------------------------------- save, load, Auto


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(seed=9)
    input_ids, attention_mask, labels = random_batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_vanilla_transformer.py"} <= files
    assert "pytorch_model.bin" not in files
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is VanillaTransformerForConditionalGeneration
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    assert loaded.lm_head.weight is loaded.model.encoder.embed_tokens.weight
    with torch.no_grad():
        after = loaded.eval()(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert torch.equal(before, after)
    bare = AutoModel.from_pretrained(tmp_path)
    assert type(bare) is VanillaTransformerModel


def test_auto_model_from_config_and_encoder_decoder_accessors():
    model = AutoModelForSeq2SeqLM.from_config(tiny_config())
    assert isinstance(model, VanillaTransformerForConditionalGeneration)
    assert model.get_encoder() is model.model.encoder
    assert model.get_decoder() is model.model.decoder


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `input_ids`"),
        ({"input_ids": torch.tensor([[5, 6]]), "inputs_embeds": torch.zeros(1, 2, D_MODEL)}, "exactly one"),
        ({"input_ids": torch.tensor([[5, 6]]), "labels": None, "decoder_input_ids": None}, "decoder_input_ids"),
        ({"input_ids": torch.tensor([[5, VOCAB]])}, f"token id {VOCAB}"),
        ({"input_ids": torch.tensor([[5, -3]])}, "token id -3"),
        ({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 3)}, r"\(1, 3\).*\(1, 2\)"),
        ({"input_ids": torch.tensor([[5, 6], [7, 8]]), "labels": torch.tensor([[5, EOS]])}, "Batch sizes differ"),
        ({"input_ids": torch.tensor([5, 6])}, "2 dimensions"),
        ({"input_ids": torch.tensor([[5, 6]]), "rows_per_source": 0}, "positive integer, got 0"),
        (
            {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, EOS]] * 3), "rows_per_source": 2},
            "1 rows times rows_per_source=2, the decoder input 3",
        ),
        ({"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 99]])}, "token id 99"),
        (
            {
                "input_ids": torch.tensor([[5]]),
                "decoder_input_ids": torch.tensor([[1, 4]]),
                "labels": torch.tensor([[4]]),
            },
            "labels",
        ),
    ],
)
def test_bad_input_gets_a_clear_value_error(model, kwargs, match):
    kwargs = {"labels": torch.tensor([[5, EOS]]), **kwargs}
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_characteristic_sizes_are_distinct():
    assert len({VOCAB, D_MODEL, HEADS, FFN, SRC_LEN, TGT_LEN, 2}) == 7


def test_initialisation_is_normal_002_by_default_and_xavier_with_init_std_none():
    """The default draws every Linear weight and embedding from N(0, 0.02) (measured best on real data, README);
    `init_std=None` is fairseq's: Xavier-uniform Linears, N(0, d_model^-0.5) embeddings. Zero biases and padding row."""
    for init_std in (0.02, None):
        torch.manual_seed(0)
        config = VanillaTransformerConfig.from_preset("small", vocab_size=2000, init_std=init_std)
        model = VanillaTransformerForConditionalGeneration(config)
        fc1 = model.model.encoder.layers[0].ffn.fc1  # (1024, 256)
        embedding = model.model.encoder.embed_tokens.weight
        if init_std is None:
            bound = (6 / (256 + 1024)) ** 0.5
            assert fc1.weight.abs().max() <= bound and fc1.weight.std().item() == pytest.approx(
                bound / 3**0.5, rel=0.02
            )
            assert embedding[1:].std().item() == pytest.approx(256**-0.5, rel=0.02)
        else:
            assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
            assert embedding[1:].std().item() == pytest.approx(0.02, rel=0.02)
        assert torch.count_nonzero(fc1.bias) == 0 and torch.count_nonzero(embedding[config.pad_token_id]) == 0


def test_small_init_scales_the_normal_deviation_with_the_width_and_is_saved_as_the_rule(tmp_path):
    """`init_std="small_init"`: N(0, sqrt(2 / (5 d_model))) for every Linear weight and embedding (Nguyen & Salazar,
    2019), 0.0559 at d_model 128 and 0.0280 at 512; the config keeps the rule, not a number, through a save."""
    for d_model, expected in ((128, 0.0559), (512, 0.0280)):
        torch.manual_seed(0)
        config = VanillaTransformerConfig.from_preset("small", vocab_size=2000, d_model=d_model, init_std="small_init")
        assert config.init_std_value() == pytest.approx(expected, abs=1e-4)
        model = VanillaTransformerForConditionalGeneration(config)
        fc1 = model.model.encoder.layers[0].ffn.fc1
        embedding = model.model.encoder.embed_tokens.weight
        assert fc1.weight.std().item() == pytest.approx(expected, rel=0.02)
        assert embedding[1:].std().item() == pytest.approx(expected, rel=0.02)
        assert torch.count_nonzero(fc1.bias) == 0 and torch.count_nonzero(embedding[config.pad_token_id]) == 0
    config.save_pretrained(tmp_path)
    assert VanillaTransformerConfig.from_pretrained(tmp_path).init_std == "small_init"


# -------------------------------------------------------------------------------------- one function, all paths


def test_training_drops_out_where_section_5_4_says(monkeypatch):
    """§5.4: on the output of each sub-layer and on the sums of embeddings and positional encodings, in both
    stacks: 2 embedding sums + 2 encoder layers x 2 sub-layers + 2 decoder layers x 3 = 12 draws at P_drop."""
    model = tiny_model(dropout=0.1).train()
    draws: list[float] = []
    original = F.dropout
    monkeypatch.setattr(modeling.F, "dropout", lambda x, p, training: draws.append(p) or original(x, p, training))
    input_ids, attention_mask, labels = random_batch()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert draws.count(0.1) == 12


def test_inference_logits_equal_training_path_logits(model):
    """The whole model without gradients against the same forward with gradients."""
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": labels}
    reference = model(**batch).logits.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-5, rtol=1e-5)


def test_cached_one_token_steps_equal_the_plain_full_forward():
    """Decoding steps skip the causal mask and read keys and values from the cache; the reference is one full
    forward with gradients enabled."""
    model = tiny_model()
    input_ids, attention_mask, labels = random_batch()
    decoder_input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    reference = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    steps, _ = decode_step_by_step(model, input_ids, attention_mask, decoder_input_ids)
    torch.testing.assert_close(steps, reference.detach(), atol=1e-5, rtol=1e-5)


def test_a_cached_decoding_step_compiles_without_graph_breaks():
    """torch.compile can take a whole decoding step as one graph (the CPU token-id check steps aside while compiling),
    and a training forward too (the fused loss, whose row selection has a data-dependent shape, steps aside)."""
    model = tiny_model()
    input_ids, attention_mask, labels = random_batch()
    start = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        past = model(
            encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=start, use_cache=True
        )[modeling.CACHE_FIELD]
        past_copy = copy.deepcopy(past)
        step = {"encoder_outputs": encoder_outputs, "attention_mask": attention_mask, "past_key_values": past}
        explained = torch._dynamo.explain(model)(**step, decoder_input_ids=start, use_cache=True)
        step["past_key_values"] = past = copy.deepcopy(past_copy)  # explain ran the step: undo its append
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    with torch.no_grad():  # and inductor compiles and runs it
        reference = model(**step, decoder_input_ids=start, use_cache=True).logits
        step["past_key_values"] = past_copy  # a step appends to the cache it is given: the same cache as above
        compiled = torch.compile(model, backend="inductor")(**step, decoder_input_ids=start, use_cache=True).logits
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    model.train()
    model.fused_training_loss = True
    explained = torch._dynamo.explain(model)(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]


# ----------------------------------------------------------------------------------------------- §3.2.2 no biases


def test_attention_projections_are_matrices_by_default_as_in_section_3_2_2():
    """head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), MultiHead = Concat(heads) W^O: no bias terms; the FFN keeps
    b_1 and b_2 (§3.3). `attention_bias=True` adds them (nn.Transformer's, fairseq's and Marian's layout)."""
    model = tiny_model()
    names = dict(model.named_parameters())
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for layer in (*model.model.encoder.layers, *model.model.decoder.layers):
        for attention in [layer.self_attn, getattr(layer, "encoder_attn", None)]:
            for name in projections if attention is not None else ():
                assert getattr(attention, name).bias is None
        assert layer.ffn.fc1.bias is not None and layer.ffn.fc2.bias is not None
    assert not any(name.endswith(f"{p}.bias") for name in names for p in projections)
    with_bias = tiny_model(attention_bias=True)
    per_layer = 4 * D_MODEL  # four projections of D biases each
    attentions = with_bias.config.encoder_layers + 2 * with_bias.config.decoder_layers
    assert with_bias.num_parameters() - model.num_parameters() == per_layer * attentions


def test_a_checkpoint_saved_before_attention_bias_existed_loads_with_its_biases(tmp_path):
    """Saved configs without the key come from code that always had biases: they load as attention_bias=True, with
    every weight, and compute what they computed."""
    old = tiny_model(seed=5, attention_bias=True)
    old.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["attention_bias"] is True
    del saved["attention_bias"]  # what the code before the field wrote
    config_path.write_text(json.dumps(saved))
    loaded = VanillaTransformerForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.attention_bias is True
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, old(**batch).logits, rtol=0, atol=0)
    new = tiny_model(seed=5)  # and a new bias-free checkpoint round-trips as bias-free
    new.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["attention_bias"] is False
    assert VanillaTransformerForConditionalGeneration.from_pretrained(tmp_path / "new").config.attention_bias is False
