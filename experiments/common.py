"""Shared helpers of the design-choice experiments: data, a small training loop, BLEU, memory and plots.

The loop is written on the model directly rather than through `train.main`: the experiments need things the
Trainer hides (hooks on BatchNorm statistics, attention maps, custom length splits, tokens/s of the step itself)
and must stay within a few CPU minutes, so they skip checkpoints, model cards and beam search. The recipe is the
demo's (`train.DEMO_RECIPE`: Adam beta2 0.98, eps 1e-9, linear warm-up then inverse square root, label smoothing
0.1, no dropout), shrunk further; numbers are therefore not comparable to the 1000-step demo.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, get_inverse_sqrt_schedule

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.batching import TokenBatchSampler
from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus
from hf_vanilla_transformer.metrics import load_bleu
from hf_vanilla_transformer.modeling_vanilla_transformer import shift_tokens_right
from hf_vanilla_transformer.tokenization import train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
DPI = 80
BLEU = load_bleu()
Pair = tuple[str, str]


# ----------------------------------------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment has: --smoke (seconds, for CI) and --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="a few steps on a few hundred pairs (CI)")
    p.add_argument("--out", default=None, help="output folder (default experiments/results/<name>)")
    p.add_argument("--seed", type=int, default=0)
    return p


def training_parser(description: str, default_steps: int) -> argparse.ArgumentParser:
    """`parser` plus --steps, for the experiments that train; `training_budget` reads both back."""
    p = parser(description)
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {default_steps}; 6 with --smoke)")
    p.set_defaults(default_steps=default_steps)
    return p


def training_budget(args: argparse.Namespace) -> tuple[int, int]:
    """Training steps and tokens per batch: --steps if given, else a few tiny batches with --smoke."""
    steps = args.steps or (6 if args.smoke else args.default_steps)
    return steps, 500 if args.smoke else 3000


def out_dir(args: argparse.Namespace, name: str) -> Path:
    out = Path(args.out) if args.out else RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join(["python", "-m", f"experiments.{module}", *argv])


def setup_threads() -> None:
    """Two cores: intra-op threads beyond them only add contention."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """A tokenizer and the three splits as (source, target) text pairs."""

    tokenizer: PreTrainedTokenizerFast
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]


def pairs(dataset) -> list[Pair]:
    return [(t[SOURCE_LANG], t[TARGET_LANG]) for t in dataset["translation"]]


def load_data(
    num_train: int,
    num_test: int,
    seed: int = 0,
    vocab_size: int = 2000,
    train_filter: Callable[[Pair], bool] | None = None,
    test_filter: Callable[[Pair], bool] | None = None,
    num_validation: int = 0,
) -> Data:
    """The embedded corpus, a BPE vocabulary trained on its (filtered) train split, and filtered splits."""
    corpus = build_default_corpus(seed, num_train=num_train, num_validation=num_validation or 1, num_test=num_test)
    train, test = pairs(corpus["train"]), pairs(corpus["test"])
    if train_filter:
        train = [p for p in train if train_filter(p)]
    if test_filter:
        test = [p for p in test if test_filter(p)]
    tokenizer = train_tokenizer((s for pair in train for s in pair), vocab_size=vocab_size)
    validation = pairs(corpus["validation"]) if num_validation else []
    return Data(tokenizer, train, validation, test)


def encode(tokenizer: PreTrainedTokenizerFast, data: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
    sources = tokenizer([s for s, _ in data])["input_ids"]
    targets = tokenizer([t for _, t in data])["input_ids"]
    return list(zip(sources, targets, strict=True))


def collate(tokenizer: PreTrainedTokenizerFast, examples: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """What `train.py`'s collator does: `DataCollatorForSeq2Seq` pads (labels with -100), and the decoder input is
    the labels shifted right after the start token (§3), the model's `prepare_decoder_input_ids_from_labels`."""
    collator = DataCollatorForSeq2Seq(tokenizer, return_tensors="pt")
    batch = dict(collator([{"input_ids": source, "labels": target} for source, target in examples]))
    batch["decoder_input_ids"] = shift_tokens_right(batch["labels"], tokenizer.pad_token_id, tokenizer.bos_token_id)
    return batch


# ----------------------------------------------------------------------------------------------- model and training


def small_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> VanillaTransformerConfig:
    """The "tiny" preset (d_model 64, 2+2 layers, d_ff 256, 4 heads) without dropout, unless overridden: half the
    demo's width, because on 2 cores it learns about as much per token as the demo's d_model 128 at 2.5x the speed."""
    values: dict[str, Any] = {
        "dropout": 0.0,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.bos_token_id,
    }
    return VanillaTransformerConfig.from_preset("tiny", **{**values, **overrides})


def build_model(config: VanillaTransformerConfig, seed: int = 0, attn: str = "eager"):
    """A fresh model with the given seed; eager attention so that every attention_type runs the same code path."""
    torch.manual_seed(seed)
    config._attn_implementation = attn
    return VanillaTransformerForConditionalGeneration(config)


