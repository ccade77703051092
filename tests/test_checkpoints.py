"""Checkpoint averaging (§6.1) from every layout a checkpoint can have, loading with key checks, and the FSDP2 path on
2 CPU processes: train sharded, average sharded checkpoints, save, reload in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_train import ROOT, torchrun

from hf_vanilla_transformer.checkpoints import average_checkpoints, load_weights, read_weights


def _mean(*weights):
    return {k: (sum(w[k].double() for w in weights) / len(weights)).float() for k in weights[0]}


def test_checkpoint_average_is_exact_and_in_step_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = []
    for step in (5, 10, 15, 20):  # checkpoint-5 sorts after checkpoint-20 as text: order must be numeric
        tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(7, generator=g)}
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(tensors, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
        weights.append(tensors)
    averaged = average_checkpoints(tmp_path, 3)
    expected = _mean(*weights[1:])
    assert averaged.keys() == expected.keys() and all(torch.equal(averaged[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="No checkpoint"):
        average_checkpoints(tmp_path / "empty", 2)


def test_every_checkpoint_layout_reads_the_same_weights(tmp_path):
    """One safetensors file, safetensors shards with their index, a torch .bin, and a torch.distributed.checkpoint
    folder as accelerate's FSDP sharded state dict writes it: the same tensors from each."""
    model = tiny_model()
    weights = {k: v.clone() for k, v in load_file(str(_saved(model, tmp_path / "single"))).items()}
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    torch.save(weights, tmp_path / "bin" / "pytorch_model.bin")
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": weights}, checkpoint_id=str(tmp_path / "dcp" / "pytorch_model_fsdp_0"), no_dist=True)
    for layout in ("shards", "bin", "dcp"):
        read = read_weights(tmp_path / layout)
        assert read.keys() == weights.keys(), layout
        assert all(torch.equal(read[k], weights[k]) for k in weights), layout
    with pytest.raises(ValueError, match="no weights found"):
        read_weights(tmp_path)


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder / "model.safetensors"


def test_checkpoints_of_different_models_are_not_averaged(tmp_path):
    for step, seed in ((1, 0), (2, 1)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(
            {"a": torch.randn(3, generator=torch.Generator().manual_seed(seed))},
            str(tmp_path / f"checkpoint-{step}" / "model.safetensors"),
        )
    save_file({"b": torch.zeros(3)}, str(tmp_path / "checkpoint-2" / "model.safetensors"))
    with pytest.raises(ValueError, match="holds other tensors"):
        average_checkpoints(tmp_path, 2)
    save_file({"a": torch.zeros(4)}, str(tmp_path / "checkpoint-2" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"a has shape \(4,\), not \(3,\)"):
        average_checkpoints(tmp_path, 2)


def test_loading_checks_the_keys_and_fills_tied_weights_from_one_name(tmp_path):
    """The saved file holds the shared embedding once (§3.4); anything else missing or extra is an error, where a
    `strict=False` load would have loaded nothing, silently."""
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    weights = load_file(str(_saved(source, tmp_path)))
    assert "lm_head.weight" not in weights  # tied: saved under one name
    load_weights(target, weights)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert target.lm_head.weight is target.model.encoder.embed_tokens.weight  # still tied
    with pytest.raises(ValueError, match=r"missing \['model.encoder.layers.0.self_attn.q_proj.weight'\] \(1\)"):
        load_weights(
            target, {k: v for k, v in weights.items() if k != "model.encoder.layers.0.self_attn.q_proj.weight"}
        )
    renamed = {f"module.{k}": v for k, v in weights.items()}  # e.g. saved from a DDP wrapper
    with pytest.raises(ValueError, match=r"missing .* \(61\), unexpected \['module\.model\.decoder.* \(61\)"):
        load_weights(target, renamed)


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_averages_saves_and_reloads_in_a_fresh_process(tmp_path):
    """tests/fsdp2_checkpoints.py under torchrun (gloo): `fully_shard` on every layer and the root (accelerate turns
    FSDP on only with GPUs, so Trainer's --fsdp path cannot run here; this runs the functions train.py calls on it),
    3 sharded checkpoints in accelerate's layout, averaged and loaded into the sharded model, gathered and saved with
    save_pretrained. A fresh process that never sharded anything loads that folder and must find the average."""
    script = str(ROOT / "tests" / "fsdp2_checkpoints.py")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    result = subprocess.run(
        [*torchrun(), script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "FSDP2 average OK" in result.stdout
    check = (
        "import sys, torch; from safetensors.torch import load_file\n"
        "from transformers import AutoModelForSeq2SeqLM\n"
        "assert 'hf_vanilla_transformer' not in sys.modules\n"
        "model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "expected = load_file(sys.argv[2])\n"
        "state = model.state_dict()\n"
        "bad = [k for k in expected if not torch.equal(state[k], expected[k])]\n"
        "assert not bad, bad\n"
        "print('reloaded', len(expected))\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "final"), str(tmp_path / "expected_average.safetensors")],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads((tmp_path / "final" / "config.json").read_text())["auto_map"]
