"""Run by tests/test_train.py under ``torchrun --nproc_per_node 2``: both processes prepare the data with train.py's
`prepare_data` from the same local JSON-lines files; rank 0 checks that they ended with the same tokenizer and the
same token ids, that only rank 0 trained a BPE, and that rank 1 reused rank 0's tokenized cache files."""

import hashlib
import sys

import torch.distributed as dist

import hf_vanilla_transformer.data as data
import hf_vanilla_transformer.tokenization as tokenization
import train
from hf_vanilla_transformer.data import _tokenizer_identity


def refuse(*args, **kwargs):
    raise AssertionError("a process other than the main one trained a BPE or tokenized")


def main(folder: str) -> None:
    model_args, data_args, training_args = train.parse_args([
        "--train_file", f"{folder}/train.jsonl", "--validation_file", f"{folder}/validation.jsonl",
        "--source_lang", "en", "--target_lang", "de", "--config_name", "tiny", "--vocab_size", "300",
        "--output_dir", f"{folder}/out", "--report_to", "none",
    ])  # fmt: skip
    if training_args.process_index != 0:  # also initialises the process group
        tokenization.train_tokenizer = refuse
        data.make_preprocess = lambda *args, **kwargs: refuse  # rank 1 must load rank 0's tokenized cache
    _, tokenizer, tokenized = train.prepare_data(model_args, data_args, training_args, resume=None)
    ids = hashlib.sha256()
    for split in ("train", "validation"):
        for column in ("input_ids", "labels"):
            for row in tokenized[split][column]:
                ids.update(bytes(str(row), "ascii"))
    mine = {
        "tokenizer": hashlib.sha256(_tokenizer_identity(tokenizer).encode()).hexdigest(),
        "ids": ids.hexdigest(),
        "cache": [f["filename"] for split in ("train", "validation") for f in tokenized[split].cache_files],
        "rows": len(tokenized["train"]),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        assert len(everyone) == 2 and everyone[0] == everyone[1], everyone
        assert mine["cache"] and mine["rows"] == 200, mine
        print("same data on every process:", mine["tokenizer"][:12], mine["ids"][:12], mine["cache"][0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
