"""TrainingTimeBudget: training time excludes evaluations, the budget stops and saves, logs carry the minutes.
SaveOnSignal and the budget: all processes stop after the same step, agreeing at rare agreed steps, not every step;
outside the main thread SaveOnSignal warns instead of failing."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_vanilla_transformer import callbacks
from hf_vanilla_transformer.callbacks import TrainingTimeBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """SaveOnSignal installs handlers; tests that do not end training leave them: give pytest its own back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


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


# ------------------------------------------------------------------------------------------ two real gloo processes
#
# The three two-process scenarios of this file (the votes, a signal to one process, a budget over two clocks) run one
# after the other in one pair of spawned processes with one process group: starting the pair (two fresh interpreters
# importing torch and transformers) took most of each scenario's time. Each scenario reports per rank; the tests below
# check each scenario's reports as its own test did when it spawned its own pair.

VOTES = [[False, True], [False, False]]


def _two_processes(rank: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for votes in VOTES:
        results.put((("votes", tuple(votes)), rank, callbacks.any_process(votes[rank])))
    results.put(("signal", rank, _train_two_processes(rank)))
    results.put(("budget", rank, _budget_two_processes(rank)))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_gloo_processes() -> dict:
    """{(scenario, rank): what that rank reported}, from one `mp.spawn` of `_two_processes`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_two_processes, args=(port, results), nprocs=2, join=True)
    reports = [results.get() for _ in range(2 * (len(VOTES) + 2))]
    return {(scenario, rank): report for scenario, rank, report in reports}


@pytest.mark.slow
@pytest.mark.parametrize("votes", VOTES)
def test_any_process_agrees_across_two_processes(votes, two_gloo_processes):
    """One process's stop request reaches every process (the vote of rank 1 alone stops rank 0 too); no request, no
    stop. Without a process group it is the process's own flag."""
    outcomes = {rank: two_gloo_processes[("votes", tuple(votes)), rank] for rank in (0, 1)}
    assert outcomes == {0: any(votes), 1: any(votes)}
    assert callbacks.any_process(True) is True and callbacks.any_process(False) is False


def test_save_on_signal_stops_with_a_checkpoint_and_no_evaluation_and_restores_the_handlers(tmp_path):
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


# ----------------------------------------------------------------------------------------------- agreeing rarely


class FakeGroup:
    """A process group of 2 seen from rank 0, without processes: each all-reduce is counted and takes the maximum
    with the other process's values (its stop flag, and its step time, slower than ours)."""

    def __init__(self, monkeypatch, other_seconds_per_step: float = 0.1) -> None:
        self.calls = 0
        self.other_stops = False
        self.other_seconds_per_step = other_seconds_per_step
        monkeypatch.setattr(callbacks.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(callbacks.dist, "get_world_size", lambda *args: 2)
        monkeypatch.setattr(callbacks.dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, **kwargs):
        self.calls += 1
        tensor[0] = max(tensor[0].item(), int(self.other_stops))
        if tensor.numel() > 1:
            tensor[1] = max(tensor[1].item(), self.other_seconds_per_step)


def _train(callback, clock, steps: int, max_steps: int = 10**6, seconds_per_step: float = 0.05, at_step=None):
    """Step ends of `steps` steps of `seconds_per_step` each until the callback stops training; `at_step`: called
    before step end `n` with n. Returns the step training stopped at (None if it did not) and the control."""
    args = TrainingArguments(output_dir="unused", use_cpu=True)
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        if at_step:
            at_step(step)
        state.global_step = step
        callback.on_step_end(args, state, control)
        if control.should_training_stop:
            return step, control
    return None, control


def test_two_processes_agree_on_a_signal_at_rare_agreed_steps_not_at_every_step(clock, monkeypatch):
    """Another process's signal at step 50 stops this one too, at an agreed step no more than K steps later, where
    K is how many of the slowest process's steps (0.1 s) fit in 2 s: a few collectives in 60-odd steps, not one per
    step (before: 50 all-reduces for 50 steps)."""
    group = FakeGroup(monkeypatch)
    stopper = callbacks.SaveOnSignal()

    def signal_elsewhere(step):
        group.other_stops = step >= 50

    stopped_at, control = _train(stopper, clock, steps=200, at_step=signal_elsewhere)
    assert stopped_at is not None and group.calls <= 5, (stopped_at, group.calls)  # votes at steps 1, 1 + K, ...
    assert 15 <= stopper.agreement.every <= 20  # 2 s of 0.1 s steps (float32 may make it 19)
    assert 50 <= stopped_at <= 50 + stopper.agreement.every, stopped_at
    assert control.should_save and not control.should_evaluate
    assert stopper.stopped_by == "a signal to another process"


def test_a_spent_budget_is_agreed_on_rarely_too(clock, monkeypatch):
    group = FakeGroup(monkeypatch)
    budget = TrainingTimeBudget(max_minutes=1.0)
    stopped_at, control = _train(budget, clock, steps=5000)  # 0.05 s steps: 1,200 of them in a minute
    assert stopped_at is not None and group.calls <= 2 + stopped_at // 15, (stopped_at, group.calls)
    assert 1200 <= stopped_at <= 1200 + budget.agreement.every and control.should_save


def test_a_signal_in_the_last_steps_is_agreed_on_at_the_last_step_and_skips_the_final_evaluation(clock, monkeypatch):
    group = FakeGroup(monkeypatch)
    stopper = callbacks.SaveOnSignal()

    def signal_here(step):
        if step == 25:  # after the agreed step 20 or 21 (K = 19 or 20), before the next one
            stopper.received = signal.SIGTERM

    stopped_at, control = _train(stopper, clock, steps=30, max_steps=30, at_step=signal_here)
    assert stopped_at == 30 and stopper.stopped_by == "SIGTERM" and not control.should_evaluate
    assert group.calls == 3  # steps 1, 20 or 21, and 30


def test_a_signal_after_the_last_agreed_step_is_agreed_on_when_training_ends(clock, monkeypatch):
    """Training ended by something else (a spent budget) between two agreed steps: one more vote at its end."""
    group = FakeGroup(monkeypatch)
    stopper = callbacks.SaveOnSignal()
    args, state = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState(max_steps=10**6)
    assert _train(stopper, clock, steps=10)[0] is None
    calls = group.calls
    group.other_stops = True
    stopper.on_train_end(args, state, TrainerControl())
    assert group.calls == calls + 1 and stopper.stopped_by == "a signal to another process"


def test_one_process_checks_its_flag_at_every_step_with_no_collective(clock, monkeypatch):
    calls = []
    monkeypatch.setattr(callbacks.dist, "all_reduce", lambda *args, **kwargs: calls.append(args))
    stopper = callbacks.SaveOnSignal()
    stopped_at, _ = _train(stopper, clock, steps=100, at_step=lambda step: step == 7 and stopper._request(15, None))
    assert stopped_at == 7 and stopper.stopped_by == "SIGTERM" and calls == []


def _train_two_processes(rank: int) -> tuple:
    """Rank 1 gets a signal at step 33; rank 0 steps in 0.05 s, rank 1 in 0.1 s (fake clocks). Each process reports
    the step it stopped at, its all-reduces and its K (in `_two_processes`, whose process group this uses)."""
    import torch.distributed as dist

    clock = Clock()
    callbacks.time.perf_counter = clock
    calls = [0]
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        stopper = callbacks.SaveOnSignal()

        def signal_rank_1(step):
            if rank == 1 and step == 33:
                stopper.received = signal.SIGTERM

        stopped_at, _ = _train(stopper, clock, steps=300, seconds_per_step=0.05 * (rank + 1), at_step=signal_rank_1)
    finally:  # count this scenario's all-reduces only
        dist.all_reduce = all_reduce
    every = stopper.agreement.every if hasattr(stopper, "agreement") else None
    return stopped_at, calls[0], every, stopper.stopped_by


@pytest.mark.slow
def test_two_gloo_processes_stop_after_the_same_step_with_few_all_reduces(two_gloo_processes):
    outcome = {rank: two_gloo_processes["signal", rank] for rank in (0, 1)}
    (step0, calls0, every0, by0), (step1, calls1, every1, by1) = outcome[0], outcome[1]
    assert calls0 == calls1 <= 2 + step0 // 10, outcome  # before: one all-reduce per step
    assert step0 == step1 and 33 <= step0 <= 33 + every0, outcome  # the same step, at most K after the signal
    assert every0 == every1 >= 10, outcome  # K from the slower process, agreed by both
    assert (by0, by1) == ("a signal to another process", "SIGTERM")


# ------------------------------------------------------------------------------------------ outside the main thread


def test_save_on_signal_outside_the_main_thread_warns_instead_of_failing(tmp_path, caplog):
    """A notebook training in a thread, a Ray worker: Python installs signal handlers from the main thread only
    (before: ValueError "signal only works in main thread")."""
    import threading

    args, state, control = TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainerState(), TrainerControl()
    before = {sig: signal.getsignal(sig) for sig in callbacks.SaveOnSignal.SIGNALS}
    stopper = callbacks.SaveOnSignal()
    errors = []

    def train():
        try:
            stopper.on_train_begin(args, state, control)
            stopper.on_step_end(args, state, control)
            stopper.on_train_end(args, state, control)
        except Exception as error:  # reported to the test's thread
            errors.append(error)

    with caplog.at_level(logging.WARNING, logger=callbacks.__name__):
        thread = threading.Thread(target=train)
        thread.start()
        thread.join()
    assert errors == []
    assert "SIGTERM and Ctrl-C will not save a checkpoint" in caplog.text and "main thread" in caplog.text
    assert {sig: signal.getsignal(sig) for sig in callbacks.SaveOnSignal.SIGNALS} == before
    assert not control.should_training_stop and stopper.stopped_by is None


# ------------------------------------------------------------------------------------------ a schedule over the budget


def _scheduled_run(clock, budget, steps, kind="linear", warmup=10, seconds_per_step=0.5, resume_from=None):
    """Optimizer steps of a real transformers schedule under `budget`, as Trainer orders them (optimizer, scheduler,
    then the callbacks' step end). Returns the learning rate after each step, the step training stopped at (None if
    it did not), and what a checkpoint at the last step would hold (the scheduler's and the state's)."""
    from transformers import get_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-3)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=10**9)
    args = TrainingArguments(output_dir="unused", use_cpu=True, lr_scheduler_type=kind, warmup_steps=warmup)
    state, control = TrainerState(max_steps=10**9), TrainerControl()
    first = 1
    if resume_from is not None:  # as Trainer resumes: the state from trainer_state.json, then the scheduler's
        scheduler_state, callback_state, first = resume_from
        state.global_step = first - 1
        state.stateful_callbacks = {"TrainingTimeBudget": callback_state}
        scheduler.load_state_dict(scheduler_state)
    budget.on_train_begin(args, state, control, lr_scheduler=scheduler)
    rates, stopped_at = [], None
    for step in range(first, first + steps):
        clock.now += seconds_per_step
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
        state.global_step = step
        budget.on_step_end(args, state, control)
        if control.should_training_stop:
            stopped_at = step
            break
    return rates, stopped_at, (scheduler.state_dict(), budget.state(), state.global_step + 1)


