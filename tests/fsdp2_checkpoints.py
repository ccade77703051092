"""Run by tests/test_checkpoints.py under ``torchrun --nproc_per_node 2``: FSDP2 (`fully_shard`) training of a tiny
model with the fused loss (checked against the same steps in one unsharded process), sharded checkpoints, averaging
them into the sharded model, and saving the result."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import random_batch, tiny_model
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_vanilla_transformer.checkpoints import FSDP_SHARDED_FOLDER, average_checkpoints, load_weights


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole weights on rank 0 ({} elsewhere), as `Accelerator.get_state_dict` gathers them for FSDP2 (the call
    train.py makes through Trainer, which needs a GPU to turn FSDP on)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def main(folder: str) -> None:
    out = Path(folder)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_model(seed=0).train()
    model.fused_training_loss = True
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        fully_shard(layer)
    fully_shard(model)
    assert isinstance(model.lm_head.weight, DTensor)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # not Adam: it would hide a wrongly scaled gradient
    saved = []
    for step in range(1, 7):
        input_ids, attention_mask, labels = random_batch(seed=step + 100 * rank)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:  # accelerate's layout for FSDP with a sharded state dict: {"model": ...} in DCP files
            dcp.save(
                {"model": get_model_state_dict(model)},
                checkpoint_id=str(out / f"checkpoint-{step}" / FSDP_SHARDED_FOLDER),
            )
            saved.append(full_state_dict(model))  # gathered on rank 0 (the others get {})
    # The same 6 steps in one process without sharding, on both processes' batches (the mean of the two losses is
    # what data parallelism averages): FSDP2, with the fused loss reading the gathered output weight, must agree.
    reference = tiny_model(seed=0).train()
    reference.fused_training_loss = True
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for step in range(1, 7):
        losses = [
            reference(
                **dict(zip(("input_ids", "attention_mask", "labels"), random_batch(seed=step + 100 * r), strict=True))
            ).loss
            for r in (0, 1)
        ]
        (sum(losses) / 2).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    trained = full_state_dict(model)
    if rank == 0:
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(trained[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    average = average_checkpoints(out, 3)  # every process reads the files
    load_weights(model, average)  # every process: each keeps its shard of the average
    final = full_state_dict(model)
    if rank == 0:
        expected = {k: (sum(s[k].double() for s in saved) / 3).float() for k in saved[0]}
        for name, tensor in expected.items():
            assert torch.equal(average[name], tensor), name  # the files' average is the weights' average
            assert torch.equal(final[name], tensor), name  # and it is what the sharded model now holds
        assert not torch.equal(saved[0]["lm_head.weight"], saved[2]["lm_head.weight"])  # training moved them
        model.save_pretrained(out / "final", state_dict=final)
        save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected_average.safetensors"))
        print("FSDP2 average OK:", len(expected), "tensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