@dataclass
class TrainResult:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # label-smoothed training loss, mean over each log window
    tokens_per_s: float = 0.0  # real (non-pad) source + target tokens per second of training steps
    seconds: float = 0.0
    diverged: bool = False


def train(
    model,
    tokenizer: PreTrainedTokenizerFast,
    train_pairs: Sequence[Pair],
    steps: int,
    max_tokens: int = 3000,
    learning_rate: float = 5e-3,
    warmup: int = 100,
    seed: int = 0,
    log_every: int = 25,
    on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> TrainResult:
    """Adam (beta2 0.98, eps 1e-9) with transformers' inverse-square-root schedule after a linear warm-up (§5.3),
    label smoothing 0.1 (§5.4), on the package's token batches (§5.1)."""
    encoded = encode(tokenizer, train_pairs)
    sampler = TokenBatchSampler([max(len(s), len(t)) for s, t in encoded], max_tokens, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), eps=1e-9)
    scheduler = get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup)
    model.config.label_smoothing = 0.1  # the model's own §5.4 loss, as train.py sets it
    result, window, batches, real_tokens = TrainResult(), [], iter(()), 0
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        indices = next(batches, None)
        if indices is None:  # a new pass over the data, in a new order
            sampler.set_epoch(step)
            batches = iter(sampler)
            indices = next(batches)
        batch = collate(tokenizer, [encoded[i] for i in indices])
        labels = batch["labels"]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        real_tokens += int(batch["attention_mask"].sum()) + int((labels != -100).sum())
        if on_step:
            on_step(step, batch)
        value = loss.detach().item()
        if not math.isfinite(value):
            result.diverged = True
            break
        window.append(value)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            result.steps.append(step + 1)
            result.losses.append(sum(window) / len(window))
            window = []
    result.seconds = time.perf_counter() - started
    result.tokens_per_s = real_tokens / max(result.seconds, 1e-9)
    model.eval()
    return result


@torch.no_grad()
def translate(model, tokenizer: PreTrainedTokenizerFast, sources: Sequence[str], batch_size: int = 64) -> list[str]:
    """Greedy decoding (beam 1, to save CPU; the paper uses beam 4), sources sorted by length to limit padding."""
    model.eval()
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hypotheses: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = tokenizer([sources[i] for i in idx], return_tensors="pt", padding=True)
        output = model.generate(**inputs, num_beams=1, do_sample=False)
        for i, text in zip(idx, tokenizer.batch_decode(output, skip_special_tokens=True), strict=True):
            hypotheses[i] = text.strip()
    return [hypotheses[i] for i in range(len(sources))]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU by the package's metric (sacreBLEU, 13a tokenisation), as `train.py` reports it."""
    return float(BLEU.compute(predictions=list(hypotheses), references=[[r] for r in references])["score"])


def evaluate_bleu(model, tokenizer: PreTrainedTokenizerFast, test_pairs: Sequence[Pair]) -> float:
    return bleu(translate(model, tokenizer, [s for s, _ in test_pairs]), [t for _, t in test_pairs])


def saved_activation_bytes(model, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass: the activation memory of a training step,
    measured exactly and deterministically (a process-wide peak RSS on CPU would mix in allocator noise)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()  # shared storages count once
        return t

    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**inputs).logits
    del logits
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)


# ----------------------------------------------------------------------------------------------- output


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_report(out: Path, title: str, command: str, body: str, smoke: bool) -> Path:
    note = "\n> **Smoke run** (CI): a handful of steps; the numbers below mean nothing.\n" if smoke else ""
    text = f"# {title}\n{note}\nCommand: `{command}`\n\n{body.strip()}\n"
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get a sensible number of digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if abs(v) >= 1e3:
                return f"{v:.0f}"
            return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def num_words(text: str) -> int:
    return len(text.split())


def length_split(
    num_train: int, num_test: int, max_train_words: int, seed: int = 0, vocab_size: int = 2000
) -> tuple[Data, list[Pair], list[Pair]]:
    """Train only on pairs whose source AND target have at most `max_train_words` words; return the data, the test
    pairs of training length (short) and the test pairs whose source is longer than any training source (long)."""
    data = load_data(
        num_train,
        num_test,
        seed=seed,
        vocab_size=vocab_size,
        train_filter=lambda p: max(num_words(p[0]), num_words(p[1])) <= max_train_words,
    )
    longest = max(num_words(s) for s, _ in data.train)
    short = [p for p in data.test if max(num_words(p[0]), num_words(p[1])) <= max_train_words]
    long = [p for p in data.test if num_words(p[0]) > longest]
    return data, short, long


def bleu_caveat(best_bleu: float) -> str:
    """A warning for reports whose models never got to translate: then BLEU cannot rank the variants."""
    if best_bleu >= 10:
        return ""
    return (
        f"\n**Every BLEU here is below 10 (best {best_bleu:.2f}): at this budget the models have not started to "
        "translate yet (the 1000-step demo is also at BLEU 0.3 at step 250 and reaches 60 at step 500), so BLEU "
        "does not rank the variants; the loss curves and the speed/memory/statistics measurements do.**\n"
    )
