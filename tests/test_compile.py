"""`torch.compile` of training steps on token batches (§5.1), whose shapes change every step: Trainer's
`--torch_compile` must not recompile for each new shape."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from conftest import VOCAB, tiny_model
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

from hf_vanilla_transformer.batching import TokenBatchSeq2SeqTrainer
from hf_vanilla_transformer.tokenization import train_tokenizer


def _pairs(count: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    src = [[*rng.integers(3, VOCAB, n).tolist(), 2] for n in rng.integers(2, 40, count)]
    tgt = [[*rng.integers(3, VOCAB, n).tolist(), 2] for n in rng.integers(2, 40, count)]
    return datasets.Dataset.from_dict({"input_ids": src, "attention_mask": [[1] * len(s) for s in src], "labels": tgt})


def test_trainer_torch_compile_takes_token_batches_of_new_shapes_without_recompiling(tmp_path):
    """Six or more different (rows, source length, target length) shapes; at most 2 compiled graphs: the first,
    static one, and one with dynamic sizes once a size has changed (torch's automatic dynamic shapes), with no graph
    break. Before, the fused loss's data-dependent row selection broke the graph, and the part after the break
    recompiled at every step (10 graphs for 6 shapes). The "aot_eager" backend traces forward and backward as
    inductor would, without its minute of C++ compilation; recompiles are decided before any backend."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    model = tiny_model(max_position_embeddings=64).train()
    model.fused_training_loss = True
    tokenizer = train_tokenizer(["a b c"], vocab_size=300)
    shapes = []

    def collate(features):
        batch = DataCollatorForSeq2Seq(tokenizer, model=model)(features)
        shapes.append((*batch["input_ids"].shape, batch["labels"].shape[1]))
        return batch

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        max_steps=8, learning_rate=1e-3, torch_compile=True, torch_compile_backend="aot_eager", seed=0,
    )  # fmt: skip
    trainer = TokenBatchSeq2SeqTrainer(
        model=model, args=args, train_dataset=_pairs(200), data_collator=collate, max_tokens=400
    )
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert len(set(shapes)) >= 6, shapes
    assert 1 <= graphs["unique_graphs"] <= 2, (graphs, shapes)
