"""Trainer callbacks that transformers lacks: a training-time budget (fairseq's `--stop-time-hours`) with a schedule
that decays over it and a progress bar in its minutes, and a checkpoint on SIGTERM, both stopping every data-parallel
process at the same step."""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

# How often the processes of a data-parallel run agree on whether to stop, in seconds of training (see AgreedSteps).
AGREE_EVERY_SECONDS = 2.0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _max_over_processes(values: list[float], device: torch.device | str) -> list[float]:
    """The element-wise maximum of `values` over all processes: one all-reduce (none with one process)."""
    if _world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()  # waits for the all-reduce (a host synchronisation on GPUs)


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """`flag` of this process, or'ed over all processes: one all-reduce of one number (a no-op with one process).

    A decision to stop must be the same on every process: processes that stop at different steps deadlock, one in
    the checkpoint's collectives and another in backward's gradient all-reduce. It is a collective: every process
    must call it at the same point (`AgreedSteps` votes the same way, at agreed step ends only). `device`: where the
    process group's backend takes tensors (CUDA for NCCL; `TrainingArguments.device`).
    """
    return bool(_max_over_processes([float(flag)], device)[0])


class AgreedSteps:
    """The step ends at which all processes of a data-parallel run vote on stopping, so that a stop request of any
    one of them (a signal, a spent time budget) stops all of them after the same step, without a collective at every
    step (on GPUs each vote waits for the step's kernels, which Trainer otherwise avoids).

    The processes vote at the first step end, at the last (`max_steps`: a request then is not left to the end's
    evaluation), and every K steps, where K is how many steps fit in `seconds` (default `AGREE_EVERY_SECONDS`, 2 s)
    at the mean step time of the slowest process since the previous vote (at least 1): each vote all-reduces, in one
    tensor, the processes' stop flags and mean step times (maximum of each), so every process gets the same numbers
    and computes the same K. A request is therefore acted on at most K steps after the step in which it came, about
    `seconds` of training plus the step under way (plus any evaluation in between).
    With one process there is no collective: `vote` returns the flag at every step end.

    Call `start` when training begins and `vote` at every step end, on every process.
    """

    def __init__(self, seconds: float | None = None) -> None:
        seconds = AGREE_EVERY_SECONDS if seconds is None else seconds
        if not seconds > 0:
            raise ValueError(f"seconds must be positive, got {seconds!r}.")
        self.seconds = seconds
        self.start()

    def start(self) -> None:
        self.every = 1  # steps from one vote to the next (K); the first vote is at the first step end
        self.steps_to_vote = 1
        self.steps_since_vote = 0
        self.last_vote = time.perf_counter()
        self.votes = 0  # collectives so far

    def vote(self, flag: bool, device: torch.device | str = "cpu", last: bool = False) -> bool:
        """Whether any process asked to stop, at an agreed step; False at the other steps. A collective at agreed
        steps: every process calls it at every step end. `last`: this is the last step (the same on every process,
        as `state.global_step >= state.max_steps`), a vote in any case."""
        agreed = self.agree([float(flag)], device, last)
        return bool(agreed and agreed[0])

    def agree(self, values: list[float], device: torch.device | str = "cpu", last: bool = False) -> list[float] | None:
        """At an agreed step, the element-wise maximum of `values` over the processes (the same list on every
        process); None at the other steps. With one process every step is agreed and `values` come back as given.
        A collective at agreed steps, as `vote`."""
        if _world_size() == 1:
            return list(values)
        self.steps_since_vote += 1
        self.steps_to_vote -= 1
        if self.steps_to_vote > 0 and not last:
            return None
        now = time.perf_counter()
        mean_step = (now - self.last_vote) / self.steps_since_vote
        *agreed, slowest = _max_over_processes([*values, mean_step], device)
        self.votes += 1
        self.every = max(1, int(self.seconds / max(slowest, 1e-9)))
        self.steps_to_vote, self.steps_since_vote, self.last_vote = self.every, 0, now
        return agreed


