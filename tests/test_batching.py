"""Token-based batching (§5.1): budget, coverage, determinism, data-parallel shares, and the Trainer integration."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import tiny_model
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

from hf_vanilla_transformer.batching import TokenBatchSampler, TokenBatchSeq2SeqTrainer, example_lengths
from hf_vanilla_transformer.tokenization import train_tokenizer

LENGTHS = np.random.default_rng(0).integers(3, 41, size=1000).tolist()


def flat(batches):
    return sorted(i for batch in batches for i in batch)


def padding_fraction(batches, lengths):
    lengths = np.asarray(lengths)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - sum(lengths[b].sum() for b in batches) / padded


def test_every_example_once_and_within_budget():
    batches = list(TokenBatchSampler(LENGTHS, max_tokens=200))
    assert flat(batches) == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) * max(LENGTHS[i] for i in batch) <= 200
    assert len(batches) == len(TokenBatchSampler(LENGTHS, max_tokens=200))


def test_batches_group_similar_lengths_and_cut_padding():
    batches = list(TokenBatchSampler(LENGTHS, max_tokens=400))
    mean_size = round(np.mean([len(b) for b in batches]))
    permutation = np.random.default_rng(1).permutation(len(LENGTHS))
    random_batches = [permutation[i : i + mean_size] for i in range(0, len(LENGTHS), mean_size)]
    assert padding_fraction(batches, LENGTHS) < 0.05 < 0.3 < padding_fraction(random_batches, LENGTHS)


def test_an_overlong_example_gets_its_own_batch():
    batches = list(TokenBatchSampler([5, 5, 50, 5], max_tokens=20, shuffle=False))
    assert [2] in batches and flat(batches) == [0, 1, 2, 3]


def test_same_seed_and_epoch_same_batches_new_epoch_reshuffles():
    a, b = TokenBatchSampler(LENGTHS, 300, seed=7), TokenBatchSampler(LENGTHS, 300, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first and flat(second) == flat(first)
    assert len(second) == len(first)  # the epoch length never changes (Trainer sizes the schedule from it)
    assert list(TokenBatchSampler(LENGTHS, 300, seed=8)) != first


def test_no_shuffle_is_sorted_by_length():
    batches = list(TokenBatchSampler(LENGTHS, 300, shuffle=False))
    order = [i for batch in batches for i in batch]
    assert [LENGTHS[i] for i in order] == sorted(LENGTHS)


@pytest.mark.parametrize("max_tokens", [97, 200, 1000])
def test_two_replicas_get_disjoint_equal_shares(max_tokens):
    shares = [list(TokenBatchSampler(LENGTHS, max_tokens, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(TokenBatchSampler(LENGTHS, max_tokens, num_replicas=2, rank=0))
    assert not set(flat(shares[0])) & set(flat(shares[1]))
    assert flat(shares[0] + shares[1]) == list(range(len(LENGTHS)))


def test_batch_count_is_made_a_multiple_of_the_replicas():
    # Four equal examples, two per batch: 2 batches; three replicas need 3, so one batch is halved.
    sampler = TokenBatchSampler([10] * 4, max_tokens=20, num_replicas=3)
    assert len(sampler) == 3
    assert sorted(map(len, sampler)) == [1, 1, 2]


def test_accelerate_shard_of_the_full_list_equals_the_rank_share():
    """Under Trainer, accelerate wraps the (rank=None) sampler in BatchSamplerShard with even_batches=True."""
    for epoch in (0, 1):
        full = TokenBatchSampler(LENGTHS, 150, seed=5, num_replicas=2)
        full.set_epoch(epoch)
        for rank in (0, 1):
            own = TokenBatchSampler(LENGTHS, 150, seed=5, num_replicas=2, rank=rank)
            own.set_epoch(epoch)
            shard = BatchSamplerShard(full, num_processes=2, process_index=rank, even_batches=True)
            assert list(shard) == list(own)  # nothing repeated: the count is already even
            assert len(shard) == len(own)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2"):
        TokenBatchSampler(LENGTHS, 100, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBatchSampler(LENGTHS, 0)
    with pytest.raises(ValueError, match="3 examples"):
        TokenBatchSampler([4, 4, 4], 100, num_replicas=4)
    with pytest.raises(ValueError, match="single-example"):
        TokenBatchSampler([30, 30, 30], 40, num_replicas=2)


# --- Trainer integration -----------------------------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """Stands in for a seq2seq model: records which examples (first source token = id) each step saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.seen.append((input_ids[:, 0] - 10).tolist())
        return {"loss": (self.weight * attention_mask.sum() * 1e-3).sum()}


