"""The training loop, read top to bottom: one iteration is one optimizer step (nanoGPT's train.py as the model).

It receives its collaborators, as mlx-lm's `train(model, optimizer, ..., loss=, training_callback=)`
does: the set-up model and data, the resumable TrainState, the loss, the checkpoints (store, retention
and disk guard behind one object), the preemption flag, the clock and the callbacks. Exactness rests on
three choices: the data order is a pure function of (seed, epoch); the RNG is reseeded from
(seed, step) before every optimizer step, so dropout never depends on where a process started; and
validation uses no randomness.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..batching import eval_batches, position_of, train_batches
from ..config import ExperimentConfig
from ..distributed import any_rank
from ..errors import NumericalError, Preempted
from ..faults import fault_point
from ..overfitting import GapReading, classify_gap, gap_legend, observe_validation
from ..signals import PreemptionFlag
from ..runstate import RunState
from .setup import Setup
from .state import TrainState, step_seed

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim


class Checkpoints(Protocol):
    """Where the loop's checkpoints go: the store, its retention and the disk guard behind one call."""

    def due(self, state: TrainState, total_steps: int, *, preempting: bool) -> bool: ...

    def save(self, state: TrainState) -> None: ...

    def between_steps(self, state: TrainState) -> None: ...


@dataclass
class Callbacks:
    """What the loop tells the outside world; each may be left out."""

    on_step_end: Callable[[int, dict[str, Any], Any], None] | None = None  # (step, row, model): before the checkpoint
    on_row: Callable[[dict[str, Any], TrainState], None] | None = None  # the step's final row: metrics, run state, bar
    on_best: Callable[[int, float], None] | None = None  # a new best validation loss: the best adapters


def make_step(model: nn.Module, optimizer: optim.Optimizer, grad_accumulation: int, loss: Callable) -> tuple[Callable, list]:
    """One compiled micro-step over model, optimizer and RNG state, as mlx-lm's trainer has it."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_map

    loss_value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
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

    return step, state


def validation_loss(model: nn.Module, dataset: Any, groups: list, config: ExperimentConfig, loss: Callable,
                    world: mx.distributed.Group, step: int) -> float:
    """Token-weighted mean loss over the validation batches (fixed order, dropout off)."""
    import mlx.core as mx

    model.eval()
    total, ntok = mx.array(0.0), mx.array(0)
    for i, (batch, lengths) in enumerate(eval_batches(dataset, groups, config.training.max_seq_length,
                                                       rank=world.rank(), world_size=world.size(),
                                                       limit=config.validation.batches)):
        lvalue, toks = loss(model, batch, lengths)
        total, ntok = total + lvalue * toks, ntok + toks
        mx.eval(total, ntok)
        if i == 0:
            fault_point("validation", step)  # tests SIGKILL here, mid-validation
    total = mx.distributed.all_sum(total, stream=mx.cpu)
    ntok = mx.distributed.all_sum(ntok, stream=mx.cpu)
    model.train()
    return (total / ntok).item()


class TrainingLoop:
    """Optimizer steps from `state` to the plan's end or early stopping, validating and checkpointing."""

    def __init__(self, config: ExperimentConfig, setup: Setup, state: TrainState, *, world: mx.distributed.Group, loss: Callable,
                 checkpoints: Checkpoints, preemption: PreemptionFlag, clock: Callable[[], float],
                 log: Callable[[str], None], callbacks: Callbacks | None = None) -> None:
        self.config, self.setup, self.state, self.world, self.loss = config, setup, state, world, loss
        self.checkpoints, self.preemption, self.clock, self.log = checkpoints, preemption, clock, log
        self.callbacks = callbacks or Callbacks()
        t = config.training
        self.step_fn, self.compiled_state = make_step(setup.model, setup.optimizer, t.grad_accumulation, loss)
        setup.model.train()
        self.batches = train_batches(setup.train_set, setup.train_groups, seed=t.seed,
                                     start=position_of(state.step * t.grad_accumulation, len(setup.train_groups)),
                                     max_seq_length=t.max_seq_length, rank=world.rank(), world_size=world.size())

    def run(self) -> tuple[RunState, str]:
        """(COMPLETED or EARLY_STOPPED, message); raises Preempted once the step after a signal is checkpointed."""
        st, total = self.state, self.setup.total_steps
        self.log(f"validation every {self.config.validation.every_steps} steps: {gap_legend(self.config.overfitting)}")
        while st.step < total and not st.stopping:
            row = self._optimizer_step()
            self._validate_if_due(row)
            if self.callbacks.on_step_end is not None:
                self.callbacks.on_step_end(st.step, row, self.setup.model)
            # One reading of the flag decides both the checkpoint and the exit: a signal that
            # arrives later is served after the next step, never between the two.
            preempt_now = any_rank(self.preemption.poll(), self.world)  # all ranks: the same decision
            if self.checkpoints.due(st, total, preempting=preempt_now):
                started = self.clock()
                self.checkpoints.save(st)
                row["checkpoint_seconds"] = self.clock() - started
            if self.callbacks.on_row is not None:
                self.callbacks.on_row(row, st)
            if preempt_now:
                raise Preempted(f"preempted by signal {self.preemption.signal} after step {st.step}; "
                                f"checkpoint step-{st.step:08d} written, resume continues from it")
            self.checkpoints.between_steps(st)
        if not st.stopping:
            return RunState.COMPLETED, ""
        es = self.config.early_stopping
        message = (f"early stop at step {st.early_stopping.stopped_at}: no improvement larger than "
                   f"{es.min_delta} in {es.patience} validations")
        self.log(message)
        return RunState.EARLY_STOPPED, message

    def _optimizer_step(self) -> dict[str, Any]:
        """grad_accumulation compiled micro-steps, the update, and the step's metrics row."""
        import mlx.core as mx

        t, st, world_size = self.config.training, self.state, self.world.size()
        tic = self.clock()
        mx.random.seed(step_seed(t.seed, st.step + 1))
        grad, losses, ntoks = None, [], 0
        for k in range(t.grad_accumulation):
            _, (batch, lengths) = next(self.batches)
            lvalue, toks, grad = self.step_fn(batch, lengths, grad, k == t.grad_accumulation - 1)
            mx.eval(self.compiled_state, lvalue, toks, grad)
            losses.append(lvalue)
            ntoks += toks.item()
            if k == 0:
                fault_point("step", st.step + 1)  # tests SIGKILL here, mid-step
        step_loss = mx.distributed.all_sum(mx.stack(losses).mean(), stream=mx.cpu).item() / world_size
        if not math.isfinite(step_loss):
            raise NumericalError(
                f"step {st.step + 1}: the training loss is {step_loss}; nothing from this step was "
                f"checkpointed. Resume restarts from the last checkpoint; consider a lower learning rate."
            )
        st.step += 1
        st.tokens_seen += ntoks * world_size
        dt = self.clock() - tic
        st.elapsed_seconds += dt
        st.window_loss_sum += step_loss
        st.window_steps += 1
        return {
            "step": st.step,
            "epoch": position_of(st.step * t.grad_accumulation - 1, len(self.setup.train_groups)).epoch,
            "train_loss": step_loss,
            "learning_rate": self.setup.optimizer.learning_rate.item(),
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
        val = validation_loss(self.setup.model, self.setup.valid_set, self.setup.valid_groups, cfg, self.loss,
                              self.world, st.step)
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
        self.log(f"step {st.step}/{self.setup.total_steps}: {reading.describe()} {row['gap_status']}"
                 f"{' (best)' if is_best else ''}")
