"""CPU speed for inference, applied to a finished model from outside it, once, by a call made on purpose.

`optimize_for_cpu_inference(model)` swaps each linear layer of the model that is provably a plain `nn.Linear`
(below) for a `OneDNNLinear` holding the same parameter objects, so the state dict, `save_pretrained` and tying
are unchanged; `restore_linears(model)` puts the `nn.Linear` modules back, for training again. Both change the model
in place, return it, and may be called again (a second call changes nothing). The translation pipelines convert
their model when built, as the CLI does; `generate()` and `forward()` never change the module tree, so a model
served from several threads sees the same modules throughout. This follows transformers' quantizers
(`replace_with_bnb_linear` swaps modules once, at load time) and CPU inference libraries (`ipex.optimize`).

The conversion does nothing unless oneDNN is there and enabled and the model is on CPU in fp32 (`applies`). A layer is
swapped only where that is provably safe: its type is exactly `nn.Linear` with no hooks, its weight and bias are plain
dense CPU fp32 `nn.Parameter`s (not a DTensor, not a tensor subclass such as torchao's quantized weights, not meta), its
weight has at least `MIN_WEIGHT_ENTRIES` entries, and its parent is a module of the model's own code: a layer another
library put in a projection's place (a PEFT LoRA adapter, a quantized layer) runs as it is, with whatever it holds. A
stand-in computes with oneDNN only without gradients, on CPU, in fp32, outside autocast and `torch.compile`, while
`torch.backends.mkldnn` is enabled (`torch.backends.mkldnn.flags(enabled=False)` turns it off), and with `F.linear`, as
the `nn.Linear` would, otherwise.

Why by hand: a decoding step multiplies each weight matrix by a few rows, once, after the rest of the model has
pushed it out of cache, and there torch's default fp32 GEMM (MKL) is far from the memory-bandwidth bound. oneDNN's
linear, the kernel torch.compile's CPU backend emits for a frozen model, is faster in that state, the more so once
the weight is kept in oneDNN's blocked layout (inductor's weight freezing stores the same layout): otherwise
oneDNN reorders the weight inside every call of more than one row. `benchmarks/run.py --levers` measures whole
`generate()` calls of a converted model against the same model unconverted; the results are in
`benchmarks/README.md`.

Weights that change after the conversion: the kept layout is a copy, right only while the weight is unchanged. Each
stand-in remembers the weight storage and version counter it copied, and makes the copy again when either differs
(`load_state_dict`, an in-place op, a new parameter), and drops it at every forward with gradients: a training step
runs one before its optimizer writes the weights, which fused AdamW does without bumping the version counter. A write
that nothing tells of (`weight.data.mul_`, a fused optimizer step with no forward before it) is seen after
`restore_linears` and a new conversion. The kept copies double the memory of the converted weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import has_hooks

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
    """Stands in for one plain `nn.Linear`: the same `weight` and `bias` parameters (the state dict is unchanged),
    computed by oneDNN's linear without gradients on CPU in fp32 outside autocast, and by `F.linear` otherwise.

    The weight is reordered into oneDNN's layout lazily, at the first call of more than one row (the layout serves any
    row count; one-row calls read the plain weight as fast), and kept until the weight changes (module docstring).
    Lazily rather than at the conversion: a forward with gradients drops the copy, so the copy must be made again on
    use anyway, and a layer never run costs nothing. Two threads may both make it and both store it: either is right.
    """

    def __init__(self, linear: nn.Linear) -> None:
        if type(linear) is not nn.Linear:
            raise TypeError(f"OneDNNLinear stands in for a plain nn.Linear, not a {type(linear).__name__}.")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects, not copies
        self.bias = linear.bias
        self.train(linear.training)
        self.__dict__["_linear"] = linear  # put back by `restore_linears`; not a submodule, so not in the state dict
        self._kept: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (weight's storage, its version, reordered)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling():  # inductor cannot lower oneDNN's op; it picks its own GEMM
            return F.linear(input, weight, bias)
        if torch.is_grad_enabled():  # oneDNN's op has no backward; and a training step may change the weight
            if self._kept is not None:
                self._kept = None
            return F.linear(input, weight, bias)
        if not (
            torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")  # autocast runs F.linear in its dtype (bf16), as nn.Linear does
            and input.is_cpu
            and input.dtype is torch.float32
            and _plain_cpu_fp32(weight)
            and (bias is None or _plain_cpu_fp32(bias))
        ):
            return F.linear(input, weight, bias)
        return _ONEDNN_LINEAR(input, self._laid_out(weight, input.numel() // self.in_features), bias, "none", [], "")

    def _laid_out(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """The kept reordered weight while it is still the weight's copy; else a new one (2+ rows) or the weight."""
        kept = self._kept  # read once: another thread may replace it meanwhile
        if kept is not None:
            if kept[0].data_ptr() == weight.data_ptr() and kept[1] == weight._version:
                return kept[2]  # the same storage (kept[0] holds it, so no other can take its address), unchanged
            self._kept = None  # stale: let its memory go
        if rows < 2 or _ONEDNN_REORDER is None:
            return weight
        version = weight._version  # read before the copy: a write during it makes the copy stale, and shows
        reordered = _ONEDNN_REORDER(weight, rows)
        self._kept = (weight.detach(), version, reordered)
        return reordered

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kept": None}  # oneDNN's layout cannot be copied or pickled; it is made again

    def to_linear(self) -> nn.Linear:
        """The `nn.Linear` this stood in for, holding this module's current parameters and training mode."""
        linear = self._linear
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)


