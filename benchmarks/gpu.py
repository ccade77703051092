#!/usr/bin/env python
"""The GPU check (issue #28): one command, at most 8 minutes on one H100, that writes a JSON and prints a table.

    python benchmarks/gpu.py [--json PATH] [--time-limit 450] [--sections training,generation,correctness,multi_gpu]
    python benchmarks/gpu.py --smoke --json /tmp/gpu.json    # CPU, tiny sizes, a few steps: every code path (tests)

Sections (each in the JSON under its name; the printed tables repeat the figures):

- ``training``: bf16 training of the base model (`common.model_config("base")`: Table 3, V 37000, attention biases)
  on `common.token_batches` of `--max-tokens` padded tokens per side (train.py's default 25000), with train.py's
  recipe pieces: the fused loss (`model.fused_training_loss`), label smoothing 0.1 in the model, AdamW betas
  0.9/0.98, eps 1e-9, weight decay 0 (`common.make_optimizer`), under `torch.autocast(dtype=torch.bfloat16)` as
  Trainer's `--bf16` runs it. Beside it in the same process, alternating step by step on the same batches,
  `MarianMTModel` of the same configuration and weights under a plain Seq2SeqTrainer recipe: full (B, T, V) logits and
  `F.cross_entropy(label_smoothing=0.1)` (`common.training_step`). Neither runs inside `Trainer`: both are bare loops
  of its step, so that only the models differ. Figures: source tokens/s (non-padding source tokens per second),
  source + target tokens/s, model FLOPs utilisation (`common.training_flops`, the README's "% of matmul peak" count,
  over the GPU's dense bf16 peak, `DENSE_BF16_PEAK_TFLOPS`), peak memory; medians over the timed steps after warm-up.
- ``generation``: greedy and beam 4 at batch 1 and 64, exactly 32 new tokens per output
  (`common.fixed_length_generation_config`), ours against Marian (same weights) and against CTranslate2 running
  `ctranslate2_backend.convert`'s export of our weights on `device="cuda"`, all in bf16 on a GPU.
- ``correctness``: (a) 200 steps of bf16 autocast against fp32 from one initialisation on the same batches: the
  relative loss difference per step, its mean over the last 20 steps under `BF16_LOSS_RTOL`; (b) sdpa against eager
  attention, logits max |difference| in fp32 (`SDPA_ATOL_FP32`) and under bf16 autocast (`SDPA_ATOL_BF16`);
  (c) greedy decoding with the cache against `use_cache=False`: identical tokens (see `cached_vs_uncached`).
- ``multi_gpu``: with 2 or more GPUs, `torchrun --standalone --nproc_per_node 2 train.py --bf16` (NCCL) twice, as in
  tests/test_train.py's two-process stop-and-resume test: a run to step 20 that checkpoints at step 14, inside its
  second epoch, and a copy of that checkpoint resumed to step 20; the two checkpoint-20 weights are compared. With one
  GPU: "skipped: 1 GPU". On CPU (`--smoke`) it is skipped too: on 2 shared cores the two gloo runs took 52 s,
  and one of them alone 72 s under load, more than the smoke run may take. `--ddp-on-cpu` runs it there with gloo.

`--smoke` runs the same code on CPU with the tiny size: training under bf16 autocast on CPU, generation and the
CTranslate2 export in fp32 on CPU, the correctness checks with a few steps, no peak (MFU None) and the process's peak
RSS in place of GPU memory. `--time-limit` (seconds, default 450) bounds the whole run: each section gets a share of
it and stops its loops early when that share is spent (recorded as `"truncated": true` with the steps done). The exit
status is 1 when a correctness or multi-GPU check fails (after the JSON and the table are written).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python benchmarks/gpu.py` puts only benchmarks/ on the path

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import ctranslate2_backend as ct2  # noqa: E402
from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration  # noqa: E402
from hf_vanilla_transformer.modeling_vanilla_transformer import shift_tokens_right  # noqa: E402

SECTIONS = ("training", "generation", "correctness", "multi_gpu")

# Dense bf16 Tensor Core peaks in TFLOP/s, no sparsity, from NVIDIA's datasheets: H100 (SXM5 1,979 and PCIe 1,513
# TFLOP/s "with sparsity", halved), H200 (SXM 1,979 with sparsity, halved), A100 (312 dense; 624 with sparsity, SXM
# and PCIe alike). Matched against `torch.cuda.get_device_name()` in order: the first entry whose words all occur in
# the name. The NVL boards (other clocks and power) are left unknown on purpose: unknown -> peak None, MFU None.
DENSE_BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("H100", "NVL"), None),
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # SXM5, which torch names "NVIDIA H100 80GB HBM3"
    (("H200", "NVL"), None),
    (("H200",), 989.0),
    (("A100",), 312.0),
)
PEAK_SOURCE = "NVIDIA datasheets (H100, H200, A100): dense bf16 Tensor Core TFLOP/s, no sparsity"

# Tolerances of the correctness section, each with its reason.
# (a) bf16 autocast against fp32, 200 steps of the same batches from the same weights, dropout 0: the mean over the
# last 20 steps of |loss_bf16 - loss_fp32| / loss_fp32. bf16 keeps 8 significand bits (relative rounding 2^-9, about
# 2e-3 per op), and two runs that round differently drift apart a little while training equally well; 5% of the loss
# leaves room for that drift and still catches a bf16 path that trains worse (a loss or a gradient reduced in bf16, a
# lost loss scale), which shows as a loss that stops falling with the fp32 run's. Observed on CPU (bf16 autocast there,
# tiny size, 200 steps of 512 tokens, peak lr 1e-3, loss 6.9 -> 3.3): 2.1e-4, at most 1.1e-3 at any step. The bound
# is loose on purpose until a GPU has run the base size; tighten it to a few times what that run records.
BF16_LOSS_RTOL = 5e-2
BF16_LOSS_WINDOW = 20
# (b) sdpa against eager, logits max |difference| on a padded batch, eval mode. fp32: the two only reorder sums
# (common.LOGITS_ATOL's bound for the same function on other kernels). bf16 autocast: both round every matmul to bf16
# but at different points (sdpa accumulates in fp32 inside one kernel, eager rounds the scores and weights between
# ops); the bound is in units of the largest |logit|, as bf16's error is relative. Observed on CPU at the base size:
# fp32 1.4e-6; bf16 3.1e-2 with logits up to 5.7 (one bf16 step at that magnitude), against a bound of 0.11.
SDPA_ATOL_FP32 = 1e-4
SDPA_ATOL_BF16 = 2e-2  # x max(1, max |logit|)
# (c) greedy decoding with and without the cache, fp32: identical tokens. A row may differ only where the two runs
# met a near-tie: at its first differing step the top two scores of the cached run lie within NEAR_TIE of each other
# (the two paths compute the same logits with different GEMM shapes, ~1e-6 apart). Xavier initialisation, as
# tests/test_ctranslate2_backend.py uses for the same reason: N(0, 0.02) gives a random model near-flat logits.
NEAR_TIE = 1e-4
# multi_gpu: the resumed run's weights against the uninterrupted run's. CPU (gloo) runs match bit for bit
# (tests/test_train.py; this script's --ddp-on-cpu too). On GPUs, kernels with atomics may round differently from run
# to run, so the check passes on bit-for-bit equality or a relative L2 difference ||a - b|| / ||a|| over all weights
# within DDP_REL_L2. A resume that replays its epoch in another order is far outside it: the same recipe on CPU,
# resumed from checkpoint-14 with --seed 4 (another batch order), ended 4.1e-3 apart (max |difference| 1.1e-2).
DDP_REL_L2 = 1e-4
CHECK_TOKENS = 1000  # ids used by the bf16-vs-fp32 task (`chain_task_batches`)

# tests/test_train.py's TINY_RUN and its two-process stop-and-resume recipe (300 pairs: 11 steps an epoch; the
# checkpoint at step 14 lies in the second epoch).
DDP_RUN = [
    "--config_name", "tiny", "--vocab_size", "600", "--max_train_samples", "300", "--max_eval_samples", "16",
    "--max_predict_samples", "16", "--max_tokens", "1024", "--warmup_steps", "10", "--logging_steps", "5",
    "--eval_steps", "10", "--save_steps", "14", "--seed", "3", "--max_steps", "20", "--do_train", "--report_to", "none",
]  # fmt: skip
DDP_STOP_STEP, DDP_LAST_STEP = 14, 20


@dataclass
class Settings:
    """Sizes of one mode: the full GPU run, or `--smoke` (tiny model, a few steps, every code path)."""

    size: str = "base"
    max_tokens: int = 25000  # train.py's default: padded tokens per side of a training batch (§5.1)
    train_warmup: int = 3  # untimed rounds (cuBLAS heuristics, allocator growth)
    train_steps: int = 20  # timed rounds; each implementation runs one step per round on the same batch
    gen_batch_sizes: tuple[int, ...] = (1, 64)
    new_tokens: int = 32
    gen_repeats: int = 3
    check_steps: int = 200
    check_max_tokens: int = 4096  # the bf16-vs-fp32 run: smaller batches, so 2 x 200 steps (one fp32) stay short
    check_lr: float = 3e-4  # peak; linear warm-up over the first quarter of the steps, then constant
    compare_max_tokens: int = 2048  # the sdpa-vs-eager batch
    cache_batch: int = 16
    cache_new_tokens: int = 32


SMOKE = Settings(
    size="tiny",
    max_tokens=256,
    train_warmup=1,
    train_steps=2,
    gen_batch_sizes=(1, 2),
    new_tokens=4,
    gen_repeats=1,
    check_steps=6,
    check_max_tokens=256,
    check_lr=1e-3,
    compare_max_tokens=256,
    cache_batch=2,
    cache_new_tokens=6,
)
# Each section's share of --time-limit (multi_gpu's goes unused with one GPU).
SHARES = {"training": 0.15, "generation": 0.2, "correctness": 0.25, "multi_gpu": 0.4}


# ---------------------------------------------------------------------------------------------------- the device


class Device:
    """The device the check runs on, with what differs between CUDA and the CPU smoke run."""

    def __init__(self, smoke: bool) -> None:
        self.cuda = torch.cuda.is_available()
        if not self.cuda and not smoke:
            raise SystemExit("No CUDA device: the GPU check needs one (`--smoke` runs its code paths on CPU).")
        self.torch = torch.device("cuda" if self.cuda else "cpu")
        self.type = self.torch.type
        self.name = torch.cuda.get_device_name(0) if self.cuda else (platform.processor() or platform.machine())
        self.count = torch.cuda.device_count() if self.cuda else 0
        self.peak_tflops = dense_bf16_peak(self.name) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self, enabled: bool = True) -> Any:
        """bf16 autocast as Trainer's --bf16 sets it (on CPU too in the smoke run)."""
        return torch.autocast(self.type, dtype=torch.bfloat16, enabled=enabled)