# transformers' schedules that decay over `num_training_steps` (TrainingArguments.lr_scheduler_type). Under a time
# budget with no step count they decay over the budget instead (`TrainingTimeBudget`); the others (inverse_sqrt,
# constant, ...) do not depend on the step count and are left as they are.
DECAYING_SCHEDULES = frozenset(
    {
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "warmup_stable_decay",
    }
)


class TrainingTimeBudget(TrainerCallback, ExportableState):
    """Stop after `max_minutes` of training time, saving a checkpoint there; stamp each log entry with the training
    time so far (`training_minutes`) and the source tokens per second of training (`source_tokens_per_second`, when
    Trainer counts them: `include_num_input_tokens_seen`), so that learning curves can be drawn against time; and,
    with `decay_over_budget`, make a decaying learning-rate schedule end at the budget.

    Training time is the wall time since training began minus the time spent in evaluations during training, so that
    a run that evaluates more often trains as long as one that evaluates less. Checkpoint saving counts as training:
    the recipe needs its checkpoints. transformers' `Trainer` has no time limit; fairseq's is `--stop-time-hours`.
    The time spent is saved in each checkpoint (`ExportableState`, in trainer_state.json): a resumed run continues the
    budget and the schedule where they were, as fairseq counts its cumulative training time.

    Schedule: a run with a time budget and no step count has no `num_training_steps` for a decaying schedule
    (`linear`, `cosine`, ...: `DECAYING_SCHEDULES`) to decay over. With `decay_over_budget`, the scheduler's function
    is evaluated after warm-up at the step that is as far into the remaining steps as the run is into its remaining
    budget (the budget left when warm-up ended), so that `linear` reaches zero as the budget runs out ("budgeted
    training", Li et al., 2020). Warm-up stays counted in steps. The schedule must be one of transformers' LambdaLR
    schedules; others (`inverse_sqrt` included, which decays by step whatever the budget) are left alone.

    Each process keeps its own clock; with several processes they agree at the steps of `AgreedSteps` (every
    `agree_every_seconds`, default 2 s) on the largest training time, so a run stops up to that much training time
    after its budget, and every process uses the same learning rate (updated at those steps).
    """

    def __init__(
        self,
        max_minutes: float | None = None,
        agree_every_seconds: float | None = None,
        decay_over_budget: bool = False,
    ) -> None:
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {max_minutes!r}.")
        if decay_over_budget and max_minutes is None:
            raise ValueError("decay_over_budget needs max_minutes: a schedule cannot decay over a budget it lacks.")
        self.max_minutes = max_minutes
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.agree_every_seconds = agree_every_seconds
        self.decay_over_budget = decay_over_budget
        self.started: float | None = None
        self.seconds_before = 0.0  # training time of the runs this one resumes
        self.in_evaluation = 0.0
        self.last_step_end: float | None = None
        self.tokens_at_start = 0
        self.agreed_seconds = 0.0  # the training time all processes agreed on at the last agreed step
        self.warmup_end_seconds: float | None = None  # the agreed training time when warm-up ended
        self.agreement = AgreedSteps(agree_every_seconds)

    def training_seconds(self, now: float | None = None) -> float:
        if self.started is None:
            return self.seconds_before
        return self.seconds_before + (time.perf_counter() if now is None else now) - self.started - self.in_evaluation

    def state(self) -> dict:
        """What a checkpoint keeps (trainer_state.json's `stateful_callbacks`): the training time so far."""
        return {
            "args": {
                "max_minutes": self.max_minutes,
                "agree_every_seconds": self.agree_every_seconds,
                "decay_over_budget": self.decay_over_budget,
            },
            "attributes": {"seconds_before": self.training_seconds(), "warmup_end_seconds": self.warmup_end_seconds},
        }

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name) if state.global_step > 0 else None
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self.seconds_before = float(attributes.get("seconds_before") or 0.0)
        self.warmup_end_seconds = attributes.get("warmup_end_seconds")
        # Trainer saves the state of each ExportableState callback under its name, but only where the state it
        # started from had that name: a checkpoint written before this callback kept its time would miss it.
        state.stateful_callbacks.setdefault(name, self.state())
        self.started = time.perf_counter()
        self.in_evaluation = 0.0
        self.last_step_end = None
        self.agreed_seconds = self.seconds_before
        self.tokens_at_start = state.num_input_tokens_seen
        self.agreement.start()
        if self.decay_over_budget:
            self._decay_over_budget(args, state, lr_scheduler)

    def _decay_over_budget(self, args, state, lr_scheduler) -> None:
        kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        lambdas = getattr(getattr(lr_scheduler, "scheduler", lr_scheduler), "lr_lambdas", None)
        if kind not in DECAYING_SCHEDULES:
            return
        if lambdas is None:
            logger.warning("The %s schedule (%s) cannot decay over the time budget.", kind, type(lr_scheduler))
            return
        total, warmup = state.max_steps, args.get_warmup_steps(state.max_steps)

        def over_budget(step_function):
            def lr_lambda(step: int) -> float:
                if step < warmup or self.warmup_end_seconds is None:
                    return step_function(step)
                left_at_warmup = max(self.max_seconds - self.warmup_end_seconds, 1e-9)
                done = min(max((self.agreed_seconds - self.warmup_end_seconds) / left_at_warmup, 0.0), 1.0)
                return step_function(warmup + done * (total - warmup))

            return lr_lambda  # a function: LambdaLR's state_dict leaves it out, and a resumed run wraps anew

        lambdas[:] = [over_budget(function) for function in lambdas]

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()
        if self.max_seconds is None:
            return control
        # Each process keeps its own clock: they agree, or a process whose clock ran out first would stop alone,
        # and the schedule would give each process its own learning rate.
        last = state.global_step >= state.max_steps
        agreed = self.agreement.agree([self.training_seconds(self.last_step_end)], args.device, last)
        if agreed is None:
            return control
        self.agreed_seconds = agreed[0]
        if self.warmup_end_seconds is None and state.global_step >= args.get_warmup_steps(state.max_steps):
            self.warmup_end_seconds = self.agreed_seconds
        if self.agreed_seconds >= self.max_seconds:
            control.should_training_stop = True
            control.should_save = True
        return control

    def tokens_per_second(self, state, now: float | None = None) -> float | None:
        """Source tokens per second of training since this run (re)started, if Trainer counts them."""
        seconds = self.training_seconds(now) - self.seconds_before
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        return tokens / seconds if tokens and seconds > 0 else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Logs are written between a step's end and any evaluation it triggers: the time at that step's end. Added
        # to `logs` too, which the reporting callbacks (TensorBoard, ...) read after this one (train.build_trainer).
        if self.started is None or not state.log_history:
            return
        now = self.last_step_end or time.perf_counter()
        stamps = {"training_minutes": round(self.training_seconds(now) / 60.0, 4)}
        rate = self.tokens_per_second(state, now)
        if rate is not None and "loss" in state.log_history[-1]:
            stamps["source_tokens_per_second"] = round(rate, 1)
        state.log_history[-1].update(stamps)
        if logs is not None:
            logs.update(stamps)

    def on_evaluate(self, args, state, control, **kwargs):
        # An evaluation during training runs right after a step's end (Trainer._maybe_log_save_evaluate).
        if self.started is not None and self.last_step_end is not None:
            now = time.perf_counter()
            self.in_evaluation += now - self.last_step_end
            self.last_step_end = now


