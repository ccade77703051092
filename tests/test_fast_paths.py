"""Speed never changes results: each optimised path against the plain eager computation it replaces.

Tolerances: fp32 paths agree to 1e-5 (absolute, on losses of about 3.6 and on gradients; only the order of float
sums differs), bf16 autocast to 2e-2 relative (bf16 has 8 bits of mantissa).
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import decode_step_by_step, random_batch, tiny_model
from transformers.trainer_pt_utils import LabelSmoother

import hf_vanilla_transformer.modeling_vanilla_transformer as modeling
from hf_vanilla_transformer.modeling_vanilla_transformer import fused_linear_cross_entropy


def _padded_labels(labels: torch.Tensor) -> torch.Tensor:
    labels = labels.clone()
    labels[1, 2:] = -100  # a short target: padding the loss must skip
    return labels


def _loss_and_grads(model, labels, **kwargs):
    input_ids, attention_mask, _ = random_batch()
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    loss = out.loss
    if out.logits is not None:  # the plain path: transformers' own smoother over the full logits, as Trainer does
        loss = LabelSmoother(model.config.label_smoothing)({"logits": out.logits}, labels, shift_labels=False)
    loss.backward()
    return out, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [3, 256])  # several chunks (3 rows each) and one
def test_fused_loss_equals_trainer_label_smoother_on_full_logits(monkeypatch, epsilon, chunk_rows):
    monkeypatch.setattr(modeling, "FUSED_LOSS_CHUNK_ROWS", chunk_rows)
    model = tiny_model(label_smoothing=epsilon).train()  # dropout 0: both passes compute the same function
    labels = _padded_labels(random_batch()[2])
    fused_out, fused_loss, fused_grads = _loss_and_grads(model, labels, return_logits=False)
    plain_out, plain_loss, plain_grads = _loss_and_grads(model, labels)
    assert fused_out.logits is None and plain_out.logits is not None
    assert fused_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert plain_out.loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)  # the model's own plain loss too
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_loss_matches_the_formula_of_section_5_4():
    """(1 - eps) * -log p(y) + eps * mean_v -log p(v), averaged over the rows, written out by hand."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(6, 4)
    labels = torch.tensor([[1, 5, -100], [0, 2, 3]])
    eps = 0.2
    log_p = torch.log_softmax(hidden @ weight.T, dim=-1)
    terms = [
        (1 - eps) * -log_p[b, t, labels[b, t]] - eps * log_p[b, t].mean()
        for b in range(2)
        for t in range(3)
        if labels[b, t] != -100
    ]
    expected = torch.stack(terms).mean()
    assert fused_linear_cross_entropy(hidden, weight, labels, eps).item() == pytest.approx(expected.item(), abs=1e-6)


def test_logits_are_left_out_only_of_training_steps_that_opted_in(model):
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    model.train()
    assert model(**batch).logits is not None  # the transformers default: logits with the loss
    assert model(**batch, return_logits=False).logits is None
    model.fused_training_loss = True  # as train.py sets it
    assert model(**batch).logits is None  # a training step: the loss only
    assert model(**batch, return_logits=True).logits.shape == (*labels.shape, model.config.vocab_size)
    with torch.no_grad():
        assert model(**batch).logits is not None  # no gradients: not a training step
    assert model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=labels).logits is not None
    model.eval()
    assert model(**batch).logits is not None


