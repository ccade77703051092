"""The model in the Hugging Face ecosystem (issue #26, item 3): each path against the behaviour transformers and its
neighbours document, and against `MarianMTModel` (a tiny one built from a `MarianConfig`, nothing downloaded) doing
the same call. The comparison is of behaviour (output classes, shapes, what a call changes and what it keeps), not of
numbers: Marian is another model.

Paths: PEFT LoRA, `torch.compile`, CPU dynamic int8 quantization, bf16 loading, `device_map` / `low_cpu_mem_usage`
loading, `resize_token_embeddings`, activation checkpointing, attention and hidden-state outputs, switching the
attention implementation, and `push_to_hub` loaded back where the package cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, D_MODEL, EOS, HEADS, PAD, SRC_LEN, TGT_LEN, TINY_SIZES, VOCAB, random_batch, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    MarianConfig,
    MarianMTModel,
    PreTrainedModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.cache_utils import EncoderDecoderCache
from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
)

from hf_vanilla_transformer.tokenization import train_tokenizer

FAMILIES = ["vanilla", "marian"]
# The decoder output's cache field in the installed transformers (`past_key_values` renamed `cache` in 5.24).
_DECODER_FIELDS = BaseModelOutputWithPastAndCrossAttentions.__dataclass_fields__
CACHE_FIELD = "cache" if "cache" in _DECODER_FIELDS else "past_key_values"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared CPU a second thread of each 12 x 12 matmul waits
    for a core far longer than the product takes (three Trainer steps went from 0.2 s to 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_marian(seed: int = 0, **overrides) -> MarianMTModel:
    """A Marian model with conftest's characteristic sizes and this package's special ids, built, not downloaded."""
    values = dict(
        **TINY_SIZES,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return MarianMTModel(MarianConfig(**values)).eval()


def build(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    return tiny_model(seed, **overrides) if family == "vanilla" else tiny_marian(seed, **overrides)


def shared_pointers(model: PreTrainedModel) -> set[int]:
    """Storage addresses of the encoder embedding, decoder embedding and output projection: one if all are tied."""
    inner = model.model
    weights = (inner.encoder.embed_tokens.weight, inner.decoder.embed_tokens.weight, model.lm_head.weight)
    return {weight.data_ptr() for weight in weights}


def logits_of(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits


def greedy(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], num_beams: int = 1, **kwargs) -> torch.Tensor:
    input_ids, attention_mask, _ = batch
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, max_new_tokens=6, **kwargs
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def check_token_ids(ids: torch.Tensor, batch_size: int, max_new_tokens: int = 6) -> None:
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == batch_size, (ids.dtype, ids.shape)
    assert 2 <= ids.shape[1] <= 1 + max_new_tokens
    assert (ids[:, 0] == BOS).all() and ((ids >= 0) & (ids < VOCAB)).all()


def token_dataset(rows: int = 4, seed: int = 0) -> datasets.Dataset:
    input_ids, attention_mask, labels = random_batch(seed=seed, batch=rows)
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def stack_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """The rows of `token_dataset` all have the same lengths: stacking is all the padding they need."""
    return {key: torch.tensor([feature[key] for feature in features]) for key in features[0]}


def trainer_args(output_dir: Path, **overrides) -> Seq2SeqTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return Seq2SeqTrainingArguments(**values)


# ----------------------------------------------------------------------------------------------- 1. PEFT LoRA

LORA_TARGETS = {"attention": ["q_proj", "v_proj"], "attention+lm_head": ["q_proj", "v_proj", "lm_head"]}


def with_lora(model: PreTrainedModel, targets: str) -> PeftModel:
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[targets], task_type="SEQ_2_SEQ_LM"
    )
    with warnings.catch_warnings():  # the tied-lm_head warning has its own test below
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(model, config)


def perturb_adapters(peft_model: PeftModel, seed: int = 0) -> None:
    """LoRA starts with B = 0 (the adapted model is the base model); give B values so the adapters matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)