class BudgetProgress(ProgressCallback):
    """Trainer's progress bar, measured in the minutes of a time budget instead of steps: a run that a time budget
    ends has a step count no run reaches (`train.UNTIL_TIME_IS_UP`), whose bar would predict an end thousands of
    hours away. Shows training minutes done of the budget, the step, and source tokens per second. Reads the time
    from the run's `TrainingTimeBudget`; logs and evaluation bars are Trainer's own."""

    def __init__(self, budget: TrainingTimeBudget, max_str_len: int = 100) -> None:
        super().__init__(max_str_len=max_str_len)
        if budget.max_minutes is None:
            raise ValueError("BudgetProgress needs a TrainingTimeBudget with max_minutes.")
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=self.budget.max_minutes,
                initial=round(self.budget.training_seconds() / 60.0, 2),
                unit="min",
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} training min [{elapsed}<{remaining}{postfix}]",
                dynamic_ncols=True,
            )
        self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        now = time.perf_counter()
        minutes = min(self.budget.training_seconds(now) / 60.0, self.budget.max_minutes)
        self.training_bar.n = round(minutes, 2)
        rate = self.budget.tokens_per_second(state, now)
        postfix = f"step {state.global_step}" + (f", {rate:,.0f} source tok/s" if rate else "")
        self.training_bar.set_postfix_str(postfix, refresh=False)
        self.training_bar.refresh()
        self.current_step = state.global_step