def test_linear_decay_over_the_budget_is_the_step_schedule_over_the_steps_that_fit(clock):
    """With steps of constant time, a linear schedule over a 60 s budget is transformers' linear schedule over the
    120 steps that fit, one step behind (the time is read at each step's end): it reaches zero as the time runs out,
    where the same schedule over 10**9 steps would not have moved."""
    from transformers import get_scheduler

    budget = TrainingTimeBudget(max_minutes=1.0, decay_over_budget=True)
    rates, stopped_at, _ = _scheduled_run(clock, budget, steps=1000)
    reference = get_scheduler(
        "linear", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 10, num_training_steps=120
    )
    expected = []
    for _ in range(120):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert stopped_at == 120
    assert rates[:10] == pytest.approx(expected[:10])  # warm-up, in steps
    assert rates[10:] == pytest.approx(expected[9:-1], rel=1e-6, abs=1e-12)
    assert rates[-1] < 0.01 * 1e-3


def test_inverse_sqrt_and_runs_without_decay_over_the_budget_keep_transformers_schedule(clock):
    from transformers import get_scheduler

    expected = get_scheduler(
        "inverse_sqrt", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), num_warmup_steps=10
    ).lr_lambdas[0]
    rates, _, _ = _scheduled_run(clock, TrainingTimeBudget(1.0, decay_over_budget=True), 200, kind="inverse_sqrt")
    assert rates == pytest.approx([1e-3 * expected(step) for step in range(1, 121)])
    clock.now = 1000.0
    rates, _, _ = _scheduled_run(clock, TrainingTimeBudget(1.0), 200)  # a linear schedule over its 10**9 steps
    assert rates[-1] == pytest.approx(1e-3, rel=1e-6)


