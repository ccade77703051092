"""Trainer callbacks that transformers lacks: a training-time budget (fairseq's `--stop-time-hours`)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


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
        if self.max_seconds is not None and self.training_seconds(self.last_step_end) >= self.max_seconds:
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