def id_dataset(size: int, seed: int = 0) -> datasets.Dataset:
    """Example i: source = [i + 10, ...] (so the model can tell which example it got), variable lengths."""
    rng = np.random.default_rng(seed)
    src = [[i + 10] + [5] * int(n) for i, n in enumerate(rng.integers(2, 30, size))]
    tgt = [[6] * int(n) + [2] for n in rng.integers(2, 30, size)]
    return datasets.Dataset.from_dict({"input_ids": src, "attention_mask": [[1] * len(s) for s in src], "labels": tgt})


def test_example_lengths_is_the_longer_side():
    ds = id_dataset(50)
    expected = [max(len(s), len(t)) for s, t in zip(ds["input_ids"], ds["labels"], strict=True)]
    assert example_lengths(ds).tolist() == expected
    assert example_lengths(ds.select([3, 1])).tolist() == [expected[3], expected[1]]


def test_trainer_uses_token_batches_and_reshuffles_each_epoch(tmp_path):
    tokenizer = train_tokenizer(["a b c d"], vocab_size=300)
    model, ds = RecordingModel(), id_dataset(300)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=4, seed=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer)
    trainer = TokenBatchSeq2SeqTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, max_tokens=256)
    steps = len(trainer.get_train_dataloader())
    trainer.train()
    assert len(model.seen) == 2 * steps
    lengths = example_lengths(ds)
    for epoch in (model.seen[:steps], model.seen[steps:]):
        assert flat(epoch) == list(range(len(ds)))  # every example once per epoch
        assert all(len(b) * lengths[b].max() <= 256 for b in epoch)
        assert max(len(b) for b in epoch) > 4  # per_device_train_batch_size is not used
    assert model.seen[:steps] != model.seen[steps:]  # set_epoch reached the sampler


@pytest.mark.slow
def test_two_real_processes_share_the_epoch(tmp_path):
    """torchrun, 2 CPU processes (gloo): Trainer + accelerate give disjoint shares covering every example."""
    script = os.path.join(os.path.dirname(__file__), "ddp_token_batches.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(script)), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "DDP token batches OK" in result.stdout


def test_max_tokens_is_the_budget_of_one_update_shared_by_accumulation_steps(tmp_path):
    """§5.1's ~25,000 tokens are per training batch (one update): with 4 accumulation steps (or 4 processes) each
    batch gets a quarter, and a budget too small to share is refused with its figures."""
    collator = DataCollatorForSeq2Seq(train_tokenizer(["a b"], vocab_size=300))

    def trainer(max_tokens: int, accumulation: int) -> TokenBatchSeq2SeqTrainer:
        args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=accumulation
        )
        return TokenBatchSeq2SeqTrainer(
            model=RecordingModel(), args=args, train_dataset=id_dataset(300), data_collator=collator,
            max_tokens=max_tokens,
        )  # fmt: skip

    whole, quarter = trainer(1000, 1), trainer(1000, 4)
    assert (whole.tokens_per_batch, quarter.tokens_per_batch) == (1000, 250)
    lengths = example_lengths(id_dataset(300))
    for batch in quarter.get_train_dataloader().batch_sampler:
        assert len(batch) * lengths[batch].max() <= 250 or len(batch) == 1
    with pytest.raises(ValueError, match=r"max_tokens=3 .* 1 processes x 4 accumulation"):
        trainer(3, 4)


def test_evaluation_leaves_the_models_generation_config_as_it_was(tmp_path):
    """Seq2SeqTrainer's prediction step writes GenerationConfig's defaults (max_length 20, ...) into the model's own
    config; the trainer puts it back, so the saved model keeps only its settings and later calls with
    max_new_tokens do not warn that max_length was set too."""
    model = tiny_model()
    before = model.generation_config.to_dict()
    assert before.get("max_length") is None
    ds = id_dataset(20).map(lambda row: {"input_ids": [i % 50 + 3 for i in row["input_ids"]]})
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", predict_with_generate=True,
        per_device_eval_batch_size=8, generation_num_beams=1,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(train_tokenizer(["a b"], vocab_size=300), model=model)
    trainer = TokenBatchSeq2SeqTrainer(model=model, args=args, eval_dataset=ds, data_collator=collator, max_tokens=256)
    predictions = trainer.predict(ds).predictions
    assert predictions.shape[0] == len(ds)
    assert model.generation_config.to_dict() == before
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert "max_length" not in saved and "top_k" not in saved