def lora_names(peft_model: PeftModel) -> list[str]:
    return [name for name, _ in peft_model.named_parameters() if "lora_" in name]


def check_adapted_modules(peft_model: PeftModel, targets: str) -> None:
    names = lora_names(peft_model)
    for module in LORA_TARGETS[targets]:
        assert any(f".{module}.lora_A." in name for name in names), (module, names)
        assert any(f".{module}.lora_B." in name for name in names), (module, names)
    assert all(any(f".{module}.lora_" in name for module in LORA_TARGETS[targets]) for name in names), names


@pytest.mark.slow
@pytest.mark.parametrize("targets", list(LORA_TARGETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trainer_steps_change_the_adapters_and_only_them(family, targets, tmp_path):
    model = with_lora(build(family), targets)
    check_adapted_modules(model, targets)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(lora_names(model))
    trainer = Seq2SeqTrainer(
        model=model, args=trainer_args(tmp_path), train_dataset=token_dataset(), data_collator=stack_collator
    )
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    frozen_changed = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n].detach())]
    lora_unchanged = [n for n in before if "lora_" in n and torch.equal(before[n], after[n].detach())]
    assert frozen_changed == [], f"base parameters changed: {frozen_changed}"
    assert lora_unchanged == [], f"adapter parameters the training did not change: {lora_unchanged}"
    model.eval()
    batch = random_batch(seed=1)
    for num_beams in (1, 4):
        check_token_ids(greedy(model, batch, num_beams=num_beams), batch_size=2)


