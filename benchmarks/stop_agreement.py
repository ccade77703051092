"""What stopping together costs: the per-step all-reduce of `callbacks.any_process` against a data-parallel training
step, measured side by side in the same 2 gloo processes.

    python benchmarks/stop_agreement.py [--json out.json]

Both processes train the CPU demo's model (`train.py`'s DEMO_RECIPE: d_model 128, 2+2 layers, vocabulary 4,000)
under DistributedDataParallel on token batches of 1,500 tokens each (the demo's 3,000 per update, split in two), and
then run `any_process(False)` many times; each figure is the median over rank 0's repetitions. The all-reduce's
share of a step is what `SaveOnSignal` (and `TrainingTimeBudget`, when a budget is set) add to every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration  # noqa: E402
from hf_vanilla_transformer.callbacks import any_process  # noqa: E402

STEPS, VOTES, ROWS, LENGTH = 20, 2000, 60, 25  # 60 rows x 25 tokens = 1,500 tokens per process and side


def worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per process, as torchrun's OMP_NUM_THREADS=1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = VanillaTransformerConfig.from_preset(
        "tiny", vocab_size=4000, d_model=128, encoder_ffn_dim=512, decoder_ffn_dim=512, dropout=0.0
    )
    model = VanillaTransformerForConditionalGeneration(config).train()
    model.fused_training_loss = True
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(4, 4000, (ROWS, LENGTH), generator=g)
    labels = torch.randint(4, 4000, (ROWS, LENGTH), generator=g)
    steps = []
    for step in range(STEPS + 3):
        dist.barrier()
        start = time.perf_counter()
        ddp(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 3:
            steps.append(time.perf_counter() - start)
    votes = []
    for _ in range(VOTES):
        start = time.perf_counter()
        any_process(False)
        votes.append(time.perf_counter() - start)
    if rank == 0:
        queue.put({"step_s": statistics.median(steps), "all_reduce_s": statistics.median(votes[100:])})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="Write the figures here as JSON.")
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(2, 29591, queue), nprocs=2, join=True)
    figures = queue.get()
    figures["share_of_a_step"] = figures["all_reduce_s"] / figures["step_s"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "processes": 2,
        "backend": "gloo",
        **figures,
    }
    print(
        f"DDP training step (2 gloo processes, demo model, 1,500 tokens each): {figures['step_s'] * 1e3:.1f} ms; "
        f"any_process all-reduce: {figures['all_reduce_s'] * 1e6:.0f} us = {100 * figures['share_of_a_step']:.3f}% "
        "of a step"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
