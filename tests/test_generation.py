"""generate(): the cache against full recomputation, the paper's decoding defaults (§6.1), and the pipelines."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BOS, EOS, PAD, VOCAB, decode_step_by_step, random_batch, tiny_model
from datasets import Dataset
from transformers import (
    AttentionInterface,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    pipeline,
)
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerationMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_vanilla_transformer.generation_vanilla_transformer import length_penalty
from hf_vanilla_transformer.modeling_vanilla_transformer import CACHE_FIELD
from hf_vanilla_transformer.tokenization import train_tokenizer


def _trimmed(sequence: torch.Tensor) -> list[int]:
    """Tokens up to and including the first EOS (beam search pads finished rows with EOS when pad id is 0)."""
    tokens = sequence.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens[1:] else tokens


def _certain_model(token: int, vocab_size: int = VOCAB):
    """A model whose decoder output is one fixed vector that only `token`'s embedding sees: every step's argmax is
    `token`, with a margin no search can overturn, so the output is known exactly."""
    model = tiny_model(seed=11, vocab_size=vocab_size)
    with torch.no_grad():
        emb = model.model.encoder.embed_tokens.weight  # tied: also the output projection
        emb[:, 0] = 0.0
        emb[token, 0] = 1.0
        norm = model.model.decoder.layers[-1].ffn_block.layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 50.0  # logits: 50 for `token`, 0 for every other token
    return model


# ----------------------------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cached_step_logits_equal_a_full_forward(attn_implementation):
    model = tiny_model(seed=2)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, labels = random_batch(seed=3, batch=3)
    decoder_input_ids = torch.cat([torch.ones(3, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    steps, past = decode_step_by_step(model, input_ids, attention_mask, decoder_input_ids)
    assert past.get_seq_length() == decoder_input_ids.shape[1]
    assert torch.allclose(steps, full, atol=1e-5)


def test_the_cache_goes_in_under_either_name_and_comes_back_under_the_installed_ones():
    """transformers 5.24 renamed `past_key_values` to `cache` (argument and output field); a model that took only the
    old name would drop the cache generate() passes, through **kwargs, and decode each step without its context."""
    model = tiny_model(seed=2)
    input_ids, attention_mask, labels = random_batch(seed=3, batch=3)
    decoder_input_ids = torch.cat([torch.ones(3, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    first = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
    logits = {}
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            out = model(**first, decoder_input_ids=decoder_input_ids[:, :2])
            cache = getattr(out, CACHE_FIELD)
            assert cache is not None and cache.get_seq_length() == 2
            logits[name] = model(**first, decoder_input_ids=decoder_input_ids[:, 2:3], **{name: cache}).logits
            assert cache.get_seq_length() == 3  # the step read and extended the cache it was given
        full = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        with pytest.raises(ValueError, match="once"):
            model(**first, decoder_input_ids=decoder_input_ids[:, :1], cache=cache, past_key_values=copy.copy(cache))
        with pytest.raises(ValueError, match="kv_cache"):  # a name neither release uses: an error, not dropped
            model(**first, decoder_input_ids=decoder_input_ids[:, :1], kv_cache=cache)
    for name, step in logits.items():
        torch.testing.assert_close(step[:, 0], full[:, 2], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_use_cache_false_produces_exactly_the_same_tokens(num_beams):
    model = tiny_model(seed=5)
    input_ids, attention_mask, _ = random_batch(seed=6, batch=3)
    kwargs = {"attention_mask": attention_mask, "num_beams": num_beams, "max_new_tokens": 12}
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_and_cache_independent():
    model = tiny_model(seed=5)
    input_ids, attention_mask, _ = random_batch(seed=6, batch=3)
    kwargs = {"attention_mask": attention_mask, "do_sample": True, "num_beams": 1, "max_new_tokens": 10}
    kwargs.update(top_k=8, top_p=0.9, temperature=1.5)
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(123)
        runs.append(model.generate(input_ids, use_cache=use_cache, **kwargs))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(7)
    assert not torch.equal(runs[0], model.generate(input_ids, **kwargs))


def test_padded_batch_gives_each_row_what_it_gets_alone():
    model = tiny_model(seed=8)
    input_ids, attention_mask, _ = random_batch(seed=9, batch=3)
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=2)
    for row in range(3):
        n = int(attention_mask[row].sum())
        alone = model.generate(input_ids[row : row + 1, :n], max_new_tokens=8, num_beams=2)
        assert _trimmed(batched[row]) == _trimmed(alone[0])


# ----------------------------------------------------------------------------------------------- §6.1 defaults


def test_paper_decoding_defaults_are_the_saved_generation_config(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).generation_config
    assert (loaded.num_beams, loaded.length_penalty, loaded.length_penalty_type) == (4, 0.6, "gnmt")
    assert loaded.early_stopping is True
    assert loaded.max_length_offset == 50 and loaded.max_new_tokens is None


class _ScriptedScores(LogitsProcessor):
    """Replaces every step's scores by a script that depends only on the prefix, so the log-probability of each
    hypothesis is known exactly: start -> 5 (-0.3) -> EOS (-0.7) is A, |A| = 2, sum -1.0; start -> 6 (-0.4) ->
    7 7 7 7 (-0.2 each) -> EOS (-0.4) is B, |B| = 6, sum -1.6. Every other token is impossible."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scripted = torch.full_like(scores, -float("inf"))
        for row, prefix in enumerate(input_ids.tolist()):
            generated = prefix[1:]
            if not generated:
                scripted[row, 5], scripted[row, 6] = -0.3, -0.4
            elif generated == [5]:
                scripted[row, EOS] = -0.7
            elif generated[0] == 6 and len(generated) < 5:
                scripted[row, 7] = -0.2
            elif generated[0] == 6:
                scripted[row, EOS] = -0.4
        return scripted


