"""CPU inference (`cpu_inference.py`): `optimize_for_cpu_inference` swaps a model's provably plain linear layers for
oneDNN stand-ins, once, and `restore_linears` puts them back. The stand-ins compute what `nn.Linear` computes (to
1e-5: only the order of float sums differs, and exactly where they fall back to `F.linear`), `generate()` never
changes the module tree, whichever threads call it, and layers that are not plain run as they are."""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, random_batch, tiny_model
from torch import nn
from transformers import pipeline
from transformers.generation import LogitsProcessor

from hf_vanilla_transformer import VanillaTransformerForConditionalGeneration, cpu_inference
from hf_vanilla_transformer.cpu_inference import OneDNNLinear, optimize_for_cpu_inference, restore_linears
from hf_vanilla_transformer.tokenization import train_tokenizer

needs_onednn = pytest.mark.skipif(cpu_inference._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN")
THREADS = 8


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The tests' models are far below the size rule: let it pass every linear, except where a test checks the rule."""
    monkeypatch.setattr(cpu_inference, "MIN_WEIGHT_ENTRIES", 0)


@pytest.fixture
def fast_switching():
    """Threads switch every 10 µs instead of every 5 ms, so their calls interleave finely."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def _record(monkeypatch, op: str) -> list[tuple]:
    """Record the arguments of each call of one of cpu_inference's oneDNN ops (still calling it), so that a test
    cannot pass by the fast path not being taken."""
    calls: list[tuple] = []
    original = getattr(cpu_inference, op)
    monkeypatch.setattr(cpu_inference, op, lambda *args: calls.append(args) or original(*args))
    return calls


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module object: two of these are equal only if every place holds the very same module."""
    return dict(model.named_modules())


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def _stand_ins(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is OneDNNLinear]


def _generate_kwargs(num_beams: int = 2, seed: int = 7) -> dict:
    input_ids, attention_mask, _ = random_batch(seed=seed, batch=3)
    return {
        "input_ids": input_ids,
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


def _in_threads(count: int, work: Callable[[int], None]) -> None:
    """Run work(0) ... work(count - 1) in as many threads, started together; re-raise here what any of them raised
    (an exception in a thread would otherwise vanish)."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def guarded(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------------------------- one stand-in


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 70])  # a decoding step, a few rows, many rows
@pytest.mark.parametrize("shape", [(12, 37), (600, 1024)])
def test_a_stand_in_computes_what_its_linear_computes(rows, shape, bias, monkeypatch):
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
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
    assert stand_in.to_linear() is linear


def test_a_stand_in_stands_in_only_for_a_plain_linear():
    stand_in = OneDNNLinear(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="not a OneDNNLinear"):
        OneDNNLinear(stand_in)


@needs_onednn
def test_the_weight_is_reordered_at_the_first_call_of_several_rows_and_kept_while_unchanged(monkeypatch):
    reorders = _record(monkeypatch, "_ONEDNN_REORDER")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    stand_in = OneDNNLinear(linear)
    one_row, rows = torch.randn(1, 1, 64), torch.randn(7, 1, 64)

    def check(*inputs: torch.Tensor) -> None:
        with torch.no_grad():
            for x in inputs:
                torch.testing.assert_close(stand_in(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)

    check(one_row)
    assert reorders == []  # one row: the plain weight serves as well
    check(rows, torch.randn(3, 5, 64), one_row, rows)  # the layout made for 7 rows serves any count, in later calls too
    assert [(tuple(weight.shape), count) for weight, count in reorders] == [((96, 64), 7)]
    stand_in(rows).sum().backward()  # a forward with gradients (a training step) drops the kept layout
    check(rows)
    assert len(reorders) == 2
    with torch.no_grad():  # written in place through the parameter: its version counter tells
        linear.weight.mul_(2.0)
    check(rows)
    assert len(reorders) == 3
    stand_in.load_state_dict(nn.Linear(64, 96).state_dict())  # copies into the same parameters, bumping the version
    check(rows)
    linear.weight.data = torch.randn(96, 64)  # new storage, the version unchanged
    check(rows)
    assert len(reorders) == 5
    copy.deepcopy(stand_in)  # the kept layout (an opaque oneDNN tensor) is left out of copies


@needs_onednn
def test_under_cpu_autocast_a_stand_in_computes_in_autocasts_dtype_as_nn_linear_does(monkeypatch):
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(3, 5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = linear(x), OneDNNLinear(linear)(x)
    assert expected.dtype == got.dtype == torch.bfloat16
    assert torch.equal(got, expected) and calls == []


# ------------------------------------------------------------------------------------------- the conversion


@needs_onednn
@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_of_a_converted_model_runs_every_linear_on_onednn_and_finds_what_nn_linear_finds(
    num_beams, attention_bias, monkeypatch
):
    model = tiny_model(seed=3, attention_bias=attention_bias)
    originals = _modules(model)
    kwargs = _generate_kwargs(num_beams)
    plain = model.generate(**kwargs)
    assert optimize_for_cpu_inference(model) is model
    config = model.config
    per_encoder_layer, per_decoder_layer = 6, 10  # q, k, v, o (+ q, k, v, o of cross-attention), fc1, fc2
    converted = _stand_ins(model)
    assert len(converted) == per_encoder_layer * config.encoder_layers + per_decoder_layer * config.decoder_layers + 1
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    reorders = _record(monkeypatch, "_ONEDNN_REORDER")
    fast = model.generate(**kwargs)
    assert len(reorders) == len(converted)  # each weight once, at its first call (each has 3+ rows here)
    step = 8 * config.decoder_layers + 1  # a decoding step: all but the cross-attention K, V, and the output layer
    once = per_encoder_layer * config.encoder_layers + 2 * config.decoder_layers  # encoder; cross-attention K, V
    assert len(calls) == 6 * step + once  # every step, every step linear; the others once
    _assert_same_search(fast, plain)
    _assert_same_search(model.generate(**kwargs), plain)
    assert len(reorders) == len(converted)  # the second call reordered nothing: the layouts were kept
    with torch.backends.mkldnn.flags(enabled=False):  # the documented off switch holds for a converted model too
        _assert_same_search(model.generate(**kwargs), plain)
    assert len(calls) == 2 * (6 * step + once)
    assert restore_linears(model) is model and _modules(model) == originals  # the very same modules are back
    assert _stand_ins(restore_linears(model)) == []


def test_the_conversion_keeps_the_parameters_and_a_second_changes_nothing(tmp_path):
    model = tiny_model(seed=3)
    state = model.state_dict()
    optimize_for_cpu_inference(model)
    converted = _modules(model)
    assert optimize_for_cpu_inference(model) is model and _modules(model) == converted
    after = model.state_dict()
    assert list(after) == list(state)  # same keys, same order
    assert all(after[key].data_ptr() == state[key].data_ptr() for key in state)  # the same tensors
    assert model.lm_head.weight is model.model.encoder.embed_tokens.weight  # still tied
    kwargs = _generate_kwargs()
    expected = model.generate(**kwargs)  # also keeps oneDNN layouts, which copies leave out
    _assert_same_search(copy.deepcopy(model).generate(**kwargs), expected)
    model.save_pretrained(tmp_path)
    loaded = VanillaTransformerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert _stand_ins(loaded) == []  # the conversion is not saved: a loaded model is plain
    _assert_same_search(loaded.generate(**kwargs), expected)


@needs_onednn
def test_a_training_step_after_conversion_is_seen_by_the_next_generate():
    """Fused AdamW writes the weights without bumping their version counter; the forward with gradients before it
    drops the kept layouts, so the next `generate()` reads the new weights."""
    model = optimize_for_cpu_inference(tiny_model(seed=3))
    kwargs = _generate_kwargs()
    before = model.generate(**kwargs)  # every layout made and kept
    weight = model.model.decoder.layers[0].ffn.fc2.weight
    version = weight._version
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    input_ids, attention_mask, labels = random_batch()
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    optimizer.step()
    model.eval()
    assert weight._version == version  # nothing tells that the weights changed
    after = model.generate(**kwargs)
    _assert_same_search(after, restore_linears(model).generate(**kwargs))
    assert not all(torch.equal(a, b) for a, b in zip(after.scores, before.scores, strict=True))


@pytest.mark.parametrize("setting", ["bf16", "onednn disabled"])
def test_nothing_is_swapped_where_it_does_not_apply(setting):
    model = tiny_model()
    if setting == "bf16":
        model = model.to(torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=setting != "onednn disabled"):
        assert not cpu_inference.applies(model)
        types = _types(model)
        optimize_for_cpu_inference(model)
    assert _types(model) == types


def test_only_linears_large_enough_to_repay_onednn_are_swapped(monkeypatch):
    monkeypatch.setattr(cpu_inference, "MIN_WEIGHT_ENTRIES", 2**16)
    assert _stand_ins(optimize_for_cpu_inference(tiny_model())) == []  # d_model 12: nothing repays the call
    large_vocab = tiny_model(vocab_size=6_000)  # an output projection of 72,000 entries
    expected = ["lm_head"] if cpu_inference.applies(large_vocab) else []
    assert _stand_ins(optimize_for_cpu_inference(large_vocab)) == expected


# ------------------------------------------------------------------------------------------------- threads


@needs_onednn
def test_threads_sharing_a_converted_model_each_get_what_they_get_alone(fast_switching):
    """Greedy and beam calls interleaved from eight threads on one converted model: each finds what it finds alone
    (and what the unconverted model finds), and the modules are those of the conversion throughout."""
    model = tiny_model(seed=3)
    original = _modules(model)
    cases = [_generate_kwargs(num_beams, seed) for seed in (7, 8) for num_beams in (1, 3)]
    unconverted = [model.generate(**kwargs) for kwargs in cases]
    optimize_for_cpu_inference(model)
    converted = _modules(model)
    alone = [model.generate(**kwargs) for kwargs in cases]
    results: dict[tuple[int, int], object] = {}

    def work(thread: int) -> None:
        for repeat in range(4):
            results[thread, repeat] = model.generate(**cases[(thread + repeat) % len(cases)])

    _in_threads(THREADS, work)
    assert len(results) == THREADS * 4
    for (thread, repeat), output in results.items():
        case = (thread + repeat) % len(cases)
        _assert_same_search(output, alone[case])
        _assert_same_search(output, unconverted[case])
    assert _modules(model) == converted
    assert _modules(restore_linears(model)) == original


class _WatchModules(LogitsProcessor):
    """Records the type of every module of the model at every decoding step."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.seen = model, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append(_types(self.model))
        return scores


@pytest.mark.parametrize("converted", [False, True])
def test_generate_from_many_threads_never_changes_the_module_tree(converted, fast_switching):
    """`generate()` swaps nothing: an unconverted model keeps its `nn.Linear` layers at every step of every call, a
    converted one its stand-ins. (Until the conversion was made explicit, `generate()` swapped in stand-ins for its
    call, and a thread could leave one in place for good.)"""
    model = tiny_model(seed=3)
    if converted:
        optimize_for_cpu_inference(model)
        assert _stand_ins(model) or not cpu_inference.applies(model)
    modules = _modules(model)
    types = _types(model)
    watches = [_WatchModules(model) for _ in range(THREADS)]

    def work(thread: int) -> None:
        for repeat in range(3):
            kwargs = _generate_kwargs(num_beams=1 + 2 * ((thread + repeat) % 2), seed=7 + thread % 2)
            model.generate(**kwargs, logits_processor=[watches[thread]])

    _in_threads(THREADS, work)
    assert all(len(watch.seen) == 3 * 6 for watch in watches)
    assert all(seen == types for watch in watches for seen in watch.seen)
    assert _modules(model) == modules


@needs_onednn
def test_a_conversion_wraps_only_the_very_linear_it_read(monkeypatch):
    """Two conversions at once, one overtaking the other: the slow one judges and wraps the modules it read, not
    whatever another thread put in their place meanwhile. (The per-call swap listed the layers, then read each
    again to swap it: a stand-in another thread had put there was taken for the original, and later put back as
    such, for good.) Afterwards each place holds one stand-in for its own `nn.Linear`, and restoring gives every
    original back."""
    model = tiny_model(seed=3)
    originals = _modules(model)
    halfway, go_on = threading.Event(), threading.Event()
    plain_linear = cpu_inference._plain_linear

    def slow_in_the_thread(module: nn.Module) -> bool:
        if threading.current_thread() is not threading.main_thread() and not halfway.is_set():
            halfway.set()  # the thread has read the model and judges its first layer
            go_on.wait(timeout=30)
        return plain_linear(module)

    monkeypatch.setattr(cpu_inference, "_plain_linear", slow_in_the_thread)
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            optimize_for_cpu_inference(model)
        except BaseException as error:
            errors.append(error)

    slow = threading.Thread(target=convert)
    slow.start()
    assert halfway.wait(timeout=30)
    optimize_for_cpu_inference(model)  # the whole conversion, while the thread waits
    converted = _types(model)
    go_on.set()
    slow.join()
    assert errors == []
    assert _types(model) == converted
    for name in _stand_ins(model):
        assert model.get_submodule(name)._linear is originals[name]  # wraps the original
    assert _modules(restore_linears(model)) == originals


@needs_onednn
def test_converting_and_restoring_while_threads_generate(fast_switching):
    """Two threads convert and restore the model over and over while six others generate with it: every call
    finds what the plain model finds, and the last restore leaves every original module in place."""
    model = tiny_model(seed=3)
    originals = _modules(model)
    cases = [_generate_kwargs(num_beams, seed=8) for num_beams in (1, 3)]
    expected = [model.generate(**kwargs) for kwargs in cases]

    def work(thread: int) -> None:
        if thread < 2:
            for _ in range(20):
                optimize_for_cpu_inference(model)
                restore_linears(model)
            return
        for repeat in range(3):
            case = (thread + repeat) % len(cases)
            _assert_same_search(model.generate(**cases[case]), expected[case])

    _in_threads(THREADS, work)
    assert _modules(restore_linears(model)) == originals


# --------------------------------------------------------------------------------- layers that are not plain


class _Marked(torch.Tensor):
    """A tensor subclass that changes nothing: a stand-in for a DTensor or torchao's quantized weights."""


class _LinearSubclass(nn.Linear):
    pass


def _make_not_plain(model: nn.Module, change: str) -> list[int]:
    """Change decoder layer 0's fc1 so that it is no longer provably plain; returns a list its hooks append to."""
    ffn, calls = model.model.decoder.layers[0].ffn, []
    if change == "forward hook":
        ffn.fc1.register_forward_hook(lambda module, args, out: calls.append(1))
    elif change == "forward pre-hook":
        ffn.fc1.register_forward_pre_hook(lambda module, args: calls.append(1))
    elif change == "accelerate hook":
        ffn.fc1._hf_hook = object()  # what accelerate's add_hook_to_module sets
    elif change == "tensor subclass":
        ffn.fc1.weight = nn.Parameter(ffn.fc1.weight.detach().as_subclass(_Marked))
    elif change == "Linear subclass":
        subclass = _LinearSubclass(ffn.fc1.in_features, ffn.fc1.out_features)
        subclass.load_state_dict(ffn.fc1.state_dict())
        ffn.fc1 = subclass
    elif change == "inference tensor":
        with torch.inference_mode():
            weight = ffn.fc1.weight.detach().clone()
        ffn.fc1.weight = nn.Parameter(weight, requires_grad=False)
    return calls


@needs_onednn
@pytest.mark.parametrize(
    "change",
    ["forward hook", "forward pre-hook", "accelerate hook", "tensor subclass", "Linear subclass", "inference tensor"],
)
def test_a_linear_that_is_not_provably_plain_runs_as_it_is(change):
    model = tiny_model(seed=3)
    calls = _make_not_plain(model, change)
    kwargs = _generate_kwargs()
    expected = model.generate(**kwargs)
    layer = model.model.decoder.layers[0].ffn.fc1
    optimize_for_cpu_inference(model)
    assert model.model.decoder.layers[0].ffn.fc1 is layer
    assert type(model.model.decoder.layers[0].ffn.fc2) is OneDNNLinear  # the others are swapped
    calls.clear()
    _assert_same_search(model.generate(**kwargs), expected)
    if "hook" in change and change != "accelerate hook":
        assert calls  # the hook still runs


def test_a_dynamically_quantized_model_runs_as_it_is():
    quantized = torch.ao.quantization.quantize_dynamic(tiny_model(seed=3), {nn.Linear}, dtype=torch.qint8)
    kwargs = _generate_kwargs()
    expected = quantized.generate(**kwargs)
    modules = _modules(quantized)
    assert _modules(optimize_for_cpu_inference(quantized)) == modules
    _assert_same_search(quantized.generate(**kwargs), expected)


@needs_onednn
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["lm_head"]])
def test_lora_adapters_run_as_they_are_and_the_rest_is_converted(targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False)  # B nonzero: adapters matter
    model = peft.get_peft_model(tiny_model(seed=3), config).eval()
    kwargs = _generate_kwargs()
    expected = model.generate(**kwargs)
    adapted = [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    assert adapted
    before = _modules(model)
    optimize_for_cpu_inference(model)
    after = _modules(model)
    for name, module in before.items():
        if any(name == place or name.startswith(place + ".") for place in adapted):
            assert after[name] is module, name  # the adapter and all it holds, untouched
        elif type(module) is nn.Linear:
            assert type(after[name]) is OneDNNLinear, name
    _assert_same_search(model.generate(**kwargs), expected)
    assert _modules(restore_linears(model)) == before


# ----------------------------------------------------------------------------------------------- autocast


@needs_onednn
def test_under_cpu_autocast_a_converted_model_computes_in_bf16_as_the_plain_model_does(monkeypatch):
    model = tiny_model(seed=3)
    kwargs = _generate_kwargs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.generate(**kwargs)
    optimize_for_cpu_inference(model)
    dtypes: list[torch.dtype] = []
    for name in _stand_ins(model):
        model.get_submodule(name).register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    calls = _record(monkeypatch, "_ONEDNN_LINEAR")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.generate(**kwargs)
    assert dtypes and set(dtypes) == {torch.bfloat16} and calls == []
    _assert_same_search(got, expected)


# ----------------------------------------------------------------------------------------------- pipelines


@needs_onednn
def test_the_translation_pipeline_converts_its_model_once_when_built():
    sentences = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20
    tokenizer = train_tokenizer(sentences, vocab_size=VOCAB + 60)
    model = tiny_model(seed=3, vocab_size=len(tokenizer))
    source = tokenizer("the cat sat", return_tensors="pt")
    expected = model.generate(**source, max_new_tokens=6, num_beams=2)
    translator = pipeline("translation", model=model, tokenizer=tokenizer, max_new_tokens=6, num_beams=2)
    assert translator.model is model and "lm_head" in _stand_ins(model)
    converted = _modules(model)
    text = translator("the cat sat")[0]["translation_text"]
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    assert _modules(model) == converted
    pipeline("text2text-generation", model=model, tokenizer=tokenizer)  # a second pipeline on it: nothing changes
    assert _modules(model) == converted
