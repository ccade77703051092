"""One update weighs every target token alike, however the tokens fall into micro-batches and processes (§5.1, issue
#28): Trainer's `num_items_in_batch` counts the update's target tokens (over all accumulation steps and processes),
and the model's loss, plain or fused, is the sum of its tokens' §5.4 losses divided by that count.

Each test trains one update with `TokenBatchSeq2SeqTrainer` (as `train.py` sets it up: label smoothing 0.1 moved
into the model) on micro-batches whose target-token counts differ tenfold, captures the gradient just before the
optimizer step, and compares it with the gradient of the plain mean loss of one forward over the whole batch (all
examples padded together, one process). Tolerance: fp32, atol = rtol = 1e-5 (only the order of float sums differs).
"""

from __future__ import annotations

import os
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments, TrainerCallback

import train
from hf_vanilla_transformer.batching import TokenBatchSeq2SeqTrainer
from hf_vanilla_transformer.tokenization import train_tokenizer

TOKENS_PER_BATCH = 24  # each micro-batch's token budget; the groups below fill one batch each
# (examples, source length, target length) per micro-batch; target tokens 24, 2, 3 and 12: however two processes
# share the four, their token counts differ (at least 26 against 15), as do those of their micro-batches.
TWO_BATCHES = [(6, 4, 4), (1, 24, 2)]
FOUR_BATCHES = [*TWO_BATCHES, (3, 8, 1), (2, 12, 6)]
EPSILON = 0.1
ATOL = RTOL = 1e-5


def weighting_dataset(groups: list[tuple[int, int, int]], seed: int = 0) -> datasets.Dataset:
    """Random ids (3..VOCAB-1: no special token) in examples of the given sizes; the target ends in EOS (2)."""
    g = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for count, source_length, target_length in groups:
        for _ in range(count):
            sources.append(torch.randint(3, VOCAB, (source_length,), generator=g).tolist())
            targets.append([*torch.randint(3, VOCAB, (target_length - 1,), generator=g).tolist(), 2])
    return datasets.Dataset.from_dict({"input_ids": sources, "labels": targets})


def collator(model) -> DataCollatorForSeq2Seq:
    """train.py's collator: pads (source with id 0, the tiny model's pad; labels with -100), builds decoder inputs."""
    tokenizer = train_tokenizer(["a b"], vocab_size=300)
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0
    return DataCollatorForSeq2Seq(tokenizer, model=model)


class GradientsBeforeStep(TrainerCallback):
    """Keeps each update's gradients as the optimizer will see them (after DDP's all-reduce; clipping is off)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def whole_batch_gradients(dataset: datasets.Dataset) -> dict[str, torch.Tensor]:
    """One process, one forward over all examples padded together: the gradient of the batch's mean token loss."""
    model = tiny_model(label_smoothing=EPSILON).train()
    batch = collator(model)([dataset[i] for i in range(len(dataset))])
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def first_update_gradients(dataset, output_dir, fused: bool, accumulation: int, max_tokens: int):
    """`train.py`'s set-up on the tiny model: one epoch that is one update. Returns the gradients and the target
    token counts of this process's micro-batches."""
    model = tiny_model().train()
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        num_train_epochs=1, gradient_accumulation_steps=accumulation, max_grad_norm=0.0, seed=0,
        label_smoothing_factor=EPSILON,
    )  # fmt: skip
    train.move_label_smoothing_into_model(model, args)  # the model smooths; Trainer's factor becomes 0
    assert model.config.label_smoothing == EPSILON and args.label_smoothing_factor == 0.0
    model.fused_training_loss = fused
    spy = GradientsBeforeStep()
    trainer = TokenBatchSeq2SeqTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator(model), max_tokens=max_tokens,
        callbacks=[spy],
    )  # fmt: skip
    assert trainer.tokens_per_batch == TOKENS_PER_BATCH
    counts = [int((batch["labels"] != -100).sum()) for batch in trainer.get_train_dataloader()]
    assert len(counts) == accumulation  # this process's share of the epoch is exactly one update
    trainer.train()
    assert len(spy.grads) == 1
    return spy.grads[0], counts


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_accumulated_micro_batches_give_the_whole_batch_gradient(tmp_path, fused):
    """1 process x 2 accumulation steps of 24 and 2 target tokens: the gradient of the 26 tokens' mean loss, not the
    mean of the two micro-batches' means (which weighs each of the 2 short tokens 6.5 times as much as the others)."""
    dataset = weighting_dataset(TWO_BATCHES)
    grads, counts = first_update_gradients(dataset, tmp_path, fused, accumulation=2, max_tokens=2 * TOKENS_PER_BATCH)
    assert sorted(counts) == [2, 24]
    assert_same_gradients(grads, whole_batch_gradients(dataset))


def test_direct_calls_still_return_the_mean_over_tokens():
    """Without `num_items_in_batch` (direct calls, evaluation) the loss is the plain mean, fused or not; with it,
    the sum over tokens divided by it."""
    dataset = weighting_dataset(TWO_BATCHES)
    model = tiny_model(label_smoothing=EPSILON).train()
    batch = collator(model)([dataset[i] for i in range(len(dataset))])
    tokens = int((batch["labels"] != -100).sum())
    logits = model(**batch).logits
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=EPSILON, reduction="none"
    )
    for fused in (False, True):
        out = model(**batch, return_logits=not fused)
        assert out.loss.item() == pytest.approx(per_token.sum().item() / tokens, abs=1e-5)
        for divisor in (100, torch.tensor(100), torch.tensor(100.0)):
            loss = model(**batch, return_logits=not fused, num_items_in_batch=divisor).loss
            assert loss.item() == pytest.approx(per_token.sum().item() / 100, abs=1e-5)


@pytest.mark.slow
def test_two_processes_with_accumulation_give_the_whole_batch_gradient(tmp_path):
    """torchrun, 2 CPU processes (gloo) x 2 accumulation steps, micro-batches of 24, 2, 3 and 12 target tokens: the
    gradient of one process on the whole batch, for the plain and the fused loss (tests/ddp_token_weighting.py)."""
    script = os.path.join(os.path.dirname(__file__), "ddp_token_weighting.py")
    root = os.path.dirname(os.path.dirname(script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, script, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for loss in ("plain", "fused"):
        assert f"DDP token weighting OK: {loss}" in result.stdout
