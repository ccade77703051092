"""The configuration: the paper's base model by default, Table 3's big model by name, bad values refused."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from hf_vanilla_transformer import PRESETS, VanillaTransformerConfig


def test_default_is_the_papers_base_model():
    c = VanillaTransformerConfig()
    # Table 3 "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1; §5.1 shared vocabulary of about 37000.
    assert (c.encoder_layers, c.decoder_layers, c.d_model) == (6, 6, 512)
    assert (c.encoder_ffn_dim, c.decoder_ffn_dim) == (2048, 2048)
    assert (c.encoder_attention_heads, c.decoder_attention_heads) == (8, 8)
    assert (c.dropout, c.attention_dropout, c.activation_dropout) == (0.1, 0.0, 0.0)
    assert c.vocab_size == 37000 and c.tie_word_embeddings and c.scale_embedding
    assert c.activation_function == "relu" and c.position_embedding_type == "sinusoidal"
    assert c.normalize_before is False and c.is_encoder_decoder


def test_big_preset_is_table_3_big():
    c = VanillaTransformerConfig.from_preset("big")
    assert (c.d_model, c.encoder_ffn_dim, c.encoder_attention_heads, c.dropout) == (1024, 4096, 16, 0.3)
    assert (c.decoder_ffn_dim, c.decoder_attention_heads, c.encoder_layers) == (4096, 16, 6)


def test_preset_overrides_and_unknown_preset():
    assert VanillaTransformerConfig.from_preset("small", vocab_size=8000).vocab_size == 8000
    assert set(PRESETS) >= {"base", "big", "small", "tiny"}
    with pytest.raises(ValueError, match="huge"):
        VanillaTransformerConfig.from_preset("huge")


def test_standard_attribute_names_map_to_fields():
    c = VanillaTransformerConfig(d_model=96, encoder_attention_heads=3, encoder_layers=5)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (96, 3, 5)
    # generate() sizes its cache from the decoder's depth through get_text_config(decoder=True).
    assert VanillaTransformerConfig(decoder_layers=4).get_text_config(decoder=True).num_hidden_layers == 4


def test_round_trip_and_auto_config(tmp_path):
    c = VanillaTransformerConfig.from_preset("big", position_embedding_type="learned", normalize_before=True)
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VanillaTransformerConfig
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(c.to_dict())
    assert type(AutoConfig.for_model("vanilla_transformer")) is VanillaTransformerConfig


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"d_model": 500}, ["500", "8"]),
        ({"decoder_attention_heads": 7}, ["512", "7"]),
        ({"position_embedding_type": "rotary"}, ["rotary"]),
        ({"activation_function": "swishy"}, ["swishy"]),
        ({"vocab_size": 0}, ["vocab_size", "0"]),
        ({"encoder_layers": -1}, ["encoder_layers", "-1"]),
        ({"decoder_ffn_dim": 0}, ["decoder_ffn_dim"]),
        ({"dropout": 1.0}, ["dropout", "1.0"]),
        ({"attention_dropout": -0.1}, ["attention_dropout", "-0.1"]),
        ({"activation_dropout": 1.5}, ["activation_dropout", "1.5"]),
        ({"pad_token_id": 37000}, ["pad_token_id", "37000"]),
        ({"init_std": 0.0}, ["init_std"]),
        ({"init_std": "big_init"}, ["init_std", "big_init"]),
        ({"init_std": True}, ["init_std", "True"]),
    ],
)
def test_bad_values_are_refused_with_the_value_named(kwargs, names):
    with pytest.raises(ValueError) as info:
        VanillaTransformerConfig(**kwargs)
    for name in names:
        assert name in str(info.value)