@pytest.mark.parametrize(
    ("penalty_type", "expected", "score"),
    [
        # |Y|^0.6: A -1.0 / 2^0.6 = -0.660 < B -1.6 / 6^0.6 = -0.546, so B wins.
        ("transformers", [BOS, 6, 7, 7, 7, 7, EOS], -1.6 / 6**0.6),
        # GNMT, ((5 + |Y|) / 6)^0.6: A -1.0 / (7/6)^0.6 = -0.912 > B -1.6 / (11/6)^0.6 = -1.112, so A wins.
        ("gnmt", [BOS, 5, EOS], -1.0 / (7 / 6) ** 0.6),
    ],
)
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_ranks_by_the_chosen_length_penalty(penalty_type, expected, score, early_stopping):
    """§6.1's length penalty is GNMT's lp(Y) = ((5 + |Y|) / 6)^α (Wu et al., 2016), not transformers' |Y|^α; the two
    rank A and B above in opposite orders, and the returned score is the log-probability divided by the penalty.
    This pins the two transformers helpers the model overrides: if a release changes them, this fails."""
    model = tiny_model(seed=4)
    model.generation_config.length_penalty_type = penalty_type
    input_ids, attention_mask, _ = random_batch(seed=5, batch=2)
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        num_beams=2,
        length_penalty=0.6,
        early_stopping=early_stopping,
        max_new_tokens=9,
        logits_processor=LogitsProcessorList([_ScriptedScores()]),
        return_dict_in_generate=True,
        output_scores=True,
    )
    for row in range(2):
        assert _trimmed(out.sequences[row]) == expected
        assert out.sequences_scores[row].item() == pytest.approx(score, abs=1e-6)
    assert length_penalty(6, 0.6, "gnmt") == pytest.approx((11 / 6) ** 0.6)
    assert length_penalty(6, 0.6, "transformers") == pytest.approx(6**0.6)