@pytest.mark.parametrize("targets", list(LORA_TARGETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_saved_and_loaded_on_a_fresh_base_gives_the_same_outputs(family, targets, tmp_path):
    model = with_lora(build(family, seed=3), targets)
    perturb_adapters(model)
    model.eval()
    batch = random_batch(seed=4)
    adapted_logits, adapted_ids = logits_of(model, batch), greedy(model, batch, num_beams=4)
    base_logits = logits_of(build(family, seed=3), batch)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapters change the outputs
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only, not the base model

    reloaded = PeftModel.from_pretrained(build(family, seed=3), tmp_path / "adapter").eval()
    check_adapted_modules(reloaded, targets)
    torch.testing.assert_close(logits_of(reloaded, batch), adapted_logits, rtol=0, atol=1e-6)
    assert torch.equal(greedy(reloaded, batch, num_beams=4), adapted_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merge_and_unload_of_attention_adapters_gives_the_adapted_outputs(family):
    model = with_lora(build(family, seed=5), "attention")
    perturb_adapters(model)
    model.eval()
    batch = random_batch(seed=6)
    adapted_logits, adapted_ids = logits_of(model, batch), greedy(model, batch, num_beams=4)
    merged = model.merge_and_unload()
    assert type(merged) is type(build(family))
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert len(shared_pointers(merged)) == 1  # still one embedding matrix
    torch.testing.assert_close(logits_of(merged, batch), adapted_logits, rtol=0, atol=1e-5)
    assert torch.equal(greedy(merged, batch, num_beams=4), adapted_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_tied_output_projection_is_flagged_and_merges_into_the_shared_matrix(family):
    """PEFT documents the limit of an adapter on a tied output projection: it warns (`tie_word_embeddings` ...
    "can lead to complications, for example when merging the adapter"). Merging writes the adapter's delta into the
    one matrix that the output projection shares with both embeddings, so the embeddings change too and the merged
    model is not the adapted one. Marian does exactly the same; this pins that our model is no different."""
    base = build(family, seed=7)
    shared_before = base.lm_head.weight.detach().clone()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["attention+lm_head"])
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        model = get_peft_model(base, config)
    perturb_adapters(model)
    delta = model.base_model.model.lm_head.get_delta_weight("default").detach().clone()
    assert delta.abs().max() > 1e-3
    merged = model.merge_and_unload()
    assert len(shared_pointers(merged)) == 1
    torch.testing.assert_close(merged.lm_head.weight.detach(), shared_before + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.model.encoder.embed_tokens.weight.detach(), shared_before + delta)


@pytest.mark.parametrize("targets", list(LORA_TARGETS))
def test_lora_with_the_fused_training_loss_still_trains_the_adapters(targets):
    """train.py sets `fused_training_loss` on the model: the loss it then computes from the hidden states and the
    output weight must be the adapted model's loss, with the adapters' gradients, as without it."""
    base = build("vanilla", seed=8)
    model = with_lora(base, targets)
    perturb_adapters(model)
    model.train()
    input_ids, attention_mask, labels = random_batch(seed=9, batch=3)
    results = {}
    for fused in (True, False):
        base.fused_training_loss = fused
        model.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[fused] = (loss.detach(), grads)
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results[True], results[False]
    torch.testing.assert_close(fused_loss, plain_loss, rtol=0, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() == set(lora_names(model))
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------- 2. torch.compile


class GraphCounter:
    """A torch.compile backend that runs each captured graph eagerly and counts the graphs: a recompilation is one
    more graph. (Recompilations are decided before any backend, so "eager" shows them as inductor would.)"""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph.forward


@pytest.fixture
def graph_counter() -> GraphCounter:
    torch._dynamo.reset()
    yield GraphCounter()
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "mode"), [("vanilla", "train_with_labels"), ("vanilla", "eval"), ("marian", "eval")]
)  # Marian's training forward would add 6 s of tracing and check transformers, not this package
def test_compiled_forward_equals_eager_and_does_not_recompile(family, mode, graph_counter):
    model = build(family, seed=10)
    if family == "vanilla":
        model.fused_training_loss = True  # as train.py runs it
    model.train(mode == "train_with_labels")
    compiled = torch.compile(model.forward, backend=graph_counter)
    batches = [random_batch(seed=seed, batch=3) for seed in (11, 12, 13)]  # same shapes, different tokens

    def run(forward, batch):
        input_ids, attention_mask, labels = batch
        model.zero_grad()
        with torch.set_grad_enabled(mode == "train_with_labels"):
            out = forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            if mode == "train_with_labels":
                out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out, grads

    graphs = []
    for batch in batches:
        expected, expected_grads = run(model.forward, batch)
        got, got_grads = run(compiled, batch)
        graphs.append(graph_counter.graphs)
        assert type(got) is type(expected)
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
        if expected.logits is None:  # a training step of the fused loss returns no logits, compiled or not
            assert got.logits is None and mode == "train_with_labels"
        else:
            torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
        assert got_grads.keys() == expected_grads.keys()
        assert bool(got_grads) is (mode == "train_with_labels")
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0], graphs[0]], graphs  # no recompile for the same shapes


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_with_a_compiled_forward_gives_the_same_tokens_and_compiles_once(num_beams, graph_counter):
    """With the default dynamic cache, transformers leaves compiling to the user: compile the forward, and
    generate() calls the compiled function at every step. (The static-cache route, and Marian, are the next test;
    Marian here passes too, but its three graphs cost 13 s of tracing.)"""
    model = build("vanilla", seed=14)
    batch = random_batch(seed=15, batch=3)
    expected = greedy(model, batch, num_beams=num_beams)
    model.forward = torch.compile(model.forward, backend=graph_counter)
    first = greedy(model, batch, num_beams=num_beams)
    after_first = graph_counter.graphs
    second = greedy(model, batch, num_beams=num_beams)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert after_first >= 1  # the compiled forward did run
    assert graph_counter.graphs == after_first, "the second generate() call recompiled"


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation_works_or_is_refused_clearly(family):
    """`cache_implementation="static"` (the cache transformers compiles decoding with) either decodes the same
    tokens as the dynamic cache, as Marian does, or is refused with an error that names the static cache, not one
    from deep inside the model."""
    model = build(family, seed=16)
    batch = random_batch(seed=17, batch=2)
    expected = greedy(model, batch)
    try:
        got = greedy(model, batch, cache_implementation="static")
    except (ValueError, NotImplementedError) as error:
        assert "static" in str(error).lower(), f"unclear error for cache_implementation='static': {error}"
        assert family != "marian", "Marian supports the static cache"
    else:
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------- 3. int8 (CPU)


