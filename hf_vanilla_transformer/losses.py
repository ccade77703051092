"""The training loss of §5.4, label-smoothed cross-entropy, plain and fused with the §3.4 output projection.

`label_smoothed_cross_entropy` is the formula on full (B, T, V) logits. `fused_linear_cross_entropy` computes the
same loss and gradients from the decoder's hidden states and the output weight without ever holding the logits of
a whole batch, as Liger-Kernel's and cut-cross-entropy's fused losses do (torch has no such op). The model uses it
when asked (`return_logits=False`, or `fused_training_loss` set on the model, as `train.py` does); tests hold the
two to each other and to Trainer's `LabelSmoother`. `benchmarks/run.py --levers` measures what it saves.

This file imports only torch: `save_pretrained` copies it beside the modeling file for `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def label_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """The loss of §5.4 from full logits (B, T, V) and labels (B, T): the mean over positions not labelled -100 of
    (1 - epsilon) * -log p(y) + epsilon * mean_v -log p(v). Equal to transformers' `LabelSmoother`.

    Given `num_items_in_batch` (Trainer's count of the target tokens of a whole update: all its accumulation steps
    and processes), the sum of those per-token losses divided by it instead: summed over the update, every token
    weighs the same, as in one forward over the whole batch."""
    flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=epsilon)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=epsilon, reduction="sum")
    return total / _divisor(num_items_in_batch, total.device)


def _divisor(num_items_in_batch: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """Trainer's token count (an int, or a tensor, possibly float and on another device) as an fp32 scalar on
    `device`. No host sync: a count on an accelerator stays there."""
    return torch.as_tensor(num_items_in_batch, device=device).float().reshape(())


# Rows of logits materialised at once by the fused loss. Each chunk is one (rows, V) fp32 buffer: 8 MiB at V = 8000,
# 36 MiB at V = 37000, against 150 MB and more for a whole batch's logits, which glibc maps and unmaps every step.
FUSED_LOSS_CHUNK_ROWS = 256


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Output projection + label-smoothed cross-entropy, chunked over rows, with the gradients computed in the forward
    pass (as Liger-Kernel and cut-cross-entropy do; torch has no such op).

    Why by hand: the plain path keeps the (N, V) logits and log-probabilities for backward and writes two more (N, V)
    gradients there, five passes over V-wide memory per row; here one (chunk, V) buffer is turned in place into the
    gradient of the logits, softmax(z) - (1 - epsilon) onehot(y) - epsilon / V, and multiplied into both gradients
    at once. The matmul FLOPs are the same: z = h W^T, dL/dh = g W, dL/dW = g^T h.

    The loss is the sum over the N rows divided by `divisor`: N itself (the mean) or, in a Trainer update, the
    target-token count of the whole update (`num_items_in_batch`, over accumulation steps and processes). The
    gradients are kept per row, not yet divided by it, until `backward` multiplies them by the incoming gradient
    (which carries a GradScaler's loss scale) over the divisor in fp32: under fp16 autocast, dividing first would
    push the non-target entries (~epsilon / V / N, some 1e-9 at V = 37,000) below fp16's range.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, D): only the positions that count
        weight: torch.Tensor,  # (V, D): the tied embedding matrix
        targets: torch.Tensor,  # (N,)
        epsilon: float,
        chunk_rows: int,
        divisor: torch.Tensor,  # () fp32: the rows' count for their mean, or the update's token count
    ) -> torch.Tensor:
        device_type = hidden.device.type
        # Under autocast the matmuls run in its dtype, as nn.Linear's would; the softmax is always fp32.
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            rows, vocab = h.shape[0], w.shape[0]
            grad_hidden = torch.empty_like(h)
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, rows, chunk_rows):
                h_chunk, y = h[start : start + chunk_rows], targets[start : start + chunk_rows]
                z = torch.mm(h_chunk, w.t()).float()  # (c, V) logits
                lse = torch.logsumexp(z, dim=-1)  # (c,)
                nll = lse - z.gather(1, y[:, None]).squeeze(1)  # -log p(y)
                smooth = lse - z.mean(dim=-1)  # mean_v -log p(v)
                total += ((1.0 - epsilon) * nll + epsilon * smooth).sum()
                g = z.sub_(lse[:, None]).exp_().sub_(epsilon / vocab)  # in place: softmax(z) - epsilon / V
                g[torch.arange(g.shape[0], device=g.device), y] -= 1.0 - epsilon
                g = g.to(dtype)  # per row: the mean's 1 / N comes in backward, with the loss scale
                torch.mm(g, w, out=grad_hidden[start : start + chunk_rows])
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h_chunk)  # (V, c) @ (c, D), accumulated in place
                elif grad_weight is not None:
                    grad_weight += torch.mm(g.t(), h_chunk).float()  # half-precision product, fp32 sum
        ctx.save_for_backward(grad_hidden, grad_weight, divisor)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = grad_loss.float() / divisor  # the incoming (scaled) gradient over the divisor, in fp32
        grad_h = (grad_hidden.float() * scale).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None, None


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether anything runs around the module's forward or backward: torch hooks, or accelerate's (offloading,
    device placement). Code that reads a module's weight instead of calling it must step aside then."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hasattr(module, "_hf_hook")
    )


def can_fuse(output_projection: torch.nn.Module) -> bool:
    """Whether the fused loss may read the output projection's weight itself instead of running the module: only where
    the module provably computes `hidden @ weight.T` and nothing more. Its type is exactly `nn.Linear` (a PEFT LoRA
    layer, a quantized layer or any subclass adds to that, and runs as it is: the loss then takes the plain path), with
    no bias and no hooks (DeepSpeed ZeRO-3 and FSDP gather a partitioned weight in hooks around its forward; outside
    them the weight is an empty shard), and its weight is a plain non-empty dense `nn.Parameter` (not a DTensor or
    another tensor subclass, as torchao's quantized weights are, not meta). Not under `torch.compile`: the fused loss
    picks the rows that count, a data-dependent shape, which breaks the graph and recompiles for every new count of
    target tokens, while the plain loss compiles into one graph with dynamic shapes (and the compiler fuses it)."""
    if torch.compiler.is_compiling() or type(output_projection) is not torch.nn.Linear:
        return False
    weight = output_projection.weight
    return (
        output_projection.bias is None
        and not has_hooks(output_projection)
        and type(weight) is torch.nn.Parameter
        and weight.layout is torch.strided
        and not weight.is_meta
        and weight.numel() > 0
    )


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`label_smoothed_cross_entropy(hidden_states @ weight.T, labels, epsilon, num_items_in_batch)` without the
    (B, T, V) logits, and without projecting the positions labelled -100 at all (padding: about 10% of a token batch,
    more of a padded one).

    hidden_states (B, T, D), weight (V, D), labels (B, T). Same value and gradients as the plain path up to float
    rounding (tests hold them to 1e-5): the mean over target tokens, or their sum over `num_items_in_batch`.
    """
    rows = (labels.flatten() != -100).nonzero().squeeze(1)  # the one data-dependent shape (a graph break under compile)
    hidden, targets = hidden_states.flatten(0, 1).index_select(0, rows), labels.flatten().index_select(0, rows)
    count = rows.shape[0] if num_items_in_batch is None else num_items_in_batch
    divisor = _divisor(count, hidden_states.device)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, epsilon, FUSED_LOSS_CHUNK_ROWS, divisor)


__all__ = [
    "FUSED_LOSS_CHUNK_ROWS",
    "can_fuse",
    "fused_linear_cross_entropy",
    "has_hooks",
    "label_smoothed_cross_entropy",
]