# ------------------------------------------------------------------ every way of passing a setting (issue #26)
#
# transformers merges a call's settings as keyword arguments over the caller's `generation_config` over the model's
# saved one, custom keys included (`GenerationMixin._prepare_generation_config`). §6.1's two keys must behave like any
# setting under every way of passing them: each way below is checked for the length rule (output length) and for the
# length penalty's form (which of two scripted hypotheses wins), against the outcome the settings must give.

PAPER = {}  # the saved defaults: GNMT's penalty, input length + 50
THEIRS = {"length_penalty_type": "transformers", "max_length_offset": 3}


def _by_default(model, inputs, settings, extra):
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    return model.generate(**inputs, num_beams=2, **extra)


def _by_callers_config(model, inputs, settings, extra):
    """The documented way: the caller's config holds only what they set; the rest comes from the model's."""
    lengths = {key: extra.pop(key) for key in ("max_new_tokens",) if key in extra}
    return model.generate(**inputs, generation_config=GenerationConfig(num_beams=2, **settings, **lengths), **extra)


def _by_kwargs(model, inputs, settings, extra):
    return model.generate(**inputs, num_beams=2, **settings, **extra)


def _by_kwargs_to_a_config_saved_without_the_keys(model, inputs, settings, extra):
    """A checkpoint saved before the keys existed: a kwarg must still reach the config, not forward()."""
    for key in ("length_penalty_type", "max_length_offset"):
        delattr(model.generation_config, key)
    paper = {"length_penalty_type": "gnmt", "max_length_offset": 50}
    return model.generate(**inputs, num_beams=2, **{**paper, **settings}, **extra)


def _by_seq2seq_trainer(model, inputs, settings, extra, tmp_path):
    """Seq2SeqTrainer's `generation_config` argument replaces the model's config (its documented priority); the
    predictions come from generate() with the trainer's gen_kwargs (here the scripted scores)."""
    saved = copy.deepcopy(model.generation_config)
    for key, value in settings.items():
        setattr(saved, key, value)
    saved.num_beams = 2
    saved.save_pretrained(tmp_path / "generation")
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "out"), generation_config=str(tmp_path / "generation"), predict_with_generate=True,
        per_device_eval_batch_size=8, report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer = Seq2SeqTrainer(model=model, args=args)
    rows = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(*inputs.values(), strict=True)]
    predictions = trainer.predict(Dataset.from_list(rows), **extra).predictions
    return torch.as_tensor(predictions).masked_fill(torch.as_tensor(predictions) == -100, PAD)


WAYS = {
    "saved defaults": _by_default,
    "caller's GenerationConfig": _by_callers_config,
    "generate() kwargs": _by_kwargs,
    "kwargs, config saved without the keys": _by_kwargs_to_a_config_saved_without_the_keys,
    "Seq2SeqTrainer generation_config": _by_seq2seq_trainer,
}


def _call(way, model, inputs, settings, extra, tmp_path):
    if way == "Seq2SeqTrainer generation_config":
        return WAYS[way](model, inputs, settings, extra, tmp_path)
    return WAYS[way](model, inputs, settings, extra)


@pytest.mark.parametrize("settings", [PAPER, THEIRS], ids=["paper", "transformers+3"])
@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_passing_a_setting_gives_its_length_rule(way, settings, tmp_path):
    """Output length = input length + the offset in force (50 by default), whichever way the settings came."""
    model = _certain_model(7)
    input_ids, attention_mask, _ = random_batch(batch=2)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    out = _call(way, model, inputs, dict(settings), {}, tmp_path)
    offset = settings.get("max_length_offset", 50)
    for row in range(2):
        assert _trimmed(out[row]) == [BOS] + [7] * (int(attention_mask[row].sum()) + offset - 1) + [EOS]


