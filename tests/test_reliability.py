"""Nothing silent, nothing lost: numerics under reduced precision, determinism, interrupted training (real SIGKILL
and SIGTERM), and a fuzz of forward and generate over shapes, padding and configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import PAD, VOCAB, random_batch, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_train import ROOT, TINY_RUN, resumed_from, run_train, torchrun

# ----------------------------------------------------------------------------------------------- numerics


def _cpu_autocast_dtypes() -> list[torch.dtype]:
    dtypes = []
    for dtype in (torch.bfloat16, torch.float16):
        try:
            with torch.autocast("cpu", dtype=dtype):
                torch.ones(2, 2) @ torch.ones(2, 2)
            dtypes.append(dtype)
        except RuntimeError:
            pass
    return dtypes


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", _cpu_autocast_dtypes())
def test_no_nan_under_autocast_even_for_rows_that_are_all_padding(dtype, attn_implementation):
    model = tiny_model(seed=1)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask, labels = random_batch(batch=3)
    attention_mask[2] = 0
    input_ids[2] = PAD
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_nan_with_weights_in_half_precision(dtype):
    """The masks use the dtype's own minimum (never a fixed -1e9, which is -inf in fp16)."""
    model = tiny_model(seed=2).to(dtype)
    model.set_attn_implementation("eager")
    input_ids, attention_mask, labels = random_batch(batch=3)
    attention_mask[1] = 0
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------------------------- fuzz


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 4),
    src_len=st.integers(1, 9),
    tgt_len=st.integers(1, 6),
    lengths=st.lists(st.integers(0, 9), min_size=4, max_size=4),
    normalize_before=st.booleans(),
    position=st.sampled_from(["sinusoidal", "learned"]),
    attn=st.sampled_from(["eager", "sdpa"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_forward_is_finite_and_batch_independent(
    batch, src_len, tgt_len, lengths, normalize_before, position, attn, seed
):
    model = tiny_model(seed=seed % 7, normalize_before=normalize_before, position_embedding_type=position)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    attention_mask = (torch.arange(src_len) < torch.tensor(lengths[:batch]).clamp(max=src_len)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    decoder_input_ids = torch.randint(3, VOCAB, (batch, tgt_len), generator=g)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        assert logits.shape == (batch, tgt_len, VOCAB) and torch.isfinite(logits).all()
        row = batch - 1  # the same row alone, without its padding, gives the same logits
        n = int(attention_mask[row].sum())
        if n > 0:
            alone = model(input_ids=input_ids[row:, :n], decoder_input_ids=decoder_input_ids[row:]).logits
            assert torch.allclose(alone[0], logits[row], atol=1e-4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), src_len=st.integers(1, 6), beams=st.integers(1, 3), seed=st.integers(0, 999))
def test_fuzz_generate_never_crashes_and_respects_lengths(batch, src_len, beams, seed):
    model = tiny_model(seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    out = model.generate(input_ids, num_beams=beams, max_new_tokens=4)
    assert out.shape[0] == batch and 1 <= out.shape[1] <= 5
    assert ((out >= 0) & (out < VOCAB)).all()


# ----------------------------------------------------------------------------------------------- training runs
# `reference_run` (conftest.py, shared with test_train.py): an uninterrupted 20-step run, checkpoints every 10 steps.


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_same_seed_gives_the_same_weights(reference_run, tmp_path):
    again = tmp_path / "again"
    run_train([*TINY_RUN, "--max_steps", "20", "--do_train", "--output_dir", str(again)])
    assert _same(_weights(reference_run), _weights(again))


def _start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before the checkpoint appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(reference_run, tmp_path):
    out = tmp_path / "killed"
    # The same run, except that it would go on for 1000 steps: it is killed right after its first checkpoint.
    process = _start([*TINY_RUN, "--max_steps", "1000", "--do_train", "--output_dir", str(out)])
    _wait_for(out / "checkpoint-10" / "trainer_state.json", process)
    time.sleep(0.5)  # let the checkpoint's last files land, as a real crash would not wait for either
    process.kill()
    process.wait()
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-10")]
    result = run_train([*TINY_RUN, "--max_steps", "20", "--do_train", "--output_dir", str(out), *resume])
    assert resumed_from(result.stderr) == str(out / "checkpoint-10")
    assert _same(_weights(reference_run), _weights(out))


def _read_until_training(process: subprocess.Popen, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    lines = []
    for line in process.stdout:  # wait until training is under way
        lines.append(line)
        if "'loss'" in line or time.monotonic() > deadline:
            break
    return lines


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_where(tmp_path):
    out = tmp_path / "terminated"
    process = _start([*TINY_RUN, "--max_steps", "1000", "--save_steps", "1000", "--do_train", "--output_dir", str(out)])
    lines = _read_until_training(process)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=300)
    log = "".join(lines) + rest
    assert "Received SIGTERM: saving checkpoint-" in log
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.safetensors").exists()
    assert int(checkpoints[0].name.split("-")[1]) < 1000


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The process torchrun started for `rank` (its environment has RANK)."""
    for worker in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if worker.environ().get("RANK") == str(rank):
                return worker
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one worker", "the launcher"])
def test_sigterm_stops_two_processes_at_one_step_with_one_checkpoint_and_no_evaluation(tmp_path, target):
    """2 gloo processes under torchrun. SIGTERM to rank 1 alone (before, rank 0 went on into a collective and the run
    hung for good), or to torchrun, which forwards it: both processes stop after the same step, one complete
    checkpoint is written (both processes' RNG states in it), and the run exits without the evaluation and beam
    search that would follow a normal end (no --do_train: evaluation and prediction are on)."""
    out = tmp_path / "terminated"
    args = [*TINY_RUN, "--max_steps", "1000", "--save_steps", "1000", "--eval_steps", "1000", "--output_dir", str(out)]
    process = _start(args, launcher=torchrun())
    lines = _read_until_training(process)
    assert process.poll() is None, "".join(lines)[-3000:]
    if target == "one worker":
        rank1 = _worker(process, rank=1)
        assert rank1 is not None, "".join(lines)[-3000:]
        rank1.send_signal(signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)  # torchrun kills its workers 30 s after forwarding a signal
    log = "".join(lines) + rest
    assert "Received SIGTERM: saving checkpoint-" in log, log[-3000:]
    if target == "one worker":
        assert process.returncode == 0, log[-3000:]
        assert "Received a signal to another process: saving checkpoint-" in log  # rank 0 stopped with rank 1
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].name.split("-")[1])
    files = {path.name for path in checkpoints[0].iterdir()}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= files
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"] == step < 1000
    assert log.count("exiting without evaluation") == 2  # both processes
    assert "eval_bleu" not in log and "BLEU (test)" not in log
