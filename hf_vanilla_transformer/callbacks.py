"""Trainer callbacks that transformers lacks: a training-time budget (fairseq's `--stop-time-hours`) and a
checkpoint on SIGTERM, both stopping every data-parallel process at the same step."""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """`flag` of this process, or'ed over all processes: one all-reduce of one number (a no-op with one process).

    A decision to stop must be the same on every process: processes that stop at different steps deadlock, one in
    the checkpoint's collectives and another in backward's gradient all-reduce. Every process calls this at every
    step end; the cost is in benchmarks/README.md ("Stopping together"). `device`: where the process group's backend
    takes tensors (CUDA for NCCL; `TrainingArguments.device`).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    vote = torch.tensor([int(flag)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


class TrainingTimeBudget(TrainerCallback):
    """Stop after `max_minutes` of training time, saving a checkpoint there, and stamp each log entry with the
    training time so far (`training_minutes`), so that learning curves can be drawn against time.

    Training time is the wall time since training began minus the time spent in evaluations during training, so that
    a run that evaluates more often trains as long as one that evaluates less. Checkpoint saving counts as training:
    the recipe needs its checkpoints. transformers' `Trainer` has no time limit; fairseq's is `--stop-time-hours`.
    """

    def __init__(self, max_minutes: float | None = None) -> None:
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {max_minutes!r}.")
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.started: float | None = None
        self.in_evaluation = 0.0
        self.last_step_end: float | None = None

    def training_seconds(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (time.perf_counter() if now is None else now) - self.started - self.in_evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.in_evaluation = 0.0
        self.last_step_end = None

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()
        if self.max_seconds is None:
            return control
        # Each process keeps its own clock: they agree, or a process whose clock ran out first would stop alone.
        if any_process(self.training_seconds(self.last_step_end) >= self.max_seconds, args.device):
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Logs are written between a step's end and any evaluation it triggers: the time at that step's end.
        if self.started is not None and state.log_history:
            seconds = self.training_seconds(self.last_step_end or time.perf_counter())
            state.log_history[-1]["training_minutes"] = round(seconds / 60.0, 4)

    def on_evaluate(self, args, state, control, **kwargs):
        # An evaluation during training runs right after a step's end (Trainer._maybe_log_save_evaluate).
        if self.started is not None and self.last_step_end is not None:
            now = time.perf_counter()
            self.in_evaluation += now - self.last_step_end
            self.last_step_end = now


class SaveOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C during training (what schedulers, spot instances and `torchrun` send): every process stops
    at the same step, one checkpoint is saved there, and training ends without the evaluation that step was due;
    `stopped_by` then names the signal, and the caller should exit rather than evaluate (a scheduler's grace period is
    seconds, a beam search over a test set is minutes).

    A signal may reach one process only (`kill` of one worker) or all at different steps (the launcher forwards it):
    each process notes it, and at every step end the processes agree through `any_process`. The handlers are
    installed for training only; a second Ctrl-C gets the default action (it aborts).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process received
        self.stopped_by: str | None = None  # set on every process once they agree to stop
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_by = None
        self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}

    def _request(self, signum, frame) -> None:
        self.received = signum
        # Not SIGTERM: under Slurm a worker gets one from the scheduler and another from torchrun.
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.received is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # runs after DefaultFlowCallback, which may have asked for one
            here = signal.Signals(self.received).name if self.received is not None else None
            self.stopped_by = here or "a signal to another process"
            logger.warning(
                "Received %s: saving checkpoint-%d in %s and stopping. Resume with --resume_from_checkpoint.",
                self.stopped_by,
                state.global_step,
                args.output_dir,
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._request:
                signal.signal(sig, handler)
        self._previous = {}
