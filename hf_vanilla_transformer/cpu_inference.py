"""CPU speed for decoding, applied to a finished model from outside it, for the length of one `generate()` call.

`onednn_decoding(model)` swaps each plain `nn.Linear` that a decoding step runs (the decoder's, but for the
cross-attention key and value projections, whose output is cached, and the output projection) for a
`OneDNNLinear` holding the same parameters (those large enough to repay oneDNN's cost per call:
`MIN_WEIGHT_ENTRIES`), and puts the originals back when the call ends; the model's
`generate()` enters it. It applies on CPU in fp32, where torch was built with oneDNN and `torch.backends.mkldnn`
is enabled; elsewhere, and while compiling, it does nothing. `torch.backends.mkldnn.flags(enabled=False)` turns it
off. This follows transformers' quantizer and kernels integrations: the modeling file keeps `nn.Linear`, and speed
is a module swap at one documented point.

Why by hand: a decoding step multiplies each weight matrix by a few rows, once, after the rest of the model has
pushed it out of cache, and there torch's default fp32 GEMM (MKL) is far from the memory-bandwidth bound. oneDNN's
linear, the kernel torch.compile's CPU backend emits for a frozen model, is faster in that state, the more so once
the weight is kept in oneDNN's blocked layout (inductor's weight freezing stores the same layout): otherwise
oneDNN reorders the weight inside every call of more than one row. `benchmarks/run.py --levers` measures both,
whole `generate()` calls with and without; the results are in `benchmarks/README.md`.

Why per call: the reordered copy is right only while the weight does not change, and nothing cheap tells when it
does (fused AdamW writes parameters without bumping their version counter, nor does `weight.data.mul_`). Within
one `generate()` call the weights are fixed. Every call makes fresh stand-ins, so no copy outlives its call. Calls
from two threads on one model stay correct: a call finds the layers another call swapped already and leaves them
alone, and when the first call puts the originals back the other one goes on with plain `nn.Linear`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's fp32 linear (absent from torch builds without oneDNN), and its reorder of a weight into the blocked
# layout that linear reads fastest.
_ONEDNN_LINEAR = (
    torch.ops.mkldnn._linear_pointwise.default
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    else None
)
_ONEDNN_REORDER = (
    torch.ops.mkldnn._reorder_linear_weight.default
    if _ONEDNN_LINEAR is not None and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    else None
)


# Below this many weight entries a linear stays on MKL: a oneDNN call has a larger fixed cost than MKL's
# (`benchmarks/decoding_bounds.py` measures both), which only larger weights repay. On whole generate() calls
# (`benchmarks/results/2026-12-01_onednn_size_rule_all_linears.json`) models of d_model 64 decode fastest with nothing
# swapped, which this rule gives them; the small preset (d_model 256, its smallest matrix 2**16 entries) runs all on
# oneDNN, which was 1.0-1.5x faster than none; d_model 128 sits between (0.84-1.01 of the time with all swapped).
MIN_WEIGHT_ENTRIES = 2**16


class OneDNNLinear(nn.Linear):
    """Stands in for one `nn.Linear` during one `generate()` call: the same `weight` and `bias` parameters (the state
    dict is unchanged), computed by oneDNN's linear without gradients on CPU in fp32 and by `F.linear` otherwise.

    At its first call of more than one row it keeps a copy of the weight in oneDNN's layout for that row count (the
    layout serves any count), and uses it for the rest of the call. One-row calls read the plain weight as fast.
    """

    def __init__(self, linear: nn.Linear, keep_layout: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects, not copies
        self.bias = linear.bias
        self.keep_layout = keep_layout  # False for a layer run once a call: a reorder would cost more than it saves
        self.reordered_weight: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()  # oneDNN's op has no backward
            or not input.is_cpu
            or input.dtype is not torch.float32
            or self.weight.dtype is not torch.float32
            or torch.compiler.is_compiling()  # inductor cannot lower this op; it picks its own GEMM
        ):
            return F.linear(input, self.weight, self.bias)
        weight = self.weight if self.reordered_weight is None else self.reordered_weight
        rows = input.numel() // self.in_features
        if self.keep_layout and self.reordered_weight is None and rows > 1 and _ONEDNN_REORDER is not None:
            self.reordered_weight = weight = _ONEDNN_REORDER(self.weight, rows)
        return _ONEDNN_LINEAR(input, weight, self.bias, "none", [], "")


def applies(model: nn.Module) -> bool:
    """oneDNN is there and enabled, the model is on CPU in fp32, and nothing is being compiled."""
    return (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and model.device.type == "cpu"
        and model.dtype is torch.float32
    )


def inference_linears(model: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(parent, attribute, runs at every step) of each linear layer of the model that is a plain `nn.Linear` without
    hooks, with at least `MIN_WEIGHT_ENTRIES` weights. A decoding step runs the decoder's (but for the
    cross-attention key and value projections, run once per source) and the output projection; the encoder's run
    once per call. Wrapped layers (LoRA adapters, quantized layers) and hooked ones keep running as they are."""
    places = [(model, name, True) for name, child in model.named_children() if child is model.get_output_embeddings()]
    for stack, per_step in ((model.get_encoder(), False), (model.get_decoder(), True)):
        for parent_name, parent in stack.named_modules():
            if type(parent).__module__ != type(model).__module__:
                continue  # inside a module put in the model's place (an adapter): left as it is
            once_per_source = ("k_proj", "v_proj") if parent_name.endswith("encoder_attn") else ()
            places += [(parent, name, per_step and name not in once_per_source) for name, _ in parent.named_children()]
    return [(parent, name, per_step) for parent, name, per_step in places if _plain(getattr(parent, name))]


def _plain(module: nn.Module) -> bool:
    hooked = module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
    return type(module) is nn.Linear and not hooked and module.weight.numel() >= MIN_WEIGHT_ENTRIES


@contextmanager
def onednn_decoding(model: nn.Module) -> Iterator[None]:
    """Within this scope the linears of `inference_linears(model)` are `OneDNNLinear` stand-ins, made fresh on entry
    (those of a decoding step keep their weights in oneDNN's layout); leaving it (also by an exception) puts the
    original modules back and drops the stand-ins and their reordered weights. Does nothing where `applies(model)` is
    false."""
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    if applies(model):
        for parent, name, per_step in inference_linears(model):
            linear = getattr(parent, name)
            setattr(parent, name, OneDNNLinear(linear, keep_layout=per_step))
            swapped.append((parent, name, linear))
    try:
        yield
    finally:
        for parent, name, linear in swapped:
            setattr(parent, name, linear)


__all__ = ["OneDNNLinear", "applies", "inference_linears", "onednn_decoding"]
