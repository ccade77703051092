"""Run by tests/test_token_weighting.py under ``torchrun --nproc_per_node 2``: each process trains one update of
2 accumulation steps with TokenBatchSeq2SeqTrainer, plain loss then fused; rank 0 checks that the gradient is the
one of a single process on the whole batch (fp32, atol = rtol = 1e-5), and that both processes hold it."""

import sys
from pathlib import Path

import torch.distributed as dist
from test_token_weighting import (
    FOUR_BATCHES,
    TOKENS_PER_BATCH,
    assert_same_gradients,
    first_update_gradients,
    weighting_dataset,
    whole_batch_gradients,
)


def main(output_dir: str) -> None:
    dataset = weighting_dataset(FOUR_BATCHES)
    expected = whole_batch_gradients(dataset)  # one process, the whole batch in one forward
    for loss in ("plain", "fused"):
        grads, counts = first_update_gradients(
            dataset, Path(output_dir) / loss, loss == "fused", accumulation=2, max_tokens=4 * TOKENS_PER_BATCH
        )
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (counts, grads))
        if dist.get_rank() == 0:
            assert dist.get_world_size() == 2
            assert sorted(shares[0][0] + shares[1][0]) == [2, 3, 12, 24], shares  # all four micro-batches, once
            for rank_grads in (shares[0][1], shares[1][1]):
                assert_same_gradients(rank_grads, expected)
            print(f"DDP token weighting OK: {loss}; target tokens per process {shares[0][0]} and {shares[1][0]}")


if __name__ == "__main__":
    main(sys.argv[1])
