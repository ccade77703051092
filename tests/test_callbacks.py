"""TrainingTimeBudget: training time excludes evaluations, the budget stops and saves, logs carry the minutes."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_vanilla_transformer import callbacks
from hf_vanilla_transformer.callbacks import TrainingTimeBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    return clock


def test_budget_counts_training_time_only_and_stops_with_a_checkpoint(clock, tmp_path):
    args, state, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), TrainerControl()
    budget = TrainingTimeBudget(max_minutes=1.0)
    budget.on_train_begin(args, state, control)
    clock.now += 30  # a step
    budget.on_step_end(args, state, control)
    assert not control.should_training_stop
    state.log_history.append({"loss": 1.0, "step": 1})
    budget.on_log(args, state, control, logs={})
    clock.now += 20  # an evaluation right after that step: its 20 s do not count
    state.log_history.append({"eval_bleu": 5.0, "step": 1})
    budget.on_log(args, state, control, logs={})
    budget.on_evaluate(args, state, control)
    assert [entry["training_minutes"] for entry in state.log_history] == [0.5, 0.5]
    clock.now += 25  # 55 s of training
    budget.on_step_end(args, state, control)
    assert not control.should_training_stop and budget.training_seconds() == pytest.approx(55)
    clock.now += 5  # 60 s: the budget is spent
    budget.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save


def test_no_budget_never_stops(clock, tmp_path):
    args, state, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), TrainerControl()
    budget = TrainingTimeBudget()
    budget.on_train_begin(args, state, control)
    clock.now += 10**6
    budget.on_step_end(args, state, control)
    assert not control.should_training_stop


@pytest.mark.parametrize("minutes", [0, -1.5])
def test_a_budget_that_is_not_positive_is_refused(minutes):
    with pytest.raises(ValueError, match=str(minutes)):
        TrainingTimeBudget(minutes)


def _vote(rank: int, port: int, votes: list[bool], results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(votes))
    results.put((rank, callbacks.any_process(votes[rank])))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("votes", [[False, True], [False, False]])
def test_any_process_agrees_across_two_processes(votes):
    """One process's stop request reaches every process (the vote of rank 1 alone stops rank 0 too); no request, no
    stop. Without a process group it is the process's own flag."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_vote, args=(port, votes, results), nprocs=2, join=True)
    outcomes = dict(results.get() for _ in votes)
    assert outcomes == {0: any(votes), 1: any(votes)}
    assert callbacks.any_process(True) is True and callbacks.any_process(False) is False


def test_save_on_signal_stops_with_a_checkpoint_and_no_evaluation_and_restores_the_handlers(tmp_path):
    import signal

    args, state, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), TrainerControl()
    before = signal.getsignal(signal.SIGTERM)
    stopper = callbacks.SaveOnSignal()
    stopper.on_train_begin(args, state, control)
    control.should_evaluate = True  # an evaluation step, as DefaultFlowCallback would have marked it
    stopper.on_step_end(args, state, control)
    assert not control.should_training_stop and control.should_evaluate and stopper.stopped_by is None
    signal.raise_signal(signal.SIGTERM)
    stopper.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and not control.should_evaluate
    assert stopper.stopped_by == "SIGTERM"
    stopper.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGTERM) == before