@pytest.mark.parametrize("settings", [PAPER, THEIRS], ids=["paper", "transformers+3"])
@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_passing_a_setting_gives_its_length_penalty(way, settings, tmp_path):
    """The scripted scores' hypotheses A (short) and B (long) rank in opposite orders under the two penalties."""
    model = tiny_model(seed=4)
    input_ids, attention_mask, _ = random_batch(seed=5, batch=2)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    extra = {"logits_processor": LogitsProcessorList([_ScriptedScores()]), "max_new_tokens": 9}
    out = _call(way, model, inputs, dict(settings), extra, tmp_path)
    gnmt = settings.get("length_penalty_type", "gnmt") == "gnmt"
    expected = [BOS, 5, EOS] if gnmt else [BOS, 6, 7, 7, 7, 7, EOS]
    assert [_trimmed(row) for row in out] == [expected, expected]


@pytest.mark.parametrize("settings", [PAPER, THEIRS], ids=["paper", "transformers+3"])
def test_pipeline_kwargs_are_settings_like_any_other(saved_model_and_tokenizer, settings):
    _, _, tokenizer = saved_model_and_tokenizer
    model = _certain_model(7, vocab_size=len(tokenizer))
    translator = pipeline("translation", model=model, tokenizer=tokenizer)
    text = "the cat sat"
    length = len(tokenizer(text).input_ids) + settings.get("max_length_offset", 50) - 1
    expected = tokenizer.decode([BOS] + [7] * length + [EOS], skip_special_tokens=True).strip()
    assert translator(text, num_beams=2, **settings)[0]["translation_text"] == expected
    scripted = {"logits_processor": LogitsProcessorList([_ScriptedScores()]), "max_new_tokens": 9}
    ranked = tiny_model(seed=4, vocab_size=len(tokenizer))
    winner = [BOS, 5, EOS] if settings.get("length_penalty_type", "gnmt") == "gnmt" else [BOS, 6, 7, 7, 7, 7, EOS]
    translated = pipeline("translation", model=ranked, tokenizer=tokenizer)(text, num_beams=2, **settings, **scripted)
    assert translated[0]["translation_text"] == tokenizer.decode(winner, skip_special_tokens=True).strip()


def test_a_settings_value_is_checked_whichever_way_it_came():
    model = tiny_model()
    input_ids, attention_mask, _ = random_batch(seed=5, batch=1)
    with pytest.raises(ValueError, match="'wu'"):
        model.generate(input_ids, attention_mask=attention_mask, length_penalty_type="wu")
    with pytest.raises(ValueError, match="max_length_offset must be a positive integer or None, got -2"):
        model.generate(input_ids, generation_config=GenerationConfig(max_length_offset=-2))


# ------------------------------------------------------------------ the guard on the private beam-search helpers


def test_gnmt_beams_refuse_a_transformers_without_the_helpers(monkeypatch):
    """A release that renames a helper (or its arguments) would silently give |Y|^alpha back: refused before
    decoding, naming the version."""
    import transformers

    model = tiny_model(seed=4)
    input_ids, attention_mask, _ = random_batch(seed=5, batch=1)
    monkeypatch.delattr(GenerationMixin, "_update_finished_beams")
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}.*_update_finished_beams"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3)
    # Greedy search does not use the overrides: it still decodes.
    three = {"attention_mask": attention_mask, "max_new_tokens": 3, "min_new_tokens": 3}
    assert model.generate(input_ids, num_beams=1, **three).shape == (1, 4)


def test_gnmt_beams_refuse_a_beam_search_that_never_called_the_overrides(monkeypatch):
    """A release whose beam search stops calling a helper (keeping its name): refused after the call."""
    model = tiny_model(seed=4)
    input_ids, attention_mask, _ = random_batch(seed=5, batch=1)
    original = GenerationMixin._check_early_stop_heuristic
    monkeypatch.setattr(type(model), "_check_early_stop_heuristic", staticmethod(original))
    with pytest.raises(RuntimeError, match="did not call _check_early_stop_heuristic"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3)


