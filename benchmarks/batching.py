"""Token-based batches (§5.1) against plain fixed-size random batches, on the embedded corpus.

    python benchmarks/batching.py [--max-tokens 3000] [--steps 30]

For each kind of batch: the fraction of padded positions (source and target, each padded to its batch's longest,
as `DataCollatorForSeq2Seq` does), and training throughput in real (non-padding) source + target tokens per second
of forward + backward + Adam on the model `train.py` trains by default. Fixed-size batches hold as many pairs as the
token batches do on average, so both see the same number of sentences per step. The two kinds alternate step by
step, so machine load falls on both alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import DataCollatorForSeq2Seq

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration
from hf_vanilla_transformer.batching import TokenBatchSampler, example_lengths
from hf_vanilla_transformer.corpus import SOURCE_LANG, TARGET_LANG, build_default_corpus
from hf_vanilla_transformer.data import tokenize_dataset
from hf_vanilla_transformer.tokenization import train_tokenizer


def padding_fraction(batches: list[list[int]], src: np.ndarray, tgt: np.ndarray) -> float:
    padded = real = 0
    for batch in batches:
        for lengths in (src[batch], tgt[batch]):
            padded += len(batch) * int(lengths.max())
            real += int(lengths.sum())
    return 1 - real / padded


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    corpus = build_default_corpus()
    texts = [pair[lang] for pair in corpus["train"]["translation"] for lang in (SOURCE_LANG, TARGET_LANG)]
    tokenizer = train_tokenizer(texts, vocab_size=4000)
    train = tokenize_dataset(corpus, tokenizer)["train"]
    src = np.array([len(x) for x in train["input_ids"]])
    tgt = np.array([len(x) for x in train["labels"]])

    token_batches = list(TokenBatchSampler(example_lengths(train), args.max_tokens, seed=0))
    size = round(np.mean([len(b) for b in token_batches]))
    order = np.random.default_rng(0).permutation(len(train)).tolist()
    fixed_batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
    result = {
        "pairs_per_batch": float(size),
        "padding_token_batches": padding_fraction(token_batches, src, tgt),
        "padding_fixed_batches": padding_fraction(fixed_batches, src, tgt),
    }

    config = VanillaTransformerConfig.from_preset(
        "tiny", d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, dropout=0.0, vocab_size=len(tokenizer)
    )
    model = VanillaTransformerForConditionalGeneration(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    seconds = {"token": 0.0, "fixed": 0.0}
    tokens = {"token": 0, "fixed": 0}
    for step in range(args.steps + 2):  # the first two steps of each kind warm up and are not timed
        for kind, batches in (("token", token_batches), ("fixed", fixed_batches)):
            batch = collator([train[i] for i in batches[step]])
            started = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:
                seconds[kind] += time.perf_counter() - started
                tokens[kind] += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    result["tokens_per_s_token_batches"] = tokens["token"] / seconds["token"]
    result["tokens_per_s_fixed_batches"] = tokens["fixed"] / seconds["fixed"]
    result["speedup"] = result["tokens_per_s_token_batches"] / result["tokens_per_s_fixed_batches"]
    for key, value in result.items():
        print(f"{key}: {value:.3f}")
    return result


if __name__ == "__main__":
    main()
