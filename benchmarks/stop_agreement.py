"""What stopping together costs, side by side in the same training steps: a vote at every step end (an all-reduce of
one number, `callbacks.any_process`, as `SaveOnSignal` did before) against `SaveOnSignal` as it is, voting only at
the steps `AgreedSteps` agrees on (every ~2 s of training), both in the same 2 gloo processes.

    python benchmarks/stop_agreement.py [--json out.json]

Both processes train the CPU demo's model (`train.py`'s DEMO_RECIPE: d_model 128, 2+2 layers, vocabulary 4,000)
under DistributedDataParallel on token batches of 1,500 tokens each (the demo's 3,000 per update, split in two).
After each step (and an untimed barrier) each process runs both checks, timed apart and in alternating order:
`any_process(False)` and `SaveOnSignal.on_step_end`.
Figures are rank 0's: the median step, each check's mean time per step (the mean: the agreed check costs nothing at
most steps and one all-reduce at a few), and the number of all-reduces each made. On CPU an all-reduce is a copy
and a message; on GPUs its `.item()` also waits for the step's kernels, which this CPU benchmark cannot show.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from transformers import TrainerControl, TrainerState  # noqa: E402

from hf_vanilla_transformer import VanillaTransformerConfig, VanillaTransformerForConditionalGeneration  # noqa: E402
from hf_vanilla_transformer.callbacks import SaveOnSignal, any_process  # noqa: E402

STEPS, WARMUP, ROWS, LENGTH = 40, 3, 60, 25  # 60 rows x 25 tokens = 1,500 tokens per process and side


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

    def step() -> None:
        ddp(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(WARMUP):
        step()
    args = SimpleNamespace(device="cpu", output_dir="unused")
    state, control = TrainerState(max_steps=10**6), TrainerControl()
    stopper = SaveOnSignal()
    stopper.on_train_begin(args, state, control)
    steps, every_step, agreed = [], [], []
    dist.barrier()
    for number in range(1, STEPS + 1):
        start = time.perf_counter()
        step()
        steps.append(time.perf_counter() - start)
        state.global_step = number
        # Untimed: the processes end a step at different times, and the first collective after it would count the
        # wait for the slower one (a wait the next step's gradient all-reduce has anyway). The two checks then run
        # in alternating order.
        dist.barrier()
        checks = [(every_step, lambda: any_process(False)), (agreed, lambda: stopper.on_step_end(args, state, control))]
        for times, check in checks[:: 1 if number % 2 else -1]:
            start = time.perf_counter()
            check()
            times.append(time.perf_counter() - start)
    assert not control.should_training_stop
    if rank == 0:
        queue.put(
            {
                "steps": STEPS,
                "step_s": statistics.median(steps),
                "every_step_vote_s_per_step": statistics.fmean(every_step),
                "every_step_votes": STEPS,
                "agreed_vote_s_per_step": statistics.fmean(agreed),
                "agreed_votes": stopper.agreement.votes,
                "agreed_every_steps": stopper.agreement.every,
            }
        )
    stopper.on_train_end(args, state, control)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="Write the figures here as JSON.")
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(2, 29591, queue), nprocs=2, join=True)
    figures = queue.get()
    for name in ("every_step", "agreed"):
        figures[f"{name}_share_of_a_step"] = figures[f"{name}_vote_s_per_step"] / figures["step_s"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "processes": 2,
        "backend": "gloo",
        **figures,
    }
    lines = [f"DDP training step (2 gloo processes, demo model, 1,500 tokens each): {figures['step_s'] * 1e3:.1f} ms"]
    for name, label in (("every_step", "vote at every step"), ("agreed", "vote at agreed steps")):
        cost, share = figures[f"{name}_vote_s_per_step"], figures[f"{name}_share_of_a_step"]
        lines.append(
            f"{label}: {figures[f'{name}_votes']} all-reduces in {STEPS} steps, "
            f"{cost * 1e6:.0f} us a step = {100 * share:.3f}%"
        )
    print("\n".join(lines), f"(agreed: every {figures['agreed_every_steps']} steps)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
