"""The training loop, read top to bottom: one iteration is one optimizer step (nanoGPT's train.py as the model).

It receives its collaborators, as mlx-lm's `train(model, optimizer, ..., loss=, training_callback=)`
does: the set-up model and data, the resumable TrainingProgress, the loss, the checkpoints (store, retention
and disk guard behind one object), the preemption flag, the clock and the callbacks. Exactness rests on
three choices: the data order is a pure function of (seed, epoch); the RNG is reseeded from
(seed, step) before every optimizer step, so dropout never depends on where a process started; and
validation uses no randomness.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from farense.codes import RunState
from farense.config import ExperimentConfig
from farense.errors import NumericalError, Preempted
from farense.faults import barrier, fault_point
from farense.overfitting import GapReading, classify_gap, gap_legend, observe_validation
from farense.signals import PreemptionFlag
from farense.train.batching import eval_batches, position_of, train_batches
from farense.train.distributed import collective_stream
from farense.train.phases import PhaseClock
from farense.train.prefix_cache import PrefixCache, cached_eval_batches, cached_train_batches, describe_savings
from farense.train.progress import TrainingProgress, step_seed
from farense.train.setup import Setup

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim


# How many optimizer steps the device may run ahead of the bookkeeping (0: none, each step read
# before the next is queued; see TrainingLoop). On a GPU one, or two with several ranks, where
# reading a step's loss also waits for the collective (2 H100s over NCCL, 7B shape: 1.80x one GPU
# with one step ahead, 1.86x with two; one GPU the same either way). On the CPU none: MLX's CPU
# backend runs the step on the cores the bookkeeping would overlap with (2-core machine, demo model,
# alternating rounds: 0 ahead 1-7% faster than 1 in 3 of 4; README, "Benchmarks").
STEPS_AHEAD_GPU = 1
STEPS_AHEAD_GPU_SEVERAL_RANKS = 2
STEPS_AHEAD_CPU = 0


def default_steps_ahead(world_size: int, device: str) -> int:
    """How far the device runs ahead by default; `device` is "cpu" or "gpu" (farense.compute.current_device)."""
    if device == "cpu":
        return STEPS_AHEAD_CPU
    return STEPS_AHEAD_GPU if world_size == 1 else STEPS_AHEAD_GPU_SEVERAL_RANKS


class Checkpoints(Protocol):
    """Where the loop's checkpoints go: the store, its retention and the disk guard behind one call."""

    def due(self, state: TrainingProgress, total_steps: int, *, preempting: bool) -> bool: ...

    def save(self, state: TrainingProgress) -> None: ...

    def between_steps(self, state: TrainingProgress) -> None: ...


@dataclass
class Callbacks:
    """What the loop tells the outside world; each may be left out."""

    on_step_end: Callable[[int, dict[str, Any], Any], None] | None = None  # (step, row, model): before the checkpoint
    on_row: Callable[[dict[str, Any], TrainingProgress], None] | None = None  # the step's final row: metrics, run state, bar
    on_best: Callable[[int, float], None] | None = None  # a new best validation loss: the best adapters