def test_a_resumed_run_continues_the_budget_and_its_schedule(clock):
    """Interrupted after 30 of its 60 s and resumed from that checkpoint (trainer_state.json's stateful_callbacks and
    the scheduler's state): the same learning rates and the same last step as the uninterrupted run; and the saved
    arguments rebuild the callback, as transformers' restore_callback_states_from_checkpoint does."""
    whole, stopped_at, _ = _scheduled_run(clock, TrainingTimeBudget(1.0, decay_over_budget=True), 1000)
    clock.now = 1000.0
    first, _, checkpoint = _scheduled_run(clock, TrainingTimeBudget(1.0, decay_over_budget=True), 60)
    assert checkpoint[1]["attributes"]["seconds_before"] == pytest.approx(30.0)
    clock.now += 3600  # the time between the two runs does not count
    budget = TrainingTimeBudget(**checkpoint[1]["args"])
    second, resumed_stop, _ = _scheduled_run(clock, budget, 1000, resume_from=checkpoint)
    assert resumed_stop == stopped_at == 120
    assert first + second == pytest.approx(whole, rel=1e-9, abs=1e-15)


def test_decay_over_a_budget_needs_the_budget():
    with pytest.raises(ValueError, match="decay_over_budget needs max_minutes"):
        TrainingTimeBudget(decay_over_budget=True)


def _budget_two_processes(rank: int) -> tuple:
    """A 1-minute budget with a linear schedule over it; rank 0 steps in 0.05 s, rank 1 in 0.1 s (fake clocks), in
    `_two_processes`, whose process group this uses."""
    clock = Clock()
    callbacks.time.perf_counter = clock
    budget = TrainingTimeBudget(max_minutes=1.0, decay_over_budget=True)
    rates, stopped_at, _ = _scheduled_run(clock, budget, steps=5000, seconds_per_step=0.05 * (rank + 1))
    return stopped_at, rates


@pytest.mark.slow
def test_two_processes_with_different_clocks_use_the_same_learning_rates_and_stop_together(two_gloo_processes):
    """Each process's own clock would give each its own learning rate (and different weights under DDP): they agree
    on the slower clock, so both follow it: 600 steps of 0.1 s, not 1,200 of 0.05 s."""
    (stop0, rates0), (stop1, rates1) = two_gloo_processes["budget", 0], two_gloo_processes["budget", 1]
    assert stop0 == stop1 and 600 <= stop0 <= 640, (stop0, stop1)
    assert rates0 == rates1
    assert rates0[-1] < 0.05 * 1e-3 < 0.9 * 1e-3 < rates0[len(rates0) // 10]