def dense_bf16_peak(name: str) -> float | None:
    upper = name.upper()
    for words, tflops in DENSE_BF16_PEAK_TFLOPS:
        if all(word in upper for word in words):
            return tflops
    return None


class Clock:
    """--time-limit: the whole run's deadline and each section's share of it."""

    def __init__(self, limit_s: float) -> None:
        self.start, self.limit = time.perf_counter(), limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section_deadline(self, name: str) -> float:
        """Until the section's share of the limit is spent, and never past the limit."""
        return min(time.perf_counter() + SHARES[name] * self.limit, self.start + self.limit)


def on_device(batch: common.Batch, device: torch.device) -> common.Batch:
    return common.Batch(*(getattr(batch, name).to(device) for name in common.Batch.__dataclass_fields__))


def source_tokens(batch: common.Batch) -> int:
    return int(batch.attention_mask.sum())


def tensor_mib(tensors: Iterator[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def free(device: Device) -> None:
    gc.collect()
    if device.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ training


def training(settings: Settings, device: Device, deadline: float) -> dict[str, Any]:
    """Ours (train.py's recipe) against Marian (plain recipe), bf16 autocast, alternating step by step."""
    models, diffs = common.build_models(settings.size, ("ours", "marian"))
    config = models["ours"].config
    batches = common.token_batches(config.vocab_size, settings.max_tokens, count=settings.train_steps, seed=0)
    batches = [on_device(batch, device.torch) for batch in batches]
    steps, optimizers = {}, {}
    for impl, model in models.items():
        model.to(device.torch).train()
        optimizers[impl] = common.make_optimizer(model)
        steps[impl] = common.training_step(impl, model, optimizers[impl])

    largest = max(batches, key=lambda b: b.input_ids.numel() + b.labels.numel())

    def run(train_step: Callable[[common.Batch], float]) -> Callable[[int], float]:
        def step(index: int) -> float:  # -1: warm-up, on the largest batch (the allocator grows to it once)
            with device.autocast():
                loss = train_step(batches[index] if index >= 0 else largest)
            device.sync()
            return loss

        return step

    runs = {impl: run(steps[impl]) for impl in models}
    for _ in range(settings.train_warmup):
        for step in runs.values():
            step(-1)
    times: dict[str, list[float]] = {impl: [] for impl in models}
    losses: dict[str, list[float]] = {impl: [] for impl in models}
    for index in range(settings.train_steps):
        if index >= 1 and time.perf_counter() > deadline:
            break
        for impl, step in runs.items():
            gc.collect()
            started = time.perf_counter()
            losses[impl].append(step(index))
            times[impl].append(time.perf_counter() - started)
    done = len(times["ours"])

    result: dict[str, Any] = {
        "size": settings.size,
        "max_tokens": settings.max_tokens,
        "precision": "bf16 autocast (torch.autocast, fp32 weights and Adam states), as Trainer's --bf16",
        "max_logit_diff_marian": diffs["marian"],
        "warmup_rounds": settings.train_warmup,
        "timed_rounds": done,
        "truncated": done < settings.train_steps,
        "peak_tflops": device.peak_tflops,
        "peak_source": PEAK_SOURCE if device.peak_tflops else "unknown device: no peak, no MFU",
    }
    for impl in models:
        per_step = list(zip(batches[:done], times[impl], strict=True))
        flops = [common.training_flops(config, batch) / seconds for batch, seconds in per_step]
        row = {
            "source_tokens_per_s": statistics.median(source_tokens(b) / s for b, s in per_step),
            "tokens_per_s": statistics.median(b.tokens / s for b, s in per_step),
            "tflops_per_s": statistics.median(flops) / 1e12,
            "step_s": statistics.median(times[impl]),
            "times_s": times[impl],
            "losses": losses[impl],
        }
        row["mfu"] = row["tflops_per_s"] / device.peak_tflops if device.peak_tflops else None
        result[impl] = row
    result["memory_source"] = memory(models, steps, optimizers, batches[:done], device, result)
    for key in ("source_tokens_per_s", "tokens_per_s", "peak_memory_mib"):
        ours, marian = result["ours"].get(key), result["marian"].get(key)
        result[f"ratio_{key}"] = ours / marian if ours and marian else None
    del models, steps, optimizers, runs
    free(device)
    return result


def memory(
    models: dict, steps: dict, optimizers: dict, batches: list[common.Batch], device: Device, result: dict
) -> str:
    """Peak memory of one training step on the largest batch, each implementation alone.

    GPU: both models stay resident, so the figure is built from parts: this model's weights and Adam states (what
    it holds between steps) plus the growth of `torch.cuda.max_memory_allocated()` over one step (activations,
    gradients, logits, the optimizer's temporaries). CPU (smoke): torch's CPU allocator keeps no statistics; the
    process's peak RSS (both models) is reported instead, and peak_memory_mib is None.
    """
    largest = max(batches, key=lambda b: b.input_ids.numel() + b.labels.numel())
    if not device.cuda:
        for impl in models:
            result[impl]["peak_memory_mib"] = None
            result[impl]["peak_rss_mib"] = common.peak_rss_mib()
        return "cpu: peak_rss_mib is ru_maxrss of the whole process (both models); no allocator statistics"
    for impl, model in models.items():
        states = optimizers[impl].state.values()
        optimizer_state = (t for state in states for t in state.values() if isinstance(t, torch.Tensor))
        held = tensor_mib(model.parameters()) + tensor_mib(optimizer_state)
        free(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with device.autocast():
            steps[impl](largest)
        device.sync()
        growth = (torch.cuda.max_memory_allocated() - before) / 2**20
        result[impl].update({"held_mib": held, "step_growth_mib": growth, "peak_memory_mib": held + growth})
    return (
        "cuda: peak_memory_mib = held_mib (the model's weights and Adam states) + step_growth_mib "
        "(torch.cuda.max_memory_allocated() over one step on the largest batch, minus what was allocated before)"
    )


# ---------------------------------------------------------------------------------------------------- generation


def generation(settings: Settings, device: Device, deadline: float) -> dict[str, Any]:
    """Greedy and beam 4 at each batch size: ours, Marian and CTranslate2 (bf16 on a GPU, fp32 on CPU)."""
    models, diffs = common.build_models(settings.size, ("ours", "marian"))
    dtype = torch.bfloat16 if device.cuda else torch.float32
    result: dict[str, Any] = {
        "size": settings.size,
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": settings.new_tokens,
        "max_logit_diff_marian": diffs["marian"],
    }
    vocab_size = models["ours"].config.vocab_size
    with tempfile.TemporaryDirectory() as directory:
        translator, result["ctranslate2"] = ctranslate2_translator(models["ours"], directory, device, dtype)
        for model in models.values():
            model.to(device=device.torch, dtype=dtype).eval()
        if not device.cuda:  # as the pipelines run it on CPU (common.generation_benchmark does the same)
            from hf_vanilla_transformer import cpu_inference

            cpu_inference.optimize_for_cpu_inference(models["ours"])
        cases = [
            (f"{mode}_b{batch}", beams, batch)
            for mode, beams in common.GENERATION_CASES
            for batch in settings.gen_batch_sizes
        ]
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        # The torch engines alternate within each case; CTranslate2 runs every case after them, as in
        # common.generation_benchmark (on CPU, torch timed after CTranslate2 had run was slower).
        engine_sets = [tuple(models)] + ([("ctranslate2",)] if translator is not None else [])
        for engine_set in engine_sets:
            for case, beams, batch in cases:
                row = result.setdefault(case, {"batch": batch, "beams": beams})
                if time.perf_counter() > deadline:
                    row["skipped_for_time_limit"] = [*row.get("skipped_for_time_limit", []), *engine_set]
                    continue
                config = common.fixed_length_generation_config(beams, settings.new_tokens)
                input_ids, attention_mask = common.source_batch(vocab_size, batch, seed=batch)
                inputs = input_ids.to(device.torch), attention_mask.to(device.torch)
                engines = {
                    impl: _translate(translator, input_ids, attention_mask, beams, settings.new_tokens)
                    if impl == "ctranslate2"
                    else _generate(models[impl], inputs, config, device)
                    for impl in engine_set
                }
                times, outputs_case = _alternate(engines, settings.gen_repeats)
                outputs.setdefault(case, {}).update(outputs_case)
                for impl, seconds in times.items():
                    row[impl] = batch * settings.new_tokens / statistics.median(seconds)
                    row[f"times_s_{impl}"] = seconds
        for case, _beams, _batch in cases:
            row, produced = result[case], outputs.get(case, {})
            for impl in produced:
                if impl != "ours" and "ours" in produced:
                    row[f"same_output_{impl}"] = bool(torch.equal(produced["ours"].cpu(), produced[impl].cpu()))
            for impl in ("marian", "ctranslate2"):
                row[f"ratio_{impl}"] = row["ours"] / row[impl] if "ours" in row and impl in row else None
        del translator
    del models
    free(device)
    return result


def ctranslate2_translator(
    ours: VanillaTransformerForConditionalGeneration, directory: str, device: Device, dtype: torch.dtype
) -> tuple[Any, dict[str, Any]]:
    """A Translator on the conversion of our (fp32, CPU) weights, on the check's device; or None and the reason."""
    if not ct2.available():
        return None, {"skipped": "the ctranslate2 package is not installed"}
    import ctranslate2

    if device.cuda and ctranslate2.get_cuda_device_count() == 0:
        return None, {"skipped": f"ctranslate2 {ctranslate2.__version__} has no CUDA support (no CUDA device seen)"}
    compute_type = "bfloat16" if dtype == torch.bfloat16 else "float32"
    model_dir = ct2.convert(ours, directory)
    try:
        if device.cuda:
            translator = ctranslate2.Translator(
                str(model_dir), device="cuda", compute_type=compute_type, inter_threads=1
            )
        else:
            translator = ct2.load_translator(model_dir)
    except (RuntimeError, ValueError) as error:  # e.g. CUDA libraries this build cannot load, an unsupported type
        return None, {"skipped": f"ctranslate2 {ctranslate2.__version__} could not load the model: {error}"}
    info = {"version": ctranslate2.__version__, "device": device.type, "compute_type": compute_type}
    return translator, info


def _generate(model: nn.Module, inputs: tuple, config: Any, device: Device) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            output = model.generate(input_ids=inputs[0], attention_mask=inputs[1], generation_config=config)
        device.sync()
        return output

    return run


def _alternate(
    engines: dict[str, Callable[[], torch.Tensor]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """One untimed call of each engine (its output is kept), then `repeats` rounds, the engines alternating."""
    outputs = {impl: engine() for impl, engine in engines.items()}
    times: dict[str, list[float]] = {impl: [] for impl in engines}
    for _ in range(repeats):
        for impl, engine in engines.items():
            started = time.perf_counter()
            engine()
            times[impl].append(time.perf_counter() - started)
    return times, outputs


def _translate(translator: Any, input_ids: torch.Tensor, mask: torch.Tensor, beams: int, new_tokens: int) -> Callable:
    penalty = 0.6 if beams > 1 else 1.0  # common.fixed_length_generation_config's; unused by greedy decoding
    return lambda: ct2.translate(translator, input_ids, mask, beams, new_tokens, penalty)


# --------------------------------------------------------------------------------------------------- correctness


def correctness(settings: Settings, device: Device, deadline: float) -> dict[str, Any]:
    result = {
        "bf16_vs_fp32": bf16_against_fp32(settings, device, deadline),
        "sdpa_vs_eager": sdpa_against_eager(settings, device),
        "cached_vs_uncached": cached_against_uncached(settings, device),
    }
    result["passed"] = all(check["passed"] for check in result.values())
    free(device)
    return result


def chain_task_batches(vocab_size: int, max_tokens: int, count: int, seed: int) -> list[common.Batch]:
    """Token batches of a task a model learns within a few hundred steps, so that the loss falls and two runs are
    compared while it does (on random targets it stays at ln V whatever the arithmetic). Only CHECK_TOKENS of the
    vocabulary's ids occur; each target token is the previous one through a fixed permutation of them (the first
    through the first source token), and EOS ends each target where its source ends. Lengths and padding as
    `common.token_batches` makes them, in a shuffled order (it returns them short to long)."""
    generator = torch.Generator().manual_seed(seed)
    first, used = common.FIRST_REAL_TOKEN, min(CHECK_TOKENS, vocab_size - common.FIRST_REAL_TOKEN)
    successor = torch.arange(vocab_size)
    successor[first : first + used] = first + torch.randperm(used, generator=generator)
    batches = []
    for batch in common.token_batches(vocab_size, max_tokens, count=count, seed=seed):
        real = batch.input_ids >= first
        input_ids = torch.where(real, first + (batch.input_ids - first) % used, batch.input_ids)  # PAD, EOS kept
        labels = torch.empty_like(input_ids)
        labels[:, 0] = successor[input_ids[:, 0]]
        for position in range(1, labels.shape[1]):
            labels[:, position] = successor[labels[:, position - 1]]
        lengths = batch.attention_mask.sum(dim=1)
        labels[torch.arange(len(labels)), lengths - 1] = common.EOS
        labels = labels.masked_fill(batch.attention_mask == 0, -100)
        decoder_input_ids = shift_tokens_right(labels, common.PAD, common.BOS)
        batches.append(common.Batch(input_ids, batch.attention_mask, decoder_input_ids, labels))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def bf16_against_fp32(settings: Settings, device: Device, deadline: float) -> dict[str, Any]:
    """The same model trained twice from one initialisation on the same batches, once under bf16 autocast and once
    in fp32 (TF32 off), steps interleaved; dropout 0, so the runs differ only in arithmetic."""
    torch.manual_seed(0)
    config = common.model_config(settings.size)
    config.dropout = 0.0
    reference = VanillaTransformerForConditionalGeneration(config).to(device.torch).train()
    reference.config.label_smoothing = common.LABEL_SMOOTHING
    reference.fused_training_loss = True
    batches = chain_task_batches(config.vocab_size, settings.check_max_tokens, settings.check_steps, seed=1)
    warmup = max(1, settings.check_steps // 4)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(reference)
        optimizer = common.make_optimizer(model)
        for group in optimizer.param_groups:
            group["lr"] = settings.check_lr
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        runs[precision] = (model, optimizer, schedule, common.training_step("ours", model, optimizer))
    del reference
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for index, batch in enumerate(batches):
        if index >= 1 and time.perf_counter() > deadline:
            break
        batch = on_device(batch, device.torch)
        for precision, (_model, _optimizer, schedule, step) in runs.items():
            with device.autocast(enabled=precision == "bf16"):
                losses[precision].append(step(batch))
            schedule.step()
    del runs
    relative = [abs(b - f) / f for f, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    window = min(BF16_LOSS_WINDOW, len(relative))
    observed = statistics.fmean(relative[-window:])
    return {
        "steps": len(relative),
        "truncated": len(relative) < settings.check_steps,
        "max_tokens": settings.check_max_tokens,
        "peak_lr": settings.check_lr,
        "task": f"successor chain over {CHECK_TOKENS} ids (chain_task_batches); dropout 0, smoothing 0.1, fused loss",
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "losses_fp32": losses["fp32"],
        "losses_bf16": losses["bf16"],
        "relative_diff_per_step": relative,
        "max_relative_diff": max(relative),
        "window": window,
        "mean_relative_diff_last_window": observed,
        "loss_drop_fp32": losses["fp32"][0] - losses["fp32"][-1],
        "tolerance": BF16_LOSS_RTOL,
        "passed": bool(observed <= BF16_LOSS_RTOL),
    }


def sdpa_against_eager(settings: Settings, device: Device) -> dict[str, Any]:
    """Logits of one model under `attn_implementation` sdpa and eager, on a padded batch, fp32 and bf16 autocast."""
    model = common.build_ours(settings.size).to(device.torch).eval()
    batch = common.token_batches(model.config.vocab_size, settings.compare_max_tokens, count=3, seed=5)[1]
    batch = on_device(batch, device.torch)
    result: dict[str, Any] = {"batch_shape": [*batch.input_ids.shape, batch.labels.shape[1]]}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        logits = {}
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            with torch.no_grad(), device.autocast(enabled=bf16):
                logits[implementation] = common.logits("ours", model, batch).float()
        scale = float(logits["eager"].abs().max())
        diff = float((logits["sdpa"] - logits["eager"]).abs().max())
        tolerance = SDPA_ATOL_BF16 * max(1.0, scale) if bf16 else SDPA_ATOL_FP32
        result[precision] = {"max_abs_diff": diff, "max_abs_logit": scale, "tolerance": tolerance}
        result[precision]["passed"] = bool(diff <= tolerance)
    model.set_attn_implementation("sdpa")
    result["passed"] = result["fp32"]["passed"] and result["bf16"]["passed"]
    return result


def cached_against_uncached(settings: Settings, device: Device) -> dict[str, Any]:
    """Greedy decoding, fp32, with the key/value cache against `use_cache=False`: the same tokens, row for row (a
    row may differ only from a near-tie on, see NEAR_TIE)."""
    torch.manual_seed(0)
    config = VanillaTransformerConfig.from_preset(
        settings.size, attention_bias=True, init_std=None, **common.SIZES[settings.size]
    )
    model = VanillaTransformerForConditionalGeneration(config).to(device.torch).eval()
    input_ids, attention_mask = common.source_batch(config.vocab_size, settings.cache_batch, seed=3)
    outputs = {}
    for use_cache in (True, False):
        generation_config = common.fixed_length_generation_config(1, settings.cache_new_tokens)
        generation_config.use_cache = use_cache
        generation_config.return_dict_in_generate = True
        generation_config.output_scores = True
        with torch.inference_mode():
            outputs[use_cache] = model.generate(
                input_ids=input_ids.to(device.torch),
                attention_mask=attention_mask.to(device.torch),
                generation_config=generation_config,
            )
    cached, uncached = outputs[True].sequences.cpu(), outputs[False].sequences.cpu()
    rows = []
    for row in range(cached.shape[0]):
        differs = (cached[row] != uncached[row]).nonzero()
        if len(differs):
            position = int(differs[0])
            scores = outputs[True].scores[position - 1][row].float()  # scores[t] chose token t + 1
            top = scores.topk(2).values
            rows.append({"row": row, "first_diff_token": position, "top2_margin": float(top[0] - top[1])})
    identical = cached.shape[0] - len(rows)
    near_ties = all(entry["top2_margin"] <= NEAR_TIE for entry in rows)
    return {
        "batch": settings.cache_batch,
        "new_tokens": settings.cache_new_tokens,
        "dtype": "float32",
        "init": "xavier (init_std=None)",
        "identical_rows": identical,
        "rows": cached.shape[0],
        "differing_rows": rows,
        "near_tie_tolerance": NEAR_TIE,
        "passed": bool(identical == cached.shape[0] or near_ties),
    }


# ----------------------------------------------------------------------------------------------------- multi-GPU


def multi_gpu(device: Device, deadline: float, ddp_on_cpu: bool, work_dir: Path) -> dict[str, Any]:
    """Two torchrun processes of train.py, stopped at a mid-epoch checkpoint and resumed (tests/test_train.py's
    recipe); the resumed run's final weights against the uninterrupted run's."""
    if device.cuda and device.count < 2:
        return {"skipped": f"{device.count} GPU"}
    if not device.cuda and not ddp_on_cpu:
        return {"skipped": "no GPU (smoke run on CPU; --ddp-on-cpu runs it with gloo, a minute or more on 2 cores)"}
    from safetensors.torch import load_file

    backend = "nccl" if device.cuda else "gloo"
    extra = ["--bf16"] if device.cuda else []
    full, resumed = work_dir / "ddp_full", work_dir / "ddp_resumed"
    shutil.rmtree(full, ignore_errors=True)
    shutil.rmtree(resumed, ignore_errors=True)
    result: dict[str, Any] = {"backend": backend, "processes": 2, "args": [*DDP_RUN, *extra]}
    started = time.perf_counter()
    try:
        _torchrun([*DDP_RUN, *extra, "--output_dir", str(full)], deadline)
        checkpoint = f"checkpoint-{DDP_STOP_STEP}"
        result["stop_epoch"] = json.loads((full / checkpoint / "trainer_state.json").read_text())["epoch"]
        resumed.mkdir(parents=True)
        shutil.copytree(full / checkpoint, resumed / checkpoint)
        log = _torchrun([*DDP_RUN, *extra, "--output_dir", str(resumed), "--resume_from_checkpoint"], deadline)
        result["resumed_from_log"] = "Resuming training from" in log and checkpoint in log
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        output = getattr(error, "output", None) or ""
        result.update({"passed": False, "error": f"{type(error).__name__}: {error}", "log_tail": str(output)[-3000:]})
        return result
    result["seconds"] = time.perf_counter() - started
    final = f"checkpoint-{DDP_LAST_STEP}/model.safetensors"
    a, b = load_file(str(full / final)), load_file(str(resumed / final))
    same_keys = a.keys() == b.keys()
    max_abs = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if same_keys else math.inf
    norm = math.sqrt(sum(float(a[k].float().pow(2).sum()) for k in a))
    diff = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)) if same_keys else math.inf
    result.update(
        {
            "mid_epoch": 1 < result["stop_epoch"] < 2,
            "bit_for_bit": same_keys and all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_diff": max_abs,
            "relative_l2_diff": diff / norm,
            "tolerance_relative_l2": DDP_REL_L2,
        }
    )
    result["passed"] = bool(
        result["mid_epoch"]
        and result["resumed_from_log"]
        and (result["bit_for_bit"] or result["relative_l2_diff"] <= DDP_REL_L2)
    )
    return result


def _torchrun(args: list[str], deadline: float) -> str:
    """`torchrun --standalone --nproc_per_node 2 train.py ARGS`; its log (stdout and stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    timeout = max(10.0, deadline - time.perf_counter())
    completed = subprocess.run(
        [*command, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    log = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise subprocess.CalledProcessError(completed.returncode, command, output=log)
    return log


# -------------------------------------------------------------------------------------------------------- report


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: speed and memory per engine, then the correctness checks."""
    lines = [
        "| section | measure | ours | marian | ctranslate2 | ours/marian | ours/ctranslate2 |",
        "|---|---|---|---|---|---|---|",
    ]
    train = results.get("training")
    if train:
        size = train["size"]
        peak = f"dense bf16 peak {train['peak_tflops']:.0f} TFLOP/s" if train["peak_tflops"] else "peak unknown"
        mfu = {impl: None if train[impl]["mfu"] is None else 100 * train[impl]["mfu"] for impl in ("ours", "marian")}
        memory_key = "peak_memory_mib" if train["ours"].get("peak_memory_mib") is not None else "peak_rss_mib"
        rows = [
            ("source tok/s", "source_tokens_per_s", 0),
            ("source + target tok/s", "tokens_per_s", 0),
            ("TFLOP/s", "tflops_per_s", 2),
        ]
        for label, key, digits in rows:
            ours, marian = train["ours"][key], train["marian"][key]
            lines.append(
                f"| training {size} | {label} | {_number(ours, digits)} | {_number(marian, digits)} | - | "
                f"{ours / marian:.2f} | - |"
            )
        ratio = mfu["ours"] / mfu["marian"] if mfu["ours"] and mfu["marian"] else None
        lines.append(
            f"| training {size} | MFU, % of {peak} | {_number(mfu['ours'])} | {_number(mfu['marian'])} | - | "
            f"{_number(ratio, 2)} | - |"
        )
        ours_memory, marian_memory = train["ours"][memory_key], train["marian"][memory_key]
        label = "peak memory (MiB)" if memory_key == "peak_memory_mib" else "peak RSS, whole process (MiB)"
        lines.append(
            f"| training {size} | {label} | {_number(ours_memory, 0)} | {_number(marian_memory, 0)} | - | "
            f"{ours_memory / marian_memory:.2f} | - |"
        )
    generated = results.get("generation")
    if generated:
        for case, row in generated.items():
            if not isinstance(row, dict) or "ours" not in row:
                continue
            ct2_speed, ct2_ratio = _number(row.get("ctranslate2")), _number(row["ratio_ctranslate2"], 2)
            lines.append(
                f"| generation {generated['size']} {generated['dtype']} | {case} (tok/s) | {row['ours']:.1f} | "
                f"{row['marian']:.1f} | {ct2_speed} | {row['ratio_marian']:.2f} | {ct2_ratio} |"
            )
    lines += ["", "| check | observed | tolerance | passed |", "|---|---|---|---|"]
    checks = results.get("correctness")
    if checks:
        loss = checks["bf16_vs_fp32"]
        lines.append(
            f"| bf16 vs fp32 loss: mean relative difference, last {loss['window']} of {loss['steps']} steps | "
            f"{loss['mean_relative_diff_last_window']:.2e} | {loss['tolerance']:.0e} | {_yes(loss['passed'])} |"
        )
        lines.append(
            f"| bf16 vs fp32 loss: max relative difference, any step | {loss['max_relative_diff']:.2e} | - | - |"
        )
        for precision in ("fp32", "bf16"):
            check = checks["sdpa_vs_eager"][precision]
            lines.append(
                f"| sdpa vs eager logits, {precision}: max abs difference | {check['max_abs_diff']:.2e} | "
                f"{check['tolerance']:.1e} | {_yes(check['passed'])} |"
            )
        cache = checks["cached_vs_uncached"]
        lines.append(
            f"| cached vs uncached greedy, fp32: identical rows | {cache['identical_rows']}/{cache['rows']} | "
            f"all (or near-ties within {cache['near_tie_tolerance']:.0e}) | {_yes(cache['passed'])} |"
        )
    ddp = results.get("multi_gpu")
    if ddp:
        if "skipped" in ddp:
            lines.append(f"| 2-process stop at step {DDP_STOP_STEP} and resume | skipped: {ddp['skipped']} | - | - |")
        elif "error" in ddp:
            lines.append(f"| 2-process stop at step {DDP_STOP_STEP} and resume | {ddp['error'][:80]} | - | no |")
        else:
            observed = "bit for bit" if ddp["bit_for_bit"] else f"relative L2 {ddp['relative_l2_diff']:.2e}"
            lines.append(
                f"| 2-process ({ddp['backend']}) stop at step {DDP_STOP_STEP}, epoch {ddp['stop_epoch']:.2f}, and "
                f"resume | {observed} | {ddp['tolerance_relative_l2']:.0e} | {_yes(ddp['passed'])} |"
            )
    return lines


def _yes(passed: bool) -> str:
    return "yes" if passed else "NO"


def machine(device: Device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.name,
        "device_type": device.type,
        "gpus": device.count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps; runs on CPU (the tests)")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/<date>_gpu.json")
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the default")
    parser.add_argument("--max-tokens", type=int, help="padded tokens per side of a training batch (default 25000)")
    parser.add_argument("--ddp-on-cpu", action="store_true", help="without GPUs, run multi_gpu with 2 gloo processes")
    parser.add_argument("--work-dir", type=Path, help="where multi_gpu's train.py runs write (default: a temp dir)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.json is None:
        args.json = ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}_gpu.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.time_limit)
    device = Device(args.smoke)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) in the fp32 references
    settings = copy.deepcopy(SMOKE if args.smoke else Settings())
    if args.max_tokens:
        settings.max_tokens = args.max_tokens
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": args.smoke,
        "machine": machine(device),
        "settings": asdict(settings),
        "time_limit_s": args.time_limit,
    }
    with _work_dir(args.work_dir) as work_dir:
        for name in args.sections:
            deadline = clock.section_deadline(name)
            started = time.perf_counter()
            print(f"[gpu.py] {name} ({clock.elapsed():.0f} s elapsed)", file=sys.stderr, flush=True)
            if name == "training":
                results[name] = training(settings, device, deadline)
            elif name == "generation":
                results[name] = generation(settings, device, deadline)
            elif name == "correctness":
                results[name] = correctness(settings, device, deadline)
            else:
                results[name] = multi_gpu(device, deadline, args.ddp_on_cpu, work_dir)
            results[name]["section_s"] = time.perf_counter() - started
    results["elapsed_s"] = clock.elapsed()
    results["table"] = table(results)
    passed = [results[name]["passed"] for name in ("correctness", "multi_gpu") if "passed" in results.get(name, {})]
    results["passed"] = all(passed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{device.name}, {results['elapsed_s']:.0f} s; results in {args.json}\n")
    print("\n".join(results["table"]))
    return 0 if results["passed"] else 1


@contextmanager
def _work_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as directory:
        yield Path(directory)


if __name__ == "__main__":
    sys.exit(main())
