"""The §5.4 loss, plain and fused with the output projection (`losses.py`): the same value and gradients.

Tolerances: fp32 paths agree to 1e-5 (absolute, on losses of about 3.6 and on gradients; only the order of float
sums differs), bf16 autocast to 2e-2 relative (bf16 has 8 bits of mantissa).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.trainer_pt_utils import LabelSmoother

from hf_vanilla_transformer import losses
from hf_vanilla_transformer.losses import can_fuse, fused_linear_cross_entropy, label_smoothed_cross_entropy


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
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}  # frozen: none
    return out, loss.detach(), grads


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [3, 256])  # several chunks (3 rows each) and one
def test_fused_loss_equals_trainer_label_smoother_on_full_logits(monkeypatch, epsilon, chunk_rows):
    monkeypatch.setattr(losses, "FUSED_LOSS_CHUNK_ROWS", chunk_rows)
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


def test_logits_are_left_out_only_of_training_steps_that_opted_in():
    model = tiny_model()
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


def test_plain_loss_is_trainer_label_smoother():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), _padded_labels(torch.randint(0, 11, (2, 5)))
    expected = LabelSmoother(0.1)({"logits": logits}, labels, shift_labels=False)
    assert label_smoothed_cross_entropy(logits, labels, 0.1).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.slow
def test_fused_loss_keeps_fp16_gradients_as_well_as_the_plain_path():
    """fp16 autocast with a 2**16 loss scale, V = 37,000 and 3,000 rows, against fp32: the fused loss's gradients
    point where fp32's do at least as well as the plain logits + cross-entropy path's (cosine), for both inputs."""
    torch.manual_seed(0)
    rows, dim, vocab, eps, scale = 3000, 32, 37000, 0.1, 2.0**16
    hidden = torch.randn(1, rows, dim)
    weight = torch.randn(vocab, dim) * dim**-0.5
    labels = torch.randint(0, vocab, (1, rows))

    def grads(fused: bool, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            if fused:
                loss = fused_linear_cross_entropy(h, w, labels, eps)
            else:
                loss = label_smoothed_cross_entropy(torch.nn.functional.linear(h, w), labels, eps)
        (loss * (scale if half else 1.0)).backward()
        return h.grad.double() / (scale if half else 1.0), w.grad.double() / (scale if half else 1.0)

    reference = grads(fused=False, half=False)
    cosine = torch.nn.functional.cosine_similarity
    for fused in (False, True):
        for got, want in zip(grads(fused, half=True), reference, strict=True):
            assert torch.isfinite(got).all()
            similarity = cosine(got.flatten(), want.flatten(), dim=0).item()
            assert similarity > 0.9999, (fused, similarity)  # the division before fp16 (until now) gave 0.998


def test_the_fused_loss_steps_aside_for_a_hooked_or_sharded_output_projection():
    """ZeRO-3 and FSDP gather a partitioned weight in hooks around the module's forward: reading `lm_head.weight`
    directly would see an empty shard. With a hook there, the loss goes through the module, and is the same."""
    model = tiny_model(label_smoothing=0.1).train()
    input_ids, attention_mask, labels = random_batch()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "return_logits": False}
    fused = model(**batch)
    calls: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(1))
    hooked = model(**batch)
    assert calls == [1] and hooked.logits is None  # through the module; the caller still asked for no logits
    assert hooked.loss.item() == pytest.approx(fused.loss.item(), abs=1e-5)
    plain, shard = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 3, bias=False)
    shard.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the module's forward
    assert can_fuse(plain) and not can_fuse(shard) and not can_fuse(torch.nn.Linear(4, 3))  # the last: a bias


class _Marked(torch.Tensor):
    """A tensor subclass that changes nothing: a stand-in for a DTensor or torchao's quantized weights."""


def test_the_fused_loss_reads_only_a_provably_plain_output_projection():
    """Exactly `nn.Linear`, no bias, no hooks, a plain non-empty dense parameter: anything else may compute more than
    `hidden @ weight.T` (an adapter, a quantized layer, a sharded weight), so the loss runs the module instead."""

    def linear() -> torch.nn.Linear:
        return torch.nn.Linear(4, 3, bias=False)

    class Subclass(torch.nn.Linear):
        pass

    assert can_fuse(linear())
    assert not can_fuse(torch.nn.Linear(4, 3))  # a bias
    assert not can_fuse(Subclass(4, 3, bias=False))
    assert not can_fuse(torch.nn.Linear(4, 3, bias=False, device="meta"))
    for hook in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"):
        hooked = linear()
        getattr(hooked, hook)(lambda *args: None)
        assert not can_fuse(hooked), hook
    accelerated = linear()
    accelerated._hf_hook = object()  # what accelerate's add_hook_to_module sets
    assert not can_fuse(accelerated)
    subclassed = linear()
    subclassed.weight = torch.nn.Parameter(subclassed.weight.detach().as_subclass(_Marked))
    assert not can_fuse(subclassed)


@pytest.mark.parametrize("targets", [["lm_head"], ["q_proj", "v_proj", "lm_head"]])
def test_a_lora_adapter_on_the_output_projection_is_in_the_fused_training_loss(targets):
    """A PEFT LoRA layer in `lm_head`'s place with `fused_training_loss` set (as train.py sets it): the loss goes
    through the adapter, and equals the plain path's, gradients too. (Reading the wrapped weight directly left the
    adapter out: another loss, and with the adapter on `lm_head` alone no gradient at all.)"""
    peft = pytest.importorskip("peft")
    model = tiny_model(label_smoothing=0.1)
    model.fused_training_loss = True
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=targets, r=4, init_lora_weights=False)  # B nonzero: the adapter counts
    adapted = peft.get_peft_model(model, config).train()
    labels = _padded_labels(random_batch()[2])
    fused_out, fused_loss, fused_grads = _loss_and_grads(adapted, labels)  # the training step asks for no logits
    plain_out, plain_loss, plain_grads = _loss_and_grads(adapted, labels, return_logits=True)
    assert fused_out.logits is None and plain_out.logits is not None
    assert fused_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert any("lm_head.lora_B" in name for name in plain_grads)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert not can_fuse(model.lm_head)  # the fused loss stepped aside for the adapter


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the operands of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.append(tuple(arg.dtype for arg in args if isinstance(arg, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_fused_loss_multiplies_in_autocasts_dtype_as_nn_linear_would(autocast):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 12, requires_grad=True)
    weight = torch.randn(37, 12, requires_grad=True)
    labels = _padded_labels(torch.randint(0, 37, (2, 5)))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None), _MatmulDtypes() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, labels, 0.1)
    loss.backward()
    assert mode.seen and set(mode.seen) == {(autocast or torch.float32,) * 2}
    assert loss.dtype == hidden.grad.dtype == weight.grad.dtype == torch.float32
