"""CPU inference (`cpu_inference.py`): during one `generate()` call oneDNN stand-ins run the linear layers of each
decoding step. They compute what `nn.Linear` computes (to 1e-5: only the order of float sums differs), leave the
model as they found it, and stand aside where they do not apply."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_model
from transformers.generation import LogitsProcessor, LogitsProcessorList

from hf_vanilla_transformer import cpu_inference
from hf_vanilla_transformer.cpu_inference import OneDNNLinear, inference_linears

needs_onednn = pytest.mark.skipif(cpu_inference._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The tests' models are far below the size rule: let it pass every linear, except where a test checks the rule."""
    monkeypatch.setattr(cpu_inference, "MIN_WEIGHT_ENTRIES", 0)


def _record(monkeypatch, op: str) -> list[tuple]:
    """Record the arguments of each call of one of cpu_inference's oneDNN ops (still calling it), so that a test
    cannot pass by the fast path not being taken."""
    calls: list[tuple] = []
    original = getattr(cpu_inference, op)
    monkeypatch.setattr(cpu_inference, op, lambda *args: calls.append(args) or original(*args))
    return calls


def _generate_kwargs(num_beams: int = 2) -> dict:
    _, attention_mask, _ = random_batch(seed=7, batch=3)
    return {
        "attention_mask": attention_mask,
        "num_beams": num_beams,
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "output_scores": True,
        "return_dict_in_generate": True,
    }


def _assert_same_search(fast, plain) -> None:
    assert torch.equal(fast.sequences, plain.sequences)
    for ours, theirs in zip(fast.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 70])  # a decoding step, a few rows, many rows