def _plain_cpu_fp32(tensor: torch.Tensor) -> bool:
    """A parameter that is a dense CPU fp32 tensor and nothing more: not a subclass (a DTensor, torchao's quantized
    weights), not sparse or meta, and not an inference tensor (it has no version counter to tell of writes)."""
    return (
        type(tensor) is nn.Parameter
        and tensor.layout is torch.strided
        and tensor.is_cpu
        and tensor.dtype is torch.float32
        and not tensor.is_inference()
    )


def _plain_linear(module: nn.Module) -> bool:
    """Exactly an `nn.Linear`, with no hooks, plain parameters and at least `MIN_WEIGHT_ENTRIES` weights."""
    return (
        type(module) is nn.Linear
        and not has_hooks(module)
        and _plain_cpu_fp32(module.weight)
        and (module.bias is None or _plain_cpu_fp32(module.bias))
        and module.weight.numel() >= MIN_WEIGHT_ENTRIES
    )


def _own_model(model: nn.Module) -> nn.Module:
    """The model itself, or the transformers model inside a PEFT wrapper (`PeftModel.get_base_model`)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _places(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every child of a module of the model's own code: for this package's model,
    the encoder's and decoder's layers and the output projection. Each module is read once, here: a conversion
    judges and wraps the very object it read, whatever another thread puts in its place meanwhile."""
    own = type(model).__module__
    return [
        (parent, name, child)
        for parent in model.modules()
        if type(parent).__module__ == own
        for name, child in parent.named_children()
    ]


def applies(model: nn.Module) -> bool:
    """oneDNN is there and enabled, the model is on CPU in fp32, and nothing is being compiled."""
    model = _own_model(model)
    return (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
        and model.device.type == "cpu"
        and model.dtype is torch.float32
    )


def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """Swap each provably plain linear layer of `model` (module docstring) for a `OneDNNLinear` holding the same
    parameters, in place, and return the model. Does nothing where `applies(model)` is false; layers already swapped,
    and all others, are left as they are, so a second call changes nothing. `restore_linears` undoes it."""
    if applies(model):
        for parent, name, module in _places(_own_model(model)):
            if _plain_linear(module):
                setattr(parent, name, OneDNNLinear(module))
    return model


def restore_linears(model: nn.Module) -> nn.Module:
    """Put back the `nn.Linear` of each `OneDNNLinear` in `model` (with the stand-in's current parameters), in place,
    and return the model: for training again, or to drop every kept layout. A model with none is left as it is."""
    for parent, name, module in _places(_own_model(model)):
        if type(module) is OneDNNLinear:
            setattr(parent, name, module.to_linear())
    return model


__all__ = ["MIN_WEIGHT_ENTRIES", "OneDNNLinear", "applies", "optimize_for_cpu_inference", "restore_linears"]