class SaveOnSignal(TrainerCallback):
    """SIGTERM or Ctrl-C during training (what schedulers, spot instances and `torchrun` send): every process stops
    at the same step, one checkpoint is saved there, and training ends without the evaluation that step was due;
    `stopped_by` then names the signal, and the caller should exit rather than evaluate (a scheduler's grace period is
    seconds, a beam search over a test set is minutes).

    A signal may reach one process only (`kill` of one worker) or all at different steps (the launcher forwards it):
    each process notes it, and the processes agree at the step ends of `AgreedSteps`: every step with one process
    (no collective), every `agree_every_seconds` of training (default 2 s) with several, so the stop comes that
    much training time after the signal at most, plus the step under way, and at the last step (`max_steps`). When
    training ends otherwise (a spent time budget) one more vote finds a signal since the last agreed step:
    `stopped_by` is set then too, with the checkpoint Trainer saved at that end. The handlers are installed for
    training only, and only from the main thread (Python's rule; elsewhere, as in a notebook's training thread or
    a Ray worker, a warning says that signals are not caught); a second Ctrl-C gets the default action (it aborts).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, agree_every_seconds: float | None = None) -> None:
        self.received: int | None = None  # the signal this process received
        self.stopped_by: str | None = None  # set on every process once they agree to stop
        self._previous: dict[int, object] = {}
        self.agreement = AgreedSteps(agree_every_seconds)

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_by = None
        self.agreement.start()
        self._previous = {}
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._request)
        except ValueError as error:  # "signal only works in main thread of the main interpreter"
            self._restore()
            logger.warning(
                "SIGTERM and Ctrl-C will not save a checkpoint: training runs outside the main thread (%s).", error
            )

    def _request(self, signum, frame) -> None:
        self.received = signum
        # Not SIGTERM: under Slurm a worker gets one from the scheduler and another from torchrun.
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def _name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal to another process"

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps  # DefaultFlowCallback ends training (and may ask to evaluate)
        if self.stopped_by is None and self.agreement.vote(self.received is not None, args.device, last):
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # runs after DefaultFlowCallback, which may have asked for one
            self.stopped_by = self._name()
            logger.warning(
                "Received %s: saving checkpoint-%d in %s and stopping. Resume with --resume_from_checkpoint.",
                self.stopped_by,
                state.global_step,
                args.output_dir,
            )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # Every process ends training after the same step: one last vote for a signal since the last agreed step.
        if self.stopped_by is None and any_process(self.received is not None, args.device):
            self.stopped_by = self._name()
            logger.warning("Received %s as training ended, after step %d.", self.stopped_by, state.global_step)
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._request:
                signal.signal(sig, handler)
        self._previous = {}