def quantized(model: PreTrainedModel) -> PreTrainedModel:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao; still works
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_int8_quantization_generates_and_stays_close(family):
    model = build(family, seed=18)
    int8 = quantized(model)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())  # every Linear was replaced
    assert sum(isinstance(m, dynamic_linear) for m in int8.modules()) == sum(
        type(m) is torch.nn.Linear for m in model.modules()
    )
    assert type(model.lm_head) is torch.nn.Linear  # inplace=False: the fp32 model is left as it was
    batch = random_batch(seed=19, batch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        int8_logits = logits_of(int8, batch)
        outputs = {num_beams: greedy(int8, batch, num_beams=num_beams) for num_beams in (1, 4)}
    fp32_logits = logits_of(model, batch)
    assert int8_logits.shape == fp32_logits.shape and int8_logits.dtype == torch.float32
    assert not torch.equal(int8_logits, fp32_logits)  # int8 arithmetic did run
    assert cosine(int8_logits, fp32_logits) > 0.99
    for ids in outputs.values():
        check_token_ids(ids, batch_size=3)


# ----------------------------------------------------------------------------------------------- 4. bf16 loading


@pytest.mark.parametrize("dtype_kwarg", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_in_bfloat16(family, dtype_kwarg, tmp_path):
    model = build(family, seed=20)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, **{dtype_kwarg: torch.bfloat16}).eval()
    assert type(loaded) is type(model)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert len(shared_pointers(loaded)) == 1
    batch = random_batch(seed=21, batch=3)
    logits = logits_of(loaded, batch)
    assert logits.dtype == torch.bfloat16
    assert cosine(logits, logits_of(model, batch)) > 0.99
    for num_beams in (1, 4):
        ids = greedy(loaded, batch, num_beams=num_beams)
        check_token_ids(ids, batch_size=3)
        reference = greedy(model, batch, num_beams=num_beams)
        if ids.shape == reference.shape:  # a tiny random model: bf16 rounding may tip a close argmax
            assert (ids == reference).float().mean() >= 0.5


# ----------------------------------------------------------------------------------------------- 5. loading options


@pytest.mark.parametrize("load_kwargs", [{"device_map": "auto"}, {"low_cpu_mem_usage": True}], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_device_map_and_low_cpu_mem_usage_loading_keep_weights_and_ties(family, load_kwargs, tmp_path):
    model = build(family, seed=22)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, **load_kwargs).eval()
    assert type(loaded) is type(model)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert len(shared_pointers(loaded)) == 1  # encoder, decoder embeddings and lm_head: one tensor
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for key in saved:
        assert torch.equal(saved[key], reloaded[key]), key
    batch = random_batch(seed=23, batch=3)
    assert torch.equal(greedy(loaded, batch, num_beams=4), greedy(model, batch, num_beams=4))


# ----------------------------------------------------------------------------------------------- 6. resizing


@pytest.mark.parametrize("family", FAMILIES)
def test_resize_token_embeddings_keeps_the_three_way_tie(family, tmp_path):
    model = build(family, seed=24)
    old = model.get_input_embeddings().weight.detach().clone()
    new_size = VOCAB + 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedding = model.resize_token_embeddings(new_size)
    assert isinstance(embedding, torch.nn.Embedding) and embedding.weight.shape == (new_size, D_MODEL)
    assert model.config.vocab_size == new_size
    assert len(shared_pointers(model)) == 1
    assert model.get_output_embeddings().weight.shape == (new_size, D_MODEL)
    torch.testing.assert_close(model.get_input_embeddings().weight[:VOCAB].detach(), old, rtol=0, atol=0)
    input_ids, attention_mask, labels = random_batch(seed=25)
    input_ids[0, 0], labels[0, 1] = new_size - 1, new_size - 2  # new token ids, in and out
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, TGT_LEN, new_size) and torch.isfinite(out.loss)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == new_size and len(shared_pointers(loaded)) == 1
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    model.eval()
    batch = (input_ids, attention_mask, labels)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- 7. checkpointing


