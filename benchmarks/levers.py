"""What each speed lever beside the model is worth: the same model with the lever on and off, alternating in one
process, on the cases it targets. `run.py` runs this as part of every full run (`--levers-only` runs just this).

The levers and their off switches:
- ``onednn_linears`` (`cpu_inference.py`): generation by a model converted with `optimize_for_cpu_inference`, as
  the pipelines run it (oneDNN stand-ins for the linears, reordered weights included), against the same weights
  unconverted (plain `nn.Linear`).
- ``reordered_weights``: a converted model that never keeps oneDNN's layout of the weights (oneDNN then reorders
  inside every call of more than one row), against one that keeps it.
- ``fused_loss`` (`losses.py`): a training step as `train.py` runs it (`fused_training_loss`), against the plain
  loss on full (B, T, V) logits: speed under glibc's default allocator and under `train.py`'s settings
  (`common.ALLOCATOR_ENV`), and the peak memory (RSS) of two steps, each variant alone in a fresh process.

A lever's worth in speed is the median over rounds of time(off) / time(on) in the same round, in memory peak(off) /
peak(on); the project keeps a lever only while one of them is at least 1.10 on some case it targets.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

from benchmarks import common
from hf_vanilla_transformer import cpu_inference

KEEP_THRESHOLD = 1.10


def _reorder_off() -> contextlib.AbstractContextManager:
    return mock.patch.object(cpu_inference, "_ONEDNN_REORDER", None)


def generation_variants(size: str) -> dict[str, tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]]:
    """The model as the pipelines run it ("on": converted by `optimize_for_cpu_inference`) and, per generation lever,
    a copy of its weights with that lever off, each with the context its calls run in. Separate models, not a
    conversion undone and redone between calls: the kept layouts outlive a call, as they do for a user."""
    plain = common.build_ours(size).eval()
    converted = cpu_inference.optimize_for_cpu_inference(copy.deepcopy(plain))
    never_reordered = cpu_inference.optimize_for_cpu_inference(copy.deepcopy(plain))  # only ever run under the patch
    return {
        "on": (converted, contextlib.nullcontext),
        "onednn_linears": (plain, contextlib.nullcontext),
        "reordered_weights": (never_reordered, _reorder_off),
    }


def _generating(
    model: nn.Module, make: Callable[[], contextlib.AbstractContextManager], inputs: dict, outputs: list
) -> Callable[[int], None]:
    """A timed call: `model.generate(**inputs)` in the context `make()` gives, its output appended to `outputs`."""

    def run(_index: int) -> None:
        with make():
            outputs.append(model.generate(**inputs))

    return run


def _alternate(variants: dict[str, Callable[[], contextlib.AbstractContextManager]], run, repeats: int) -> dict:
    """`common.alternate` of `run(index)` under each variant (on, off1, off2, on, ...), its context entered around
    each call: a patch or a flag, microseconds against the milliseconds of a call."""

    def under(make: Callable[[], contextlib.AbstractContextManager]) -> Callable[[int], None]:
        def call(index: int) -> None:
            with make():
                run(index)

        return call

    return common.alternate({name: under(make) for name, make in variants.items()}, repeats)


def _speedups(times: dict[str, list[float]]) -> dict[str, Any]:
    on = times["on"]
    return {
        "times_s": times,
        **{
            name: statistics.median(t / o for t, o in zip(ts, on, strict=True))
            for name, ts in times.items()
            if name != "on"
        },
    }


def generation_levers(size: str, batch_sizes: tuple[int, ...], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Per generation case, the speed-up of each generation lever (and whether all variants found the same tokens)."""
    variants = generation_variants(size)
    vocab_size = variants["on"][0].config.vocab_size
    results: dict[str, Any] = {}
    for mode, beams in common.GENERATION_CASES:
        config = common.fixed_length_generation_config(beams, new_tokens)
        for batch_size in batch_sizes:
            input_ids, attention_mask = common.source_batch(vocab_size, batch_size, seed=batch_size)
            outputs: list[torch.Tensor] = []
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "generation_config": config}
            runs = {name: _generating(model, make, inputs, outputs) for name, (model, make) in variants.items()}
            with torch.inference_mode():
                times = common.alternate(runs, repeats)
            results[f"{mode}_b{batch_size}"] = {
                **_speedups(times),
                "same_output": all(torch.equal(output, outputs[0]) for output in outputs),
            }
    return results


def training_levers(size: str, max_tokens: int, repeats: int) -> dict[str, Any]:
    """The fused loss's speed-up on length-bucketed token batches (call in a process with the tuned allocator)."""
    model = common.build_ours(size).train()
    step = common.training_step("ours", model, common.make_optimizer(model))  # sets fused_training_loss
    batches = common.token_batches(model.config.vocab_size, max_tokens, count=repeats)

    @contextlib.contextmanager
    def fused_loss_off() -> Iterator[None]:
        model.fused_training_loss = False
        try:
            yield
        finally:
            model.fused_training_loss = True

    variants = {"on": contextlib.nullcontext, "fused_loss": fused_loss_off}
    times = _alternate(variants, lambda index: step(batches[max(index, 0)]), repeats)
    return {f"tokens_{max_tokens}": _speedups(times)}


def table(levers: dict[str, Any]) -> list[str]:
    """Markdown: one row per (size, lever, case) with the speed-up, and per lever whether it clears the bar."""
    lines = [
        "| size | lever | case | worth (off / on: time, or peak memory) |",
        "|---|---|---|---|",
    ]
    best: dict[str, float] = {}
    for size, parts in levers.items():
        for part in ("generation", "training", "memory"):
            for case, row in parts.get(part, {}).items():
                for lever, value in row.items():
                    if lever in ("times_s", "same_output", "peaks_mib"):
                        continue
                    lines.append(f"| {size} | {lever} | {case} | {value:.2f} |")
                    best[lever] = max(best.get(lever, 0.0), value)
    lines.append("")
    lines += [
        f"- `{lever}`: best case {value:.2f}x, {'clears' if value >= KEEP_THRESHOLD else 'below'} the "
        f"{KEEP_THRESHOLD:.2f}x bar"
        for lever, value in best.items()
    ]
    return lines