def test_fused_loss_under_bf16_autocast_is_close_to_the_plain_path():
    model = tiny_model(label_smoothing=0.1).train()
    labels = _padded_labels(random_batch()[2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fused_loss, fused_grads = _loss_and_grads(model, labels, return_logits=False)
        _, plain_loss, plain_grads = _loss_and_grads(model, labels)
    assert torch.isfinite(fused_loss)
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=2e-2)
    for name in ("model.encoder.embed_tokens.weight", "model.decoder.layers.0.ffn.fc1.weight"):  # tied lm_head
        fused, plain = fused_grads[name], plain_grads[name]
        assert fused.dtype == plain.dtype == torch.float32
        assert (fused - plain).norm() <= 2e-2 * plain.norm(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_a_1_minus_p_share_scaled_by_1_over_1_minus_p(dtype):
    """F.dropout's definition, checked against the binomial distribution: 4M draws at p = 0.1 keep 0.9 of the
    elements within 5 standard deviations (7.5e-4); a mask drawn in bf16 (u rounded to 1/256) would keep 0.898."""
    p, n = 0.1, 4_000_000
    x = torch.full((n // 1000, 1000), 2.0, dtype=dtype, requires_grad=True)
    out = modeling.apply_dropout(x, p, training=True)
    kept = out != 0
    scale = torch.tensor(2.0 / (1 - p), dtype=dtype)
    assert torch.equal(out[kept], scale.expand(int(kept.sum())))  # the rest scaled by 1 / (1 - p)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach() / 2)  # d out / d x: the mask times 1 / (1 - p)


def test_dropout_is_reproducible_from_the_seed_and_leaves_the_edge_cases_to_torch():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    first = modeling.apply_dropout(x, 0.3, training=True)
    torch.manual_seed(3)
    assert torch.equal(modeling.apply_dropout(x, 0.3, training=True), first)
    assert not torch.equal(modeling.apply_dropout(x, 0.3, training=True), first)  # a fresh mask per call
    assert modeling.apply_dropout(x, 0.3, training=False) is x
    assert modeling.apply_dropout(x, 0.0, training=True) is x
    assert torch.equal(modeling.apply_dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"1\.5"):
        modeling.apply_dropout(x, 1.5, training=True)


def test_training_drops_out_where_section_5_4_says(monkeypatch):
    """§5.4: on the output of each sub-layer and on the sums of embeddings and positional encodings, in both
    stacks: 2 embedding sums + 2 encoder layers x 2 sub-layers + 2 decoder layers x 3 = 12 draws at P_drop."""
    model = tiny_model(dropout=0.1).train()
    draws: list[float] = []
    original = modeling.apply_dropout
    monkeypatch.setattr(modeling, "apply_dropout", lambda x, p, training: draws.append(p) or original(x, p, training))
    input_ids, attention_mask, labels = random_batch()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert draws.count(0.1) == 12


def _projection_grads(model, fused: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    calls = _count_calls(monkeypatch, modeling.VanillaTransformerAttention, "_fused_projections")
    if not fused:
        monkeypatch.setattr(modeling.VanillaTransformerAttention, "_fusable", lambda self: False)
    input_ids, attention_mask, labels = random_batch()
    model.zero_grad()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_training_stacks_the_projections_and_gets_the_separate_projections_gradients(attn_implementation, monkeypatch):
    """One GEMM for Q, K, V (self-attention) and for K, V (cross-attention) in training: the same loss and
    gradients for every parameter as three separate linears (dropout 0), and it ran in all 2 + 2 x 2 attentions."""
    model = tiny_model(attn_implementation=attn_implementation).train()
    fused_loss, fused_grads, fused_calls = _projection_grads(model, True, monkeypatch)
    plain_loss, plain_grads, plain_calls = _projection_grads(model, False, monkeypatch)
    assert (fused_calls, plain_calls) == (6, 0)
    assert fused_loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_stacked_projections_stand_aside_for_wrapped_or_watched_layers_and_without_gradients(monkeypatch):
    """Reading the weights directly would bypass a LoRA-style wrapper or a hook: those layers run as modules."""
    model = tiny_model().train()
    calls = _count_calls(monkeypatch, modeling.VanillaTransformerAttention, "_fused_projections")
    seen: list[int] = []
    model.model.encoder.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: seen.append(1))
    wrapped = model.model.decoder.layers[1].encoder_attn
    delta = torch.nn.Linear(12, 12)
    torch.nn.init.normal_(delta.weight)

    class Adapter(torch.nn.Module):  # what an adapter library puts in a projection's place
        def __init__(self, base):
            super().__init__()
            self.base, self.weight, self.bias = base, base.weight, base.bias

        def forward(self, x):
            return self.base(x) + delta(x)

    wrapped.v_proj = Adapter(wrapped.v_proj)
    input_ids, attention_mask, labels = random_batch()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert seen == [1] and len(calls) == 4  # 6 attentions, less the hooked one and the wrapped one
    assert delta.weight.grad is not None and delta.weight.grad.abs().sum() > 0  # the adapter took part
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert len(calls) == 4


@pytest.mark.parametrize("rows", [1, 5, 70])  # a decoding step, a few rows, many rows
@pytest.mark.parametrize("shape", [(12, 37), (600, 1024)])
def test_inference_linear_equals_f_linear(rows, shape, monkeypatch):
    """`VanillaTransformerLinear` without gradients (oneDNN) against `F.linear` with gradients."""
    if modeling._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN")
    calls = []
    onednn = modeling._ONEDNN_LINEAR
    monkeypatch.setattr(modeling, "_ONEDNN_LINEAR", lambda *args: calls.append(1) or onednn(*args))
    torch.manual_seed(0)
    layer = modeling.VanillaTransformerLinear(shape[1], shape[0])
    x = torch.randn(2, rows, shape[1])
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x.transpose(0, 1)), reference.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # both ran on oneDNN
    assert layer(x).requires_grad and len(calls) == 2  # with gradients: F.linear, differentiable


def _count_reorders(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every weight oneDNN reorders; skip where this torch build cannot."""
    if modeling._ONEDNN_REORDER is None:
        pytest.skip("this torch build has no oneDNN weight reorder")
    shapes: list[tuple[int, ...]] = []
    reorder = modeling._ONEDNN_REORDER
    monkeypatch.setattr(
        modeling, "_ONEDNN_REORDER", lambda weight, rows: shapes.append(tuple(weight.shape)) or reorder(weight, rows)
    )
    return shapes


def test_a_reordered_weight_is_made_once_per_scope_and_gives_what_f_linear_gives(monkeypatch):
    reorders = _count_reorders(monkeypatch)
    torch.manual_seed(0)
    layer = modeling.VanillaTransformerLinear(64, 96)
    one_row, rows = torch.randn(1, 1, 64), torch.randn(7, 1, 64)
    with torch.no_grad(), modeling.reordered_linear_weights([layer]):
        torch.testing.assert_close(layer(one_row), F.linear(one_row, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert reorders == []  # one row: the plain weight serves as well
        for x in (rows, torch.randn(3, 5, 64), one_row):  # the layout made for 7 rows serves any count
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        assert reorders == [(96, 64)]  # made once, then reused
    assert layer.reordered_weight is None and not layer.reuse_reordered_weight  # dropped with the scope
    with torch.no_grad():
        layer(rows)
    assert reorders == [(96, 64)]  # outside the scope nothing is kept or made


def test_generate_reorders_the_step_weights_and_sees_weights_changed_between_calls(monkeypatch):
    """`generate()` keeps oneDNN's layout of the weights its steps run, for that call only: a weight changed between
    two calls without bumping its version counter (as fused AdamW and `.data` do) is seen by the next call."""
    reorders = _count_reorders(monkeypatch)
    model = tiny_model(seed=3)
    config = model.config
    input_ids, attention_mask, _ = random_batch(seed=7, batch=3)
    kwargs = {"attention_mask": attention_mask, "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 6}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    fast = model.generate(input_ids, **kwargs)
    d, ff = config.d_model, config.decoder_ffn_dim
    per_layer = [(3 * d, d)] + [(d, d)] * 3 + [(ff, d), (d, ff)]  # self-attention q|k|v, o; cross q, o; fc1, fc2
    assert sorted(reorders) == sorted(per_layer * config.decoder_layers + [(config.vocab_size, d)])
    assert all(m.reordered_weight is None for m in model.modules() if isinstance(m, modeling.VanillaTransformerLinear))
    assert all(layer.self_attn.step_projections == () for layer in model.model.decoder.layers)
    monkeypatch.setattr(modeling, "reordered_linear_weights", lambda modules: contextlib.nullcontext())
    plain = model.generate(input_ids, **kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    for ours, theirs in zip(fast.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    version = model.model.decoder.layers[0].ffn.fc2.weight._version
    for layer in model.model.decoder.layers:
        layer.ffn.fc2.weight.data.mul_(3.0)
    assert model.model.decoder.layers[0].ffn.fc2.weight._version == version  # nothing tells that it changed
    changed_plain = model.generate(input_ids, **kwargs)
    monkeypatch.undo()  # the real scope again
    reorders = _count_reorders(monkeypatch)
    changed_fast = model.generate(input_ids, **kwargs)
    assert reorders  # it did reorder, from the changed weights
    for ours, theirs in zip(changed_fast.scores, changed_plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(changed_fast.scores, fast.scores, strict=True))


def test_a_stacked_linear_computes_its_linears_side_by_side():
    torch.manual_seed(0)
    linears = [modeling.VanillaTransformerLinear(12, n) for n in (12, 5, 12)]
    stacked = modeling.VanillaTransformerLinear.stack(linears)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        expected = torch.cat([F.linear(x, linear.weight, linear.bias) for linear in linears], dim=-1)
        torch.testing.assert_close(stacked(x), expected, atol=1e-6, rtol=1e-6)
    assert stacked.weight.shape == (29, 12) and not stacked.weight.requires_grad
    linears[0].weight.data.zero_()  # a copy: later changes to the layers do not reach it
    assert stacked.weight[:12].abs().sum() > 0
    no_bias = modeling.VanillaTransformerLinear(12, 4, bias=False)
    with torch.no_grad():
        expected = torch.cat([linears[1](x), F.linear(x, no_bias.weight)], dim=-1)
        torch.testing.assert_close(modeling.VanillaTransformerLinear.stack([linears[1], no_bias])(x), expected)
    assert modeling.VanillaTransformerLinear.stack([no_bias, no_bias]).bias is None
    with pytest.raises(ValueError, match="different input sizes"):
        modeling.VanillaTransformerLinear.stack([no_bias, modeling.VanillaTransformerLinear(5, 4)])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_stacks_the_self_attention_projections_for_its_steps_only(num_beams, monkeypatch):
    """Within `generate()` a decoding step computes Q, K, V with one linear (checked, so this cannot pass by it not
    running): the same tokens, and scores within 1e-5, as three linears; the stacked copy is gone after the call."""
    model = tiny_model(seed=3)
    input_ids, attention_mask, _ = random_batch(seed=7, batch=3)
    kwargs = {"attention_mask": attention_mask, "num_beams": num_beams, "max_new_tokens": 6, "min_new_tokens": 6}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    stacked_calls: list[int] = []
    made: list[bool] = []
    stack = modeling.VanillaTransformerLinear.stack

    def counted_stack(linears):
        made.append(any(frame.function == "decoding_step" for frame in inspect.stack()))  # inside a step
        stacked = stack(linears)
        stacked.register_forward_hook(lambda *args: stacked_calls.append(1))
        return stacked

    monkeypatch.setattr(modeling.VanillaTransformerLinear, "stack", staticmethod(counted_stack))
    fast = model.generate(input_ids, **kwargs)
    assert len(stacked_calls) == 6 * model.config.decoder_layers  # every step, every layer
    assert made == [True] * model.config.decoder_layers  # one copy per layer and call, made at its first step
    assert all(layer.self_attn.step_projections == () for layer in model.model.decoder.layers)
    assert "step_projections" not in str(list(model.state_dict()))
    monkeypatch.setattr(modeling, "stacked_step_projections", lambda attentions: contextlib.nullcontext())
    plain = model.generate(input_ids, **kwargs)
    assert len(stacked_calls) == 6 * model.config.decoder_layers
    assert torch.equal(fast.sequences, plain.sequences)
    for ours, theirs in zip(fast.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_stacked_step_projections_stand_aside_for_a_watched_projection():
    """A hook on W^K of one decoder self-attention, even one registered during `generate()`, still sees every step."""
    model = tiny_model(seed=3)
    input_ids, attention_mask, _ = random_batch(seed=7, batch=2)
    watched = model.model.decoder.layers[1].self_attn
    seen: list[tuple[int, ...]] = []

    class HookOnSecondStep(modeling.LogitsProcessor):  # registers the hook while generate() runs
        def __call__(self, ids, scores):
            if ids.shape[1] == 2:
                watched.k_proj.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
            return scores

    model.generate(
        input_ids,
        attention_mask=attention_mask,
        num_beams=1,
        max_new_tokens=5,
        min_new_tokens=5,
        logits_processor=modeling.LogitsProcessorList([HookOnSecondStep()]),
    )
    assert seen == [(2, 1, model.config.d_model)] * 3  # steps 3 to 5 ran W^K as its own module


def _count_calls(monkeypatch, cls: type, method: str) -> list[int]:
    """Count the calls of `cls.method` (still calling it), so a test cannot pass by a fast path not being taken."""
    calls: list[int] = []
    original = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, *args: calls.append(1) or original(self, *args))
    return calls


def _count_unpadded_layers(monkeypatch) -> list[int]:
    return _count_calls(monkeypatch, modeling.VanillaTransformerAttention, "forward_unpadded")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("overrides", [{}, {"normalize_before": True}, {"norm_type": "batchnorm"}])
def test_the_encoder_skipping_padding_gets_what_the_padded_layout_gets(attn_implementation, overrides, monkeypatch):
    """In inference the encoder runs on the real tokens only (checked, so this cannot pass by not doing so): the same
    states at every real position, to 1e-5, for every layer; zeros at the padding positions."""
    model = tiny_model(**overrides)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, _ = random_batch(batch=4)  # 43% padding
    encoder = model.get_encoder()
    calls = _count_unpadded_layers(monkeypatch)
    with torch.no_grad():
        unpadded = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        assert len(calls) == model.config.encoder_layers
        monkeypatch.setattr(modeling, "UNPADDED_MIN_PADDING", 2.0)  # never
        padded = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert len(calls) == model.config.encoder_layers
    real = attention_mask.bool()
    states = zip(unpadded.hidden_states, padded.hidden_states, strict=True)
    for ours, theirs in [(unpadded.last_hidden_state, padded.last_hidden_state), *states]:
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(ours[~real], torch.zeros_like(ours[~real]))


@pytest.mark.parametrize(
    ("setup", "call"),
    [
        ("train", {}),  # dropout draws its masks over the padded layout, as ever
        ("eval", {"output_attentions": True}),  # attention weights come in the padded layout
        ("little padding", {}),  # under UNPADDED_MIN_PADDING
        ("additive", {}),
    ],
)
def test_the_encoder_keeps_the_padded_layout_where_skipping_does_not_apply(setup, call, monkeypatch):
    model = tiny_model(**({"attention_type": "additive"} if setup == "additive" else {}))
    model.set_attn_implementation("eager")
    model.train(setup == "train")
    input_ids, attention_mask, _ = random_batch(batch=4)
    if setup == "little padding":
        attention_mask[:, :] = 1
        attention_mask[3, -1] = 0  # 1 position in 28: under a fifth
    calls = _count_unpadded_layers(monkeypatch)
    with torch.no_grad():
        out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, **call)
    assert calls == []
    assert out.last_hidden_state[~attention_mask.bool()].abs().sum() > 0  # computed, not zeroed


def test_the_encoder_compiles_on_a_padded_batch_without_graph_breaks():
    """Compiling keeps the padded layout: the number of real tokens would be a data-dependent shape."""
    model = tiny_model()
    input_ids, attention_mask, _ = random_batch(batch=4)  # 43% padding: unpadded when not compiling
    encoder = model.get_encoder()
    with torch.no_grad():
        explained = torch._dynamo.explain(encoder)(input_ids=input_ids, attention_mask=attention_mask)
        reference = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        compiled = torch.compile(encoder, backend="inductor")(input_ids=input_ids, attention_mask=attention_mask)
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]
    real = attention_mask.bool()
    torch.testing.assert_close(compiled.last_hidden_state[real], reference[real], atol=1e-5, rtol=1e-5)


def test_generate_with_the_unpadded_encoder_finds_what_the_padded_one_finds(monkeypatch):
    model = tiny_model(seed=3)
    input_ids, attention_mask, _ = random_batch(seed=7, batch=4)
    kwargs = {"attention_mask": attention_mask, "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 6}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    calls = _count_unpadded_layers(monkeypatch)
    fast = model.generate(input_ids, **kwargs)
    assert len(calls) == model.config.encoder_layers
    monkeypatch.setattr(modeling, "UNPADDED_MIN_PADDING", 2.0)
    plain = model.generate(input_ids, **kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    for ours, theirs in zip(fast.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("causal", "q_len", "k_len", "mask"),
    [
        (True, 5, 5, None),  # training / a full forward: the kernel's own causal masking
        (True, 2, 6, None),  # two new tokens after four cached ones: causal, aligned to the bottom right
        (True, 1, 6, None),  # a decoding step: nothing to mask
        (False, 3, 7, "bool"),  # cross-attention over a padded source
        (False, 3, 7, "float"),
    ],
)
def test_sdpa_attention_equals_the_eager_formula(causal, q_len, k_len, mask):
    """Our direct call of torch's fused kernel against the written-out softmax(QK^T / sqrt(d_k)) V of §3.2.1."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, q_len, 8), torch.randn(2, 4, k_len, 8), torch.randn(2, 4, k_len, 8)
    module = torch.nn.Module()
    module.is_causal = causal
    if mask is not None:
        keep = torch.ones(2, 1, q_len, k_len, dtype=torch.bool)
        keep[1, ..., -2:] = False  # the second source ends in two padding positions
        mask = keep if mask == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    expected, _ = modeling.scaled_dot_product_attention(module, query, key, value, mask, scaling=8**-0.5)
    output, weights = modeling.sdpa_attention(module, query, key, value, mask, scaling=8**-0.5)
    assert weights is None and output.shape == (2, q_len, 4, 8)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_inference_logits_equal_training_path_logits(model):
    """The whole model without gradients (oneDNN linears, kept masks) against the same forward with gradients."""
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": labels}
    reference = model(**batch).logits.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-5, rtol=1e-5)


def test_cached_one_token_steps_equal_the_plain_full_forward():
    """Decoding steps skip the causal mask, reuse the cross-attention mask and run the inference linears; the
    reference is one full forward with gradients enabled, which takes none of those paths."""
    model = tiny_model()
    input_ids, attention_mask, labels = random_batch()
    decoder_input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    reference = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    steps, past = decode_step_by_step(model, input_ids, attention_mask, decoder_input_ids)
    assert past._vanilla_cross_mask[0] is attention_mask  # the mask was kept, not rebuilt
    torch.testing.assert_close(steps, reference.detach(), atol=1e-5, rtol=1e-5)


def _count_decoding_steps(monkeypatch) -> list[int]:
    return _count_calls(monkeypatch, modeling.VanillaTransformerDecoderLayer, "decoding_step")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_runs_the_decoding_step_and_gets_what_the_general_layer_gets(
    attn_implementation, num_beams, monkeypatch
):
    """`generate()` takes `VanillaTransformerDecoderLayer.decoding_step` (checked, so this cannot pass by not taking
    it), and finds the same tokens with scores within 1e-5 as with every step through the general `forward`."""
    model = tiny_model(seed=3)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, _ = random_batch(seed=7, batch=3)
    kwargs = {"attention_mask": attention_mask, "num_beams": num_beams, "max_new_tokens": 8, "min_new_tokens": 8}
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    calls = _count_decoding_steps(monkeypatch)
    lean = model.generate(input_ids, **kwargs)
    assert len(calls) == 8 * model.config.decoder_layers  # every step, every layer
    monkeypatch.setattr(modeling.VanillaTransformerDecoderLayer, "is_decoding_step", lambda *args: False)
    general = model.generate(input_ids, **kwargs)
    assert len(calls) == 8 * model.config.decoder_layers
    assert torch.equal(lean.sequences, general.sequences)
    for ours, theirs in zip(lean.scores, general.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "call"),
    [
        ({}, {"output_attentions": True}),  # attention weights: only the general path returns them
        ({"norm_type": "batchnorm"}, {}),
        ({"attention_type": "additive"}, {}),
    ],
)
def test_the_decoding_step_stands_aside_where_it_does_not_apply(overrides, call, monkeypatch):
    model = tiny_model(**overrides)
    if call.get("output_attentions"):
        model.set_attn_implementation("eager")
    input_ids, attention_mask, labels = random_batch()
    decoder_input_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    calls = _count_decoding_steps(monkeypatch)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids[:, :1])
        calls.clear()  # the first step may take it (no attention weights asked for there)
        model(
            encoder_outputs=(out.encoder_last_hidden_state,),
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids[:, 1:2],
            past_key_values=getattr(out, modeling.CACHE_FIELD),
            **call,
        )
    assert calls == []


def test_the_decoding_step_stands_aside_in_training_mode(monkeypatch):
    model = tiny_model().train()  # dropout 0: the same function, but the general path must run
    input_ids, attention_mask, labels = random_batch()
    calls = _count_decoding_steps(monkeypatch)
    decode_step_by_step(model, input_ids, attention_mask, labels[:, :2])
    assert calls == []


def test_a_cached_decoding_step_compiles_without_graph_breaks():
    """torch.compile can take a whole decoding step as one graph (the CPU token-id check steps aside while compiling);
    the training forward breaks only where the fused loss selects the non-padding rows (a data-dependent shape)."""
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
    with torch.no_grad():  # and inductor compiles and runs it (the inference linears step aside for its own GEMMs)
        reference = model(**step, decoder_input_ids=start, use_cache=True).logits
        step["past_key_values"] = past_copy  # a step appends to the cache it is given: the same cache as above
        compiled = torch.compile(model, backend="inductor")(**step, decoder_input_ids=start, use_cache=True).logits
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    model.train()
    model.fused_training_loss = True
    explained = torch._dynamo.explain(model)(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    lines = {frame.lineno for reason in explained.break_reasons for frame in reason.user_stack[-1:]}
    source = inspect.getsource(modeling).splitlines()
    assert all(".nonzero()" in source[line - 1] for line in lines), lines