def test_an_unknown_length_penalty_type_is_refused():
    model = tiny_model()
    model.generation_config.length_penalty_type = "wu"
    input_ids, attention_mask, _ = random_batch(seed=5, batch=1)
    with pytest.raises(ValueError, match="'wu'"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_output_length_is_input_length_plus_50_per_input(num_beams):
    token = 7
    model = _certain_model(token)
    input_ids, attention_mask, _ = random_batch(seed=1, batch=3)  # source lengths 7, 5, 3
    out = model.generate(input_ids, attention_mask=attention_mask, num_beams=num_beams)
    for row in range(3):
        limit = int(attention_mask[row].sum()) + 50
        assert _trimmed(out[row]) == [1] + [token] * (limit - 1) + [EOS]  # start, then exactly `limit` tokens


def test_the_rule_survives_a_generation_config_that_transformers_filled_with_max_length_20(tmp_path):
    """Seq2SeqTrainer checkpoints save the generation config with every default written out, max_length 20 too."""
    model = _certain_model(7)
    model.generation_config.max_length = 20
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    input_ids, attention_mask, _ = random_batch(batch=2)
    out = loaded.generate(input_ids, attention_mask=attention_mask, num_beams=1)
    assert len(_trimmed(out[0])) == 1 + int(attention_mask[0].sum()) + 50


def test_the_rule_uses_non_padding_ids_when_no_mask_is_given():
    model = _certain_model(9)
    input_ids = torch.tensor([[5, 6, 7, 8, EOS], [5, 6, EOS, PAD, PAD]])
    out = model.generate(input_ids, num_beams=1)
    assert len(_trimmed(out[0])) == 1 + 55 and len(_trimmed(out[1])) == 1 + 53


@pytest.mark.parametrize("length_kwargs", [{"max_new_tokens": 4}, {"max_length": 6}])
def test_an_explicit_length_from_the_caller_wins(length_kwargs):
    model = _certain_model(7)
    input_ids, attention_mask, _ = random_batch(batch=2)
    out = model.generate(input_ids, attention_mask=attention_mask, num_beams=1, **length_kwargs)
    assert out.shape[1] == 5 if "max_new_tokens" in length_kwargs else out.shape[1] == 6
    assert out[:, 1:].eq(7).all()  # cut by length, not by the rule's EOS


def test_num_return_sequences_with_beams():
    model = tiny_model(seed=4)
    input_ids, attention_mask, _ = random_batch(batch=2)
    out = model.generate(
        input_ids, attention_mask=attention_mask, num_beams=4, num_return_sequences=3, max_new_tokens=6
    )
    assert out.shape[0] == 6
    assert len({tuple(_trimmed(row)) for row in out[:3]}) == 3  # distinct hypotheses of the first input
    scored = model.generate(
        input_ids,
        attention_mask=attention_mask,
        num_beams=4,
        num_return_sequences=3,
        max_new_tokens=6,
        output_scores=True,
        return_dict_in_generate=True,
    )
    scores = scored.sequences_scores.view(2, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


# ------------------------------------------------------------------------- one encoder output for several rows


def _repeated_source(model, monkeypatch):
    """Make `generate()` repeat the encoder output per beam, as transformers does for every other model."""
    monkeypatch.setattr(type(model), "_expand_inputs_for_generation", GenerationMixin._expand_inputs_for_generation)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "repeat_interleave_fallback"])
