"""Run by tests/test_batching.py under ``torchrun --nproc_per_node 2``: each process trains 2 epochs with
TokenBatchSeq2SeqTrainer and records the examples it saw; rank 0 checks the shares are disjoint and complete."""

import sys

import torch.distributed as dist
from test_batching import RecordingModel, flat, id_dataset
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

from hf_vanilla_transformer.batching import TokenBatchSeq2SeqTrainer
from hf_vanilla_transformer.tokenization import train_tokenizer


def main(output_dir: str) -> None:
    args = Seq2SeqTrainingArguments(
        output_dir=output_dir, num_train_epochs=2, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", seed=0,
    )  # fmt: skip
    model, ds = RecordingModel(), id_dataset(301)  # 410 per update = 205 per process: 35 batches, odd on purpose
    collator = DataCollatorForSeq2Seq(train_tokenizer(["a b"], vocab_size=300))
    trainer = TokenBatchSeq2SeqTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, max_tokens=410)
    steps = len(trainer.get_train_dataloader())
    trainer.train()
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (steps, model.seen))
    if dist.get_rank() == 0:
        assert dist.get_world_size() == 2 and shares[0][0] == shares[1][0] == steps
        for epoch in (slice(0, steps), slice(steps, 2 * steps)):
            rank0, rank1 = flat(shares[0][1][epoch]), flat(shares[1][1][epoch])
            assert not set(rank0) & set(rank1), "a batch was given to both processes"
            assert sorted(rank0 + rank1) == list(range(len(ds))), "an example was skipped or repeated"
        assert shares[0][1][:steps] != shares[0][1][steps:], "the second epoch was not reshuffled"
        print("DDP token batches OK", steps, "steps per epoch per process")


if __name__ == "__main__":
    main(sys.argv[1])
