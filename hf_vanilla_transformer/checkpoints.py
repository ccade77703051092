"""Checkpoint averaging (§6.1: "we used a single model obtained by averaging the last 5 checkpoints") from whatever a
Trainer checkpoint holds, and loading a full set of weights into a model that may be sharded.

A checkpoint's weights come in one of the layouts Trainer and accelerate write:

- ``model.safetensors`` (one process, DDP, FSDP with a full state dict), or ``model.safetensors.index.json`` and its
  shards (a large model);
- ``pytorch_model.bin`` or its index (``--save_safetensors false``);
- ``pytorch_model_fsdp_0/``: a `torch.distributed.checkpoint` folder, one file per process (FSDP with a sharded state
  dict, accelerate's default); or ``pytorch_model_fsdp.bin``.

Every layout is read whole, in one process, into ordinary tensors: averaging needs every element anyway, and no
process group is needed to read files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.trainer_utils import sort_checkpoints

logger = logging.getLogger(__name__)

FSDP_SHARDED_FOLDER = "pytorch_model_fsdp_0"  # accelerate's save_fsdp_model: f"{FSDP_MODEL_NAME}_{model_index}"


def checkpoint_folders(output_dir: str | os.PathLike, last_k: int) -> list[Path]:
    """The last `last_k` ``checkpoint-<step>`` folders of `output_dir`, in step order (numeric, not text), as
    Trainer orders them when it deletes old ones (`sort_checkpoints`)."""
    folders = [Path(folder) for folder in sort_checkpoints(str(output_dir))[-last_k:]]
    if not folders:
        raise ValueError(f"No checkpoint-* folders in {output_dir} to average.")
    if len(folders) < last_k:
        logger.warning("Asked to average %d checkpoints; %s has only %d.", last_k, output_dir, len(folders))
    return folders


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of one checkpoint folder as ordinary CPU tensors, whichever layout it was written in."""
    folder = Path(folder)
    for index_name, load in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _torch_load),
    ):
        if (folder / index_name).exists():  # sharded: the index names each tensor's file
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            return {name: tensor for file in files for name, tensor in load(str(folder / file)).items()}
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):
        if (folder / name).exists():
            return _torch_load(str(folder / name))
    if (folder / FSDP_SHARDED_FOLDER).is_dir():
        return _read_distributed_checkpoint(folder / FSDP_SHARDED_FOLDER)
    raise ValueError(
        f"{folder}: no weights found (model.safetensors, pytorch_model.bin, their sharded indexes, "
        f"pytorch_model_fsdp.bin or {FSDP_SHARDED_FOLDER}/)"
    )


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_distributed_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.distributed.checkpoint` folder as one full state dict, read in this process alone (torch's own
    converter, `dcp_to_torch_save`, which needs no process group); accelerate nests the weights under "model"."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "weights.pt")
        dcp_to_torch_save(str(path), target)
        state = _torch_load(target)
    return state.get("model", state)


def average_checkpoints(output_dir: str | os.PathLike, last_k: int) -> dict[str, torch.Tensor]:
    """The element-wise mean of the weights of the last `last_k` checkpoints (§6.1), summed in float64; every
    checkpoint must hold the same tensors, of the same shapes."""
    folders = checkpoint_folders(output_dir, last_k)
    total: dict[str, torch.Tensor] = {}
    for folder in folders:
        weights = read_weights(folder)
        if total and weights.keys() != total.keys():
            raise ValueError(
                f"{folder} holds other tensors than {folders[0]}: "
                f"{sorted(weights.keys() ^ total.keys())[:5]} are in one only"
            )
        for name, tensor in weights.items():
            if name in total and total[name].shape != tensor.shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, not {tuple(total[name].shape)}")
            total[name] = total.get(name, 0) + tensor.double()
    logger.info("Averaged %d checkpoints: %s", len(folders), ", ".join(f.name for f in folders))
    return {name: (tensor / len(folders)).to(weights[name].dtype) for name, tensor in total.items()}


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into `model`, checking that it covers the model exactly.

    Tied weights (the shared embedding, §3.4) are saved once: each group of names for one tensor needs one of its
    names. Anything else missing, or any name the model does not have, raises a ValueError naming them (a
    `strict=False` load would skip them silently). A model sharded with FSDP2 (`fully_shard`: DTensor parameters)
    takes the full tensors through `set_model_state_dict`, which cuts each process's shard; call it on every process.
    """
    tensors = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(id(tensor), []).append(name)
    missing = [names for names in groups.values() if not any(name in state_dict for name in names)]
    unexpected = sorted(set(state_dict) - set(tensors))
    if missing or unexpected:
        raise ValueError(
            f"The weights do not fit the model: missing {[names[0] for names in missing][:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # strict=False only for the tied names checked above: set_model_state_dict fills a tied group from one name.
        # A copy: it replaces the dict's tensors by this process's shards.
        set_model_state_dict(model, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state_dict, strict=False)