def make_step(model: nn.Module, optimizer: optim.Optimizer, grad_accumulation: int, loss: Callable) -> tuple[Callable, list]:
    """One compiled micro-step over model, optimizer and RNG arrays, as mlx-lm's trainer has it; returns the
    step and the arrays it updates in place (MLX calls them the compiled function's state)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map

    loss_value_and_grad = nn.value_and_grad(model, loss)
    arrays = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=arrays, outputs=arrays)
    def step(batch: Any, lengths: Any, prev_grad: Any, do_update: bool) -> tuple[Any, Any, Any]:
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if grad_accumulation > 1:
                grad = tree_map(lambda x: x / grad_accumulation, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    return step, arrays


def validation_loss(model: nn.Module, dataset: Any, groups: list, config: ExperimentConfig, loss: Callable,
                    world: mx.distributed.Group, step: int, cache: PrefixCache | None = None, align: int = 0) -> float:
    """Token-weighted mean loss over the validation batches (fixed order, dropout off); `cache`: the
    validation split's prefix cache, when `loss` is the cached one (aligned as it is); `align`: make_batch's."""
    import mlx.core as mx

    model.eval()
    total, ntok = mx.array(0.0), mx.array(0)
    kw = dict(rank=world.rank(), world_size=world.size(), limit=config.validation.batches)
    msl = config.training.max_seq_length
    batches = (cached_eval_batches(cache, groups, msl, **kw) if cache is not None
               else eval_batches(dataset, groups, msl, align=align, **kw))
    for i, (batch, lengths) in enumerate(batches):
        lvalue, toks = loss(model, batch, lengths)
        total, ntok = total + lvalue * toks, ntok + toks
        mx.eval(total, ntok)
        if i == 0:
            fault_point("validation", step)  # tests SIGKILL here, mid-validation
    if world.size() > 1:
        total = mx.distributed.all_sum(total, group=world, stream=collective_stream())
        ntok = mx.distributed.all_sum(ntok, group=world, stream=collective_stream())
    model.train()
    return (total / ntok).item()


@dataclass(frozen=True)
class InFlight:
    """An optimizer step queued on the device whose values have not been read yet."""

    step: int
    loss: Any  # mx.array: the mean micro-batch loss, summed over ranks
    tokens: Any  # mx.array: this rank's tokens
    learning_rate: Any  # mx.array: the rate this step used
    queued_at: float
    stop_votes: Any = None  # mx.array: ranks whose preemption flag was up when the step was queued


class TrainingLoop:
    """Optimizer steps from `state` to the plan's end or early stopping, validating and checkpointing.

    The device runs `steps_ahead` steps ahead of the bookkeeping: steps s+1.. are queued before step
    s's values are read and its metrics, state file and hooks are done, so Python's work per step
    overlaps the device's instead of adding to it. Never across a step that validates or checkpoints
    (or the last): those need the model as it is after their own step, so exactness is untouched.
    """

    def __init__(self, config: ExperimentConfig, setup: Setup, state: TrainingProgress, *, world: mx.distributed.Group, loss: Callable,
                 checkpoints: Checkpoints, preemption: PreemptionFlag, clock: Callable[[], float],
                 log: Callable[[str], None], callbacks: Callbacks | None = None,
                 phases: PhaseClock | None = None, steps_ahead: int = STEPS_AHEAD_GPU) -> None:
        self.config, self.setup, self.state, self.world, self.loss = config, setup, state, world, loss
        self.checkpoints, self.preemption, self.clock, self.log = checkpoints, preemption, clock, log
        self.callbacks = callbacks or Callbacks()
        self.phases = phases or PhaseClock(clock)
        t = config.training
        self.step_fn, self.compiled_arrays = make_step(setup.model, setup.optimizer, t.grad_accumulation, loss)
        setup.model.train()
        kw = dict(seed=t.seed, start=position_of(state.step * t.grad_accumulation, len(setup.train_groups)),
                  max_seq_length=t.max_seq_length, rank=world.rank(), world_size=world.size())
        cache = setup.train_cache
        self.batches = (train_batches(setup.train_set, setup.train_groups, align=setup.align_tokens, **kw)
                        if cache is None else cached_train_batches(cache, setup.train_groups, **kw))
        self.steps_ahead = steps_ahead
        self._next_step = state.step + 1  # the next step to queue
        self._gate: int | None = None  # a queued step whose bookkeeping must be done before more are queued
        self._stop_after: int | None = None  # an agreed stop: the last step to run (queued before the stop)
        self._last_done: float | None = None  # when the previous step's values were read

    def run(self) -> tuple[RunState, str]:
        """(COMPLETED or EARLY_STOPPED, message); raises Preempted once the step after a signal is checkpointed."""
        st, total = self.state, self.setup.total_steps
        self.log(f"validation every {self.config.validation.every_steps} steps: {gap_legend(self.config.overfitting)}")
        queue: deque[InFlight] = deque()
        barrier("training-loop")  # tests: trainings on two workers start their steps together
        self._queue_steps(queue, 1)
        while queue:
            current = queue.popleft()
            self._queue_steps(queue, self.steps_ahead)  # the device stays busy while `current` is read and booked
            row = self._complete(current)
            self._validate_if_due(row)
            if self.callbacks.on_step_end is not None:
                self.callbacks.on_step_end(st.step, row, self.setup.model)  # later steps may be queued already
            # One reading of the flag decides both the checkpoint and the exit: a signal that arrives
            # later is served after the next step, never between the two; when later steps are already
            # queued, after the last of them. Several ranks read the flags summed with the step's loss:
            # every rank takes the same decision.
            if self._stop_after is None and self._stop_voted(current):
                self._stop_after = self._next_step - 1
            preempt_now = self._stop_after == st.step
            if self.checkpoints.due(st, total, preempting=preempt_now):
                self.phases.lap("steps")
                started = self.clock()
                self.checkpoints.save(st)
                row["checkpoint_seconds"] = self.clock() - started
                self.phases.lap("checkpoints")
            if self.callbacks.on_row is not None:
                self.callbacks.on_row(row, st)
            if preempt_now:
                raise Preempted(f"preempted by {self.preemption.cause} after step {st.step}; "
                                f"checkpoint step-{st.step:08d} written, resume continues from it")
            self.checkpoints.between_steps(st)
            self._queue_steps(queue, 1)  # after a validation or checkpoint step: the next one
            self.phases.lap("steps")
        if self.setup.train_cache is not None:
            self.log(describe_savings(self.setup.train_cache, self.setup.valid_cache))
        if not st.stopping:
            return RunState.COMPLETED, ""
        es = self.config.early_stopping
        message = (f"early stop at step {st.early_stopping.stopped_at}: no improvement larger than "
                   f"{es.min_delta} in {es.patience} validations")
        self.log(message)
        return RunState.EARLY_STOPPED, message

    def _queue_steps(self, queue: deque[InFlight], depth: int) -> None:
        """Queue the next steps until `depth` are in flight; never past a step whose bookkeeping must
        come first (validation, checkpoint: `_gate`), the plan's end, early stopping or an agreed stop."""
        st = self.state
        while (len(queue) < depth and self._next_step <= self.setup.total_steps and not st.stopping
               and self._stop_after is None and (self._gate is None or st.step >= self._gate)):
            queue.append(self._launch(self._next_step))
            if self._boundary(self._next_step):
                self._gate = self._next_step
            self._next_step += 1

    def _boundary(self, step: int) -> bool:
        """A step after which the model is read as it is (validation, checkpoint) or the run ends."""
        return (step % self.config.validation.every_steps == 0 or step % self.config.checkpoint.every_steps == 0
                or step >= self.setup.total_steps)

    def _launch(self, step: int) -> InFlight:
        """Queue optimizer step `step` (grad_accumulation compiled micro-steps and the update); nothing waits."""
        import mlx.core as mx

        t = self.config.training
        queued_at = self.clock()
        mx.random.seed(step_seed(t.seed, step))
        grad, losses, tokens = None, [], []
        for k in range(t.grad_accumulation):
            _, (batch, lengths) = next(self.batches)
            lvalue, toks, grad = self.step_fn(batch, lengths, grad, k == t.grad_accumulation - 1)
            mx.async_eval(self.compiled_arrays, lvalue, toks, grad)
            losses.append(lvalue)
            tokens.append(toks)
            if k == 0:
                fault_point("step", step)  # tests SIGKILL here, mid-step
        # One micro-step (the usual case): its loss and tokens are already queued with the step.
        loss, ntokens = losses[0], tokens[0]
        if len(losses) > 1:
            loss, ntokens = mx.stack(losses).mean(), sum(tokens[1:], tokens[0])
        stop_votes = None
        if self.world.size() > 1:
            # The ranks' preemption flags ride on the loss's all_sum, queued behind this step: a
            # collective of its own, read after the step, would wait for the next step queued on the
            # same stream (NCCL) and undo the overlap.
            both = mx.stack([loss.astype(mx.float32), mx.array(float(self.preemption.poll()))])
            both = mx.distributed.all_sum(both, group=self.world, stream=collective_stream())
            loss, stop_votes = both[0], both[1]
        learning_rate = self.setup.optimizer.learning_rate  # this step's (in the optimizer state queued above)
        if len(losses) > 1 or stop_votes is not None:  # new arrays: queue them too (each call costs host time)
            mx.async_eval(loss, ntokens, *([stop_votes] if stop_votes is not None else []))
        return InFlight(step, loss, ntokens, learning_rate, queued_at, stop_votes)

    def _stop_voted(self, step: InFlight) -> bool:
        if step.stop_votes is not None:
            return step.stop_votes.item() > 0
        return self.preemption.poll()

    def _complete(self, step: InFlight) -> dict[str, Any]:
        """Wait for `step` (only: a queued next step keeps running), check its loss, book it, its metrics row."""
        import mlx.core as mx

        t, st, world_size = self.config.training, self.state, self.world.size()
        step_loss = step.loss.item() / world_size
        ntoks = int(step.tokens.item())
        done = self.clock()
        self.phases.lap("steps" if self._last_done is not None else "first_step_with_compile")
        if not math.isfinite(step_loss):
            raise NumericalError(
                f"step {step.step}: the training loss is {step_loss}; nothing from this step was "
                f"checkpointed. Resume restarts from the last checkpoint; consider a lower learning rate."
            )
        # The step's time: from the end of the previous one when it was queued behind it (that
        # step's bookkeeping included), else from its own start.
        dt = done - (max(step.queued_at, self._last_done) if self._last_done is not None else step.queued_at)
        self._last_done = done
        st.step = step.step
        st.tokens_seen += ntoks * world_size
        st.elapsed_seconds += dt
        st.window_loss_sum += step_loss
        st.window_steps += 1
        return {
            "step": st.step,
            "epoch": position_of(st.step * t.grad_accumulation - 1, len(self.setup.train_groups)).epoch,
            "train_loss": step_loss,
            "learning_rate": step.learning_rate.item(),
            "tokens": ntoks * world_size,
            "tokens_per_second": (ntoks * world_size) / dt if dt > 0 else None,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "elapsed_seconds": st.elapsed_seconds,
            "timestamp": time.time(),  # wall clock, for the monitor's ETA (validation and checkpoints included)
        }

    def _validate_if_due(self, row: dict[str, Any]) -> None:
        """Validation: the gap, its label, early stopping and the best adapters."""
        cfg, st = self.config, self.state
        if st.step % cfg.validation.every_steps != 0 and st.step != self.setup.total_steps:
            return
        self.phases.lap("steps")
        val = validation_loss(self.setup.model, self.setup.valid_set, self.setup.valid_groups, cfg, self.loss,
                              self.world, st.step, self.setup.valid_cache, self.setup.align_tokens)
        reading = GapReading(val, st.window_loss_sum / max(st.window_steps, 1), st.window_steps)
        st.window_loss_sum, st.window_steps = 0.0, 0
        st.last_val_loss, st.last_gap = val, reading.gap
        st.early_stopping, is_best = observe_validation(st.early_stopping, st.step, val, cfg.early_stopping)
        patience = cfg.early_stopping.patience
        row.update(val_loss=val, train_loss_window=reading.train_loss, train_loss_window_steps=reading.train_steps,
                   gap=reading.gap, gap_status=classify_gap(reading.gap, cfg.overfitting).value, best=is_best,
                   patience_left=(patience - st.early_stopping.evaluations_without_improvement if patience else None))
        if is_best and self.callbacks.on_best is not None:
            self.callbacks.on_best(st.step, val)
        self.phases.lap("validation")
        self.log(f"step {st.step}/{self.setup.total_steps}: {reading.describe()} {row['gap_status']}"
                 f"{' (best)' if is_best else ''}")