def test_rows_per_source_equals_repeating_the_source(attn_implementation):
    """A forward with k decoder rows per source against the same forward with the source repeated k times; the
    third case is an attention implementation of transformers' registry, which gets repeated rows instead."""
    model = tiny_model(seed=9)
    if attn_implementation == "repeat_interleave_fallback":
        AttentionInterface.register(attn_implementation, ALL_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, labels = random_batch(seed=4, batch=2)  # the second source is padded
    decoder_input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    decoder_input_ids = torch.cat([decoder_input_ids, decoder_input_ids.flip(1)]).view(2, 2, -1)  # two per source
    decoder_input_ids = decoder_input_ids.transpose(0, 1).reshape(4, -1)  # rows 0, 1: source 0; rows 2, 3: source 1
    eager = attn_implementation == "eager"
    with torch.no_grad():
        grouped = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            rows_per_source=2,
            output_attentions=eager,
        )
        repeated = model(
            input_ids=input_ids.repeat_interleave(2, dim=0),
            attention_mask=attention_mask.repeat_interleave(2, dim=0),
            decoder_input_ids=decoder_input_ids,
            output_attentions=eager,
        )
    torch.testing.assert_close(grouped.logits, repeated.logits, atol=1e-5, rtol=1e-5)
    if eager:  # the attention weights come back one row per decoder row
        for ours, theirs in zip(grouped.cross_attentions, repeated.cross_attentions, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_beam_search_keeps_one_encoder_output_per_input_and_finds_the_same_beams(attn_implementation, monkeypatch):
    model = tiny_model(seed=4)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, _ = random_batch(seed=2, batch=3)
    kwargs = {"attention_mask": attention_mask, "num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 9}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    seen_batches = []
    forward = model.forward
    model.forward = lambda **inputs: seen_batches.append(inputs["attention_mask"].shape[0]) or forward(**inputs)
    ours = model.generate(input_ids, **kwargs)
    assert set(seen_batches) == {3}  # the source mask (and encoder output) stayed one row per input
    del model.forward
    _repeated_source(model, monkeypatch)
    reference = model.generate(input_ids, **kwargs)
    assert torch.equal(ours.sequences, reference.sequences)
    torch.testing.assert_close(ours.sequences_scores, reference.sequences_scores, atol=1e-5, rtol=1e-5)


def test_sampling_several_sequences_per_input_is_unchanged_by_keeping_one_encoder_output(monkeypatch):
    model = tiny_model(seed=5)
    input_ids, attention_mask, _ = random_batch(seed=6, batch=2)
    kwargs = {"attention_mask": attention_mask, "do_sample": True, "num_return_sequences": 3, "max_new_tokens": 10}
    torch.manual_seed(3)
    ours = model.generate(input_ids, **kwargs)
    _repeated_source(model, monkeypatch)
    torch.manual_seed(3)
    assert torch.equal(ours, model.generate(input_ids, **kwargs))


# ----------------------------------------------------------------------------------------------- pipelines


@pytest.fixture
def saved_model_and_tokenizer(tmp_path):
    sentences = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20
    tokenizer = train_tokenizer(sentences, vocab_size=VOCAB + 60)
    model = tiny_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path, model, tokenizer


@pytest.mark.parametrize(
    ("task", "key"), [("translation", "translation_text"), ("text2text-generation", "generated_text")]
)
def test_pipeline_from_a_saved_directory(saved_model_and_tokenizer, task, key):
    path, model, tokenizer = saved_model_and_tokenizer
    translator = pipeline(task, model=str(path), tokenizer=str(path), max_new_tokens=6, num_beams=2)
    single = translator("the cat sat")
    assert isinstance(single, list) and set(single[0]) == {key}
    expected_ids = model.generate(**tokenizer("the cat sat", return_tensors="pt"), max_new_tokens=6, num_beams=2)
    assert single[0][key] == tokenizer.decode(expected_ids[0], skip_special_tokens=True).strip()
    many = translator(["the cat sat", "a dog ran in the park"], batch_size=2)
    assert [set(item) for item in many] == [{key}, {key}]


def test_pipeline_with_objects_and_bad_input(saved_model_and_tokenizer):
    path, model, _ = saved_model_and_tokenizer
    translator = pipeline("translation", model=model, tokenizer=AutoTokenizer.from_pretrained(path))
    assert isinstance(translator("a dog ran", max_new_tokens=3)[0]["translation_text"], str)
    with pytest.raises(ValueError, match="string or a list of strings"):
        translator(42)