def checkpointing_on(model: PreTrainedModel) -> bool:
    """`is_activation_checkpointing` (transformers 5), else the older `is_gradient_checkpointing`."""
    if hasattr(model, "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def gradients_and_recomputations(model: PreTrainedModel, batch: tuple[torch.Tensor, ...]):
    """One training forward and backward: every parameter's gradient, and how often the first encoder layer's
    feed-forward network ran (twice when activation checkpointing recomputes it in backward)."""
    input_ids, attention_mask, labels = batch
    layer = model.model.encoder.layers[0]
    first_ffn = layer.ffn if hasattr(layer, "ffn") else layer.fc1  # ours, Marian's
    calls = []
    handle = first_ffn.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.train()
        model.zero_grad()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    finally:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls)


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(family, method):
    if not hasattr(PreTrainedModel, method):  # activation_checkpointing_* is the transformers 5.x name
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {method}")
    model = build(family, seed=26)
    batch = random_batch(seed=27, batch=3)
    plain, plain_runs = gradients_and_recomputations(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_* are deprecated aliases
        getattr(model, method)()
    assert checkpointing_on(model)
    checkpointed, checkpointed_runs = gradients_and_recomputations(model, batch)
    assert (plain_runs, checkpointed_runs) == (1, 2)  # the layer really was recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_seq2seq_trainer_with_gradient_checkpointing_trains_like_without(tmp_path):
    """`Seq2SeqTrainingArguments(gradient_checkpointing=True)`: the Trainer turns it on, the steps recompute the
    layers, and three steps end where three steps without it end (dropout 0: deterministic)."""
    results = {}
    for checkpointing in (False, True):
        model = build("vanilla", seed=28)
        model.fused_training_loss = True  # as train.py runs it
        calls = []
        model.model.encoder.layers[0].ffn.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        args = trainer_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=token_dataset(), data_collator=stack_collator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = trainer.train()
        assert checkpointing_on(model) is checkpointing
        assert result.global_step == 3 and len(calls) == (6 if checkpointing else 3)
        results[checkpointing] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------- 8. outputs

ENCODER_LAYERS, DECODER_LAYERS = 2, 3  # different, so a count taken from the wrong stack shows


def eager_model(family: str, seed: int = 30) -> PreTrainedModel:
    model = build(family, seed=seed, encoder_layers=ENCODER_LAYERS, decoder_layers=DECODER_LAYERS)
    model.set_attn_implementation("eager")
    return model


def check_stack(states, attentions, layers: int, batch: int, q_len: int, k_len: int) -> None:
    assert isinstance(states, tuple) and len(states) == layers + 1, len(states)
    assert all(s.shape == (batch, q_len, D_MODEL) for s in states), [s.shape for s in states]
    assert isinstance(attentions, tuple) and len(attentions) == layers, len(attentions)
    assert all(a.shape == (batch, HEADS, q_len, k_len) for a in attentions), [a.shape for a in attentions]
    for weights in attentions:  # rows of attention weights: probabilities over the keys
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, HEADS, q_len), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_returns_all_attentions_and_hidden_states(family):
    model = eager_model(family)
    input_ids, attention_mask, labels = random_batch(seed=31)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            output_attentions=True,
            output_hidden_states=True,
        )
    assert type(out) is Seq2SeqLMOutput
    check_stack(out.encoder_hidden_states, out.encoder_attentions, ENCODER_LAYERS, 2, SRC_LEN, SRC_LEN)
    check_stack(out.decoder_hidden_states, out.decoder_attentions, DECODER_LAYERS, 2, TGT_LEN, TGT_LEN)
    assert len(out.cross_attentions) == DECODER_LAYERS
    assert all(a.shape == (2, HEADS, TGT_LEN, SRC_LEN) for a in out.cross_attentions)
    # Masks: no decoder position sees a later one, no cross-attention reads source padding (row 1 is padded).
    for weights in out.decoder_attentions:
        assert (weights.triu(diagonal=1) == 0).all()
    padding = attention_mask[1] == 0
    assert padding.any() and all((a[1][..., padding] == 0).all() for a in out.cross_attentions)
    assert torch.equal(out.encoder_last_hidden_state, out.encoder_hidden_states[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_and_decoder_alone_return_transformers_output_classes(family):
    model = eager_model(family)
    input_ids, attention_mask, labels = random_batch(seed=32)
    with torch.no_grad():
        encoder = model.get_encoder()(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True
        )
        assert type(encoder) is BaseModelOutput
        check_stack(encoder.hidden_states, encoder.attentions, ENCODER_LAYERS, 2, SRC_LEN, SRC_LEN)
        decoder = model.get_decoder()(
            input_ids=labels,
            encoder_hidden_states=encoder.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=True,
            output_hidden_states=True,
            output_attentions=True,
        )
    assert type(decoder) is BaseModelOutputWithPastAndCrossAttentions, type(decoder)
    check_stack(decoder.hidden_states, decoder.attentions, DECODER_LAYERS, 2, TGT_LEN, TGT_LEN)
    assert len(decoder.cross_attentions) == DECODER_LAYERS
    assert all(a.shape == (2, HEADS, TGT_LEN, SRC_LEN) for a in decoder.cross_attentions)
    cache = getattr(decoder, CACHE_FIELD)
    assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == TGT_LEN
    assert decoder.last_hidden_state.shape == (2, TGT_LEN, D_MODEL)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_attentions_and_hidden_states(family, num_beams):
    model = eager_model(family)
    input_ids, attention_mask, _ = random_batch(seed=33, batch=2)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=num_beams,
        max_new_tokens=4,
        min_new_tokens=4,
        output_attentions=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    expected_class = GenerateBeamEncoderDecoderOutput if num_beams > 1 else GenerateEncoderDecoderOutput
    assert type(out) is expected_class
    assert out.sequences.shape == (2, 5)
    rows = 2 * num_beams  # decoder rows: one per beam
    assert len(out.encoder_attentions) == ENCODER_LAYERS and len(out.encoder_hidden_states) == ENCODER_LAYERS + 1
    assert all(a.shape == (2, HEADS, SRC_LEN, SRC_LEN) for a in out.encoder_attentions)
    steps = out.sequences.shape[1] - 1
    assert len(out.decoder_attentions) == len(out.cross_attentions) == len(out.decoder_hidden_states) == steps
    for step in range(steps):
        assert len(out.decoder_attentions[step]) == len(out.cross_attentions[step]) == DECODER_LAYERS
        assert len(out.decoder_hidden_states[step]) == DECODER_LAYERS + 1
        assert all(a.shape == (rows, HEADS, 1, step + 1) for a in out.decoder_attentions[step])
        assert all(a.shape == (rows, HEADS, 1, SRC_LEN) for a in out.cross_attentions[step])
        assert all(h.shape == (rows, 1, D_MODEL) for h in out.decoder_hidden_states[step])


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_without_eager_attention(family, caplog):
    """Under sdpa no attention weights exist. Marian (transformers' own behaviour) logs a warning and returns empty
    tuples; ours refuses with an error that says to use the eager implementation, in forward and in generate()."""
    model = build(family, seed=34)
    assert model.config._attn_implementation == "sdpa"
    input_ids, attention_mask, labels = random_batch(seed=35)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    if family == "marian":
        with torch.no_grad():
            out = model(**call, labels=labels)
        assert out.encoder_attentions == () and out.decoder_attentions == () and out.cross_attentions == ()
        return
    with pytest.raises(ValueError, match="eager"):
        model(**call, labels=labels)
    with pytest.raises(ValueError, match="eager"):
        model.generate(**call, max_new_tokens=3, num_beams=1, return_dict_in_generate=True)
    model.set_attn_implementation("eager")  # the way the error names
    with torch.no_grad():
        assert len(model(**call, labels=labels).encoder_attentions) == 2


# ----------------------------------------------------------------------------------------------- 9. attention switch


@pytest.mark.parametrize("family", FAMILIES)
def test_switching_the_attention_implementation_after_loading(family, tmp_path):
    model = build(family, seed=36)
    model.save_pretrained(tmp_path)
    batch = random_batch(seed=37, batch=3)
    logits = {}
    for step, implementation in enumerate(["sdpa", "eager", "sdpa"]):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        assert model.model.decoder.config._attn_implementation == implementation
        logits[step] = logits_of(model, batch)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[2], logits[0], rtol=0, atol=0)

    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config._attn_implementation == "eager"
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    torch.testing.assert_close(logits_of(loaded, batch), logits[1], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unavailable_attention_implementation_is_an_error(family, tmp_path):
    """flash_attention_2 (not installed here, and not supported by ours): transformers raises ImportError for
    Marian, ValueError for a model that does not declare support; either way nothing else runs silently."""
    model = build(family, seed=38)
    model.save_pretrained(tmp_path)
    batch = random_batch(seed=39)
    before = logits_of(model, batch)
    with pytest.raises((ValueError, ImportError), match=r"(?i)flash ?attention ?2"):
        model.set_attn_implementation("flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits_of(model, batch), before, rtol=0, atol=0)
    with pytest.raises((ValueError, ImportError), match=r"(?i)flash ?attention ?2"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


# ----------------------------------------------------------------------------------------------- 10. push_to_hub


@pytest.mark.slow
def test_push_to_hub_then_load_where_the_package_cannot_be_imported(monkeypatch, tmp_path):
    """model.push_to_hub and tokenizer.push_to_hub with the Hub client replaced by test_hub's recorder; the committed
    files, written out as the Hub repository would hold them, load in a fresh interpreter that cannot import the
    package (test_hub.CHILD: `trust_remote_code=True`) and decode what this process decodes."""
    from test_hub import CHILD, REPO_ID, install_hub_recorder

    hub = install_hub_recorder(monkeypatch)
    sentences = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20
    tokenizer = train_tokenizer(sentences, vocab_size=VOCAB + 60)
    model = tiny_model(seed=40, vocab_size=len(tokenizer))
    model.push_to_hub(REPO_ID)
    tokenizer.push_to_hub(REPO_ID)
    assert hub.repos == [REPO_ID, REPO_ID] and len(hub.uploads) == 2
    repo = tmp_path / "hub_repo"
    repo.mkdir()
    for files in hub.uploads:
        for name, data in files.items():
            (repo / name).write_bytes(data)
    names = {p.name for p in repo.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_vanilla_transformer.py", "tokenizer.json"} <= names

    source = "the cat ran in the park"
    inputs = tokenizer(source, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6)  # the saved generation config: beam 4
        logits = model(**inputs, decoder_input_ids=ids).logits
    hf_home, elsewhere = tmp_path / "hf_home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-I", "-c", CHILD, source, "6", str(repo)]
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT=", 1)[1])
    assert report["package_importable"] is False and report["package_modules"] == []
    loaded = report[str(repo)]
    assert loaded["model_module"].startswith("transformers_modules.") and loaded["tied"]
    assert loaded["input_ids"] == inputs["input_ids"].tolist()
    assert loaded["ids"] == ids.tolist()
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, rtol=0, atol=1e-6)