@pytest.mark.parametrize("shape", [(12, 37), (600, 1024)])
def test_a_stand_in_computes_what_its_linear_computes(rows, shape, bias, monkeypatch):
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0], bias=bias)
    stand_in = OneDNNLinear(linear)
    assert stand_in.weight is linear.weight and stand_in.bias is linear.bias  # shared, not copied
    assert stand_in.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(2, rows, shape[1])
    reference = linear(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(stand_in(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stand_in(x.transpose(0, 1)), reference.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # both ran on oneDNN
    assert stand_in(x).requires_grad and len(calls) == 2  # with gradients: F.linear, differentiable


@needs_onednn
def test_the_weight_is_reordered_once_at_the_first_call_of_several_rows(monkeypatch):
    reorders = _record(monkeypatch, "_ONEDNN_REORDER")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    stand_in = OneDNNLinear(linear)
    one_row = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(one_row), linear(one_row), atol=1e-5, rtol=1e-5)
        assert reorders == []  # one row: the plain weight serves as well
        for x in (torch.randn(7, 1, 64), torch.randn(3, 5, 64), one_row):  # the layout made for 7 rows serves any
            torch.testing.assert_close(stand_in(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
    assert [(tuple(weight.shape), rows) for weight, rows in reorders] == [((96, 64), 7)]  # made once, then reused


@needs_onednn
@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_runs_every_step_linear_on_onednn_and_finds_what_nn_linear_finds(
    num_beams, attention_bias, monkeypatch
):
    model = tiny_model(seed=3, attention_bias=attention_bias)
    modules = dict(model.named_modules())
    input_ids = random_batch(seed=7, batch=3)[0]
    kwargs = _generate_kwargs(num_beams)
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    reorders = _record(monkeypatch, "_ONEDNN_REORDER")
    fast = model.generate(input_ids, **kwargs)
    config = model.config
    d, ff = config.d_model, config.decoder_ffn_dim
    per_layer = [(d, d)] * 6 + [(ff, d), (d, ff)]  # self-attention q, k, v, o; cross-attention q, o; fc1, fc2
    step_linears = per_layer * config.decoder_layers + [(config.vocab_size, d)]
    assert sorted(tuple(weight.shape) for weight, _ in reorders) == sorted(step_linears)  # each once, 3+ rows
    once = len(inference_linears(model)) - len(step_linears)  # encoder, and cross-attention K, V of its output
    assert once == 6 * config.encoder_layers + 2 * config.decoder_layers
    assert len(calls) == 6 * len(step_linears) + once  # every step, every step linear; the others once
    assert dict(model.named_modules()) == modules  # the very same modules are back
    with torch.backends.mkldnn.flags(enabled=False):  # the documented way to turn it off
        plain = model.generate(input_ids, **kwargs)
    assert len(calls) == 6 * len(step_linears) + once
    _assert_same_search(fast, plain)


@needs_onednn
def test_each_call_reorders_afresh_and_sees_weights_changed_between_calls(monkeypatch):
    """A weight changed between two calls without bumping its version counter (as fused AdamW and `.data` do) is
    seen by the next call: no reordered copy outlives the call that made it."""
    model = tiny_model(seed=3)
    input_ids = random_batch(seed=7, batch=3)[0]
    kwargs = _generate_kwargs()
    before = model.generate(input_ids, **kwargs)
    version = model.model.decoder.layers[0].ffn.fc2.weight._version
    for layer in model.model.decoder.layers:
        layer.ffn.fc2.weight.data.mul_(3.0)
    assert model.model.decoder.layers[0].ffn.fc2.weight._version == version  # nothing tells that it changed
    reorders = _record(monkeypatch, "_ONEDNN_REORDER")
    after = model.generate(input_ids, **kwargs)
    assert reorders  # it reordered again, from the changed weights
    with torch.backends.mkldnn.flags(enabled=False):
        plain = model.generate(input_ids, **kwargs)
    _assert_same_search(after, plain)
    assert not all(torch.equal(a, b) for a, b in zip(after.scores, before.scores, strict=True))


class _Watch(LogitsProcessor):
    """Records the type of the output projection at every step, and raises at step `fail_at` if given."""

    def __init__(self, model, fail_at: int | None = None) -> None:
        self.model, self.fail_at, self.seen = model, fail_at, []

    def __call__(self, input_ids, scores):
        self.seen.append(type(self.model.lm_head))
        if len(self.seen) == self.fail_at:
            raise RuntimeError("stopped on purpose")
        return scores


@needs_onednn
def test_the_stand_ins_live_for_the_call_only_even_when_it_raises():
    model = tiny_model()
    input_ids, attention_mask, _ = random_batch()
    watch = _Watch(model)
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, logits_processor=[watch])
    assert watch.seen and set(watch.seen) == {OneDNNLinear}
    failing = _Watch(model, fail_at=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, logits_processor=[failing])
    assert not any(isinstance(module, OneDNNLinear) for module in model.modules())


def test_hooked_and_wrapped_linears_keep_running_as_they_are():
    """A forward hook, or an adapter in a projection's place (as LoRA libraries put there), still runs at every step."""
    model = tiny_model(seed=3)
    hooked = model.model.decoder.layers[0].ffn.fc1
    seen: list[tuple[int, ...]] = []
    hooked.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    attention = model.model.decoder.layers[1].self_attn

    class Adapter(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) * 2.0

    attention.v_proj = Adapter(attention.v_proj)
    places = [getattr(parent, name) for parent, name, _ in inference_linears(model)]
    assert hooked not in places and attention.v_proj not in places and attention.v_proj.base not in places
    input_ids, attention_mask, _ = random_batch()
    model.generate(input_ids, attention_mask=attention_mask, num_beams=1, max_new_tokens=4, min_new_tokens=4)
    assert len(seen) == 4 and type(attention.v_proj) is Adapter


@pytest.mark.parametrize("setting", ["bf16", "onednn disabled"])
def test_nothing_is_swapped_where_it_does_not_apply(setting):
    model = tiny_model()
    if setting == "bf16":
        model = model.to(torch.bfloat16)
    watch = _Watch(model)
    input_ids, attention_mask, _ = random_batch()
    with torch.backends.mkldnn.flags(enabled=setting != "onednn disabled"):
        assert not cpu_inference.applies(model)
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=2, logits_processor=[watch])
    assert set(watch.seen) == {torch.nn.Linear}


@needs_onednn
def test_threads_generating_with_one_model_each_get_what_they_get_alone():
    """Calls interleaved from four threads: each finds the tokens it finds alone, and the model is left as it was."""
    model = tiny_model(seed=3)
    batches = [random_batch(seed=seed, batch=3)[:2] for seed in (7, 8)]
    settings = {"num_beams": 2, "max_new_tokens": 8, "min_new_tokens": 8}
    alone = [model.generate(ids, attention_mask=mask, **settings) for ids, mask in batches]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for repeat in range(3):
                ids, mask = batches[(thread + repeat) % 2]
                results[thread, repeat] = model.generate(
                    ids, attention_mask=mask, logits_processor=LogitsProcessorList(), **settings
                )
        except BaseException as error:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for (thread, repeat), output in results.items():
        assert torch.equal(output, alone[(thread + repeat) % 2]), (thread, repeat)
    assert not any(isinstance(module, OneDNNLinear) for module in model.modules())


def test_only_linears_large_enough_to_repay_onednn_are_swapped(monkeypatch):
    monkeypatch.setattr(cpu_inference, "MIN_WEIGHT_ENTRIES", 2**16)
    small = tiny_model()
    assert inference_linears(small) == []  # d_model 12: nothing repays the call
    large_vocab = tiny_model(vocab_size=6_000)  # an output projection of 72,000 entries
    assert inference_linears(large_vocab) == [(large_vocab, "lm_head", True)]
