"""`run_training(config)`: one training, locked, resumed, guarded and summarised (the engine is farense.train).

Reads like mlx-lm's lora.py over its tuner: every input check first, the run lock, where to start
(the newest checkpoint that verifies, never a half-written one), then farense.train's setup, loop
and finish; a stop by signal, full disk or NaN is recorded in run_state.json and raised as its
named error (resumable or not, as farense.run.outcome says).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import orjson

from farense.codes import ExitCode, RunState
from farense.config import ExperimentConfig, check_world_size, config_to_json
from farense.disk.diskguard import RunDiskGuard
from farense.errors import DiskFull, NoUsableCheckpoint, NumericalError, Preempted
from farense.model.compute import current_device
from farense.run.checkpoint import (
    CheckpointInfo,
    CheckpointStore,
    RetentionPolicy,
    SavePolicy,
)
from farense.run.fsutil import (
    atomic_write_bytes,
    fsync_dir,
    fsync_file,
    is_disk_full_error,
)
from farense.run.layout import RunPaths
from farense.run.metrics import MetricsLog
from farense.run.outcome import TrainingOutcome
from farense.run.runstate import RunRecorder
from farense.signals import PreemptionFlag
from farense.train.data import data_fingerprint
from farense.train.distributed import rank_zero_lock, share_checkpoint
from farense.train.finish import finish
from farense.train.inputs import check_experiment
from farense.train.loop import Callbacks, TrainingLoop, default_steps_ahead
from farense.train.phases import PhaseClock, seconds_since_process_start
from farense.train.progress import (
    CHECKPOINT_FILES,
    TrainingProgress,
    check_resume_compatible,
    checkpoint_writers,
    restore_checkpoint,
    saved_progress_problem,
)
from farense.train.remote import RemoteRun
from farense.train.setup import Setup, adapter_config, set_up

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

Log = Callable[[str], None]
# run_state.json's RUNNING updates between validations and checkpoints: at most this often.
RUN_STATE_INTERVAL_SECONDS = 1.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_training(
    config: ExperimentConfig,
    *,
    new_run: bool = False,
    preemption: PreemptionFlag | None = None,
    guard: RunDiskGuard | Literal[False] | None = None,
    clock: Callable[[], float] = time.monotonic,
    log: Log = _stderr,
    progress_bar: bool | None = None,
    on_step_end: Callable[[int, dict[str, Any], Any], None] | None = None,
    steps_ahead: int | None = None,
) -> TrainingOutcome:
    """Train `config` to the end, resuming from the newest verified checkpoint unless new_run.

    Raises Preempted, DiskFull (both resumable), NumericalError, or input errors (before any
    model is loaded). `guard`: None for the config's disk guard, False for none, or a guard; the
    preemption flag, the clock and `on_step_end(step, row, model)` are passed in, so tests drive them.
    `steps_ahead`: how far the device may run ahead of the bookkeeping (None: farense.train.loop.default_steps_ahead).
    """
    phases = PhaseClock(clock, since_process_start=seconds_since_process_start())
    # Everything that can be wrong with the input is found before anything heavy is loaded.
    loaded = check_experiment(config).loaded
    data_fp = data_fingerprint(config)
    paths = RunPaths(config.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)

    if guard is None:
        guard = RunDiskGuard.for_config(config, clock=clock, log=log)
    with rank_zero_lock(paths.lock, command="train"):  # only rank 0 writes, so only rank 0 locks
        return _train_locked(config, paths, loaded, data_fp, new_run=new_run,
                             preemption=preemption or PreemptionFlag(), guard=guard or None, clock=clock, log=log,
                             progress_bar=progress_bar, on_step_end=on_step_end, phases=phases,
                             steps_ahead=steps_ahead)


def _train_locked(config: ExperimentConfig, paths: RunPaths, loaded: dict, data_fp: str, *, new_run: bool,
                  preemption: PreemptionFlag, log: Log, **kwargs: Any) -> TrainingOutcome:
    """With `[storage] remote`: the run's lease first (rank 0), the uploads drained and the lease released
    however training ends (completed, preempted, disk full, failed)."""
    import mlx.core as mx

    world = mx.distributed.init()
    remote = RemoteRun.open(config, paths, log=log, preemption=preemption) if world.rank() == 0 else None
    try:
        if remote is not None:
            remote.take_lease()
        return _train(config, paths, loaded, data_fp, new_run=new_run, preemption=preemption, log=log, world=world,
                      remote=remote, **kwargs)
    finally:
        if remote is not None:
            remote.finish()


def _train(config: ExperimentConfig, paths: RunPaths, loaded: dict, data_fp: str, *, new_run: bool,
           preemption: PreemptionFlag, guard: RunDiskGuard | None, clock: Callable[[], float], log: Log,
           progress_bar: bool | None, on_step_end: Callable[[int, dict[str, Any], Any], None] | None,
           phases: PhaseClock, steps_ahead: int | None, world: mx.distributed.Group,
           remote: RemoteRun | None) -> TrainingOutcome:
    is_writer = world.rank() == 0
    store = CheckpointStore(paths.checkpoints, rank=world.rank(), required_files=CHECKPOINT_FILES,
                            on_skip=lambda p, why: log(f"skipping checkpoint {p}: {why}"))
    check_world_size(config, world.size())
    resume = _resume_point(config, paths, store, data_fp, new_run=new_run, world=world, log=log, remote=remote)
    if is_writer:
        atomic_write_bytes(paths.config, config_to_json(config))

    phases.lap("checks_and_resume_choice")
    setup = set_up(config, loaded, log, lap=phases.lap)
    state = TrainingProgress()
    if resume is not None:
        state = restore_checkpoint(resume, setup.model, setup.optimizer)
        log(f"resuming from step {state.step} ({resume.path.name})")
    resumed_from = state.step if resume is not None else None
    total = setup.total_steps

    # Metrics after the checkpoint belong to work a crash threw away.
    metrics = MetricsLog(paths.metrics_jsonl, enabled=is_writer)
    history = metrics.truncate_after(state.step, warn=log) if is_writer else []
    checkpoints = RunCheckpoints(config, setup, store, guard if is_writer else None, data_fp=data_fp,
                                 protect=[resumed_from] if resumed_from else [], clock=clock, log=log)
    recorder = RunRecorder(paths.state, total_steps=total, resumed_from=resumed_from,
                           fingerprint=config.fingerprint, enabled=is_writer, clock=clock,
                           interval=RUN_STATE_INTERVAL_SECONDS)
    if remote is not None:
        remote.attach(recorder)
    recorder.started(state.step)
    bar = _progress_bar(total, state.step, progress_bar)

    def on_row(row: dict[str, Any], st: TrainingProgress) -> None:
        metrics.append(row)
        history.append(row)
        if remote is not None and "checkpoint_seconds" in row:  # after its row: the store's history covers it
            remote.on_checkpoint(checkpoints.last_saved, st.best_checkpoint_step)
        recorder.progress(st.step, last_train_loss=row["train_loss"], last_val_loss=st.last_val_loss,
                          force="val_loss" in row or "checkpoint_seconds" in row or st.step == total)
        if bar:
            bar.advance(row["train_loss"], st.last_val_loss)

    def on_best(step: int, val: float) -> None:
        save_best_adapters(paths, setup.model, config, step, val)
        if remote is not None:
            remote.on_best_adapters()
    if steps_ahead is None:
        steps_ahead = default_steps_ahead(world.size(), current_device())
    loop = TrainingLoop(config, setup, state, world=world, loss=setup.loss, checkpoints=checkpoints,
                        preemption=preemption, clock=clock, log=log, phases=phases,
                        steps_ahead=steps_ahead,
                        callbacks=Callbacks(on_step_end=on_step_end, on_row=on_row,
                                            on_best=on_best if is_writer else None))
    try:
        with _recording_stops(paths, state, recorder):
            outcome, message = loop.run()
    finally:
        metrics.close()
        if bar:
            bar.close()
    result = finish(config, paths, state, history, total_steps=total, resumed_from=resumed_from, outcome=outcome,
                    message=message, data_fp=data_fp, recorder=recorder, log=log, phases=phases)
    if remote is not None:
        remote.on_run_files()
    return result


def _resume_point(config: ExperimentConfig, paths: RunPaths, store: CheckpointStore, data_fp: str, *,
                  new_run: bool, world: mx.distributed.Group, log: Log,
                  remote: RemoteRun | None = None) -> CheckpointInfo | None:
    """Where do we start? The newest checkpoint that verifies (rank 0's, on every rank; the store's when
    this machine is behind it); never a half-written one."""
    is_writer = world.rank() == 0
    resume = None
    if is_writer:
        if new_run:
            _start_over(paths, store)
            if remote is not None:
                remote.start_over()
        store.remove_temporaries()  # leftovers of writes killed mid-way; we hold the run lock
        if remote is not None and not new_run:
            remote.restore_if_behind()
        # Checkpoints newer than the one we resume from cannot be loaded: moved aside, never deleted.
        resume, moved = store.latest_usable(check=saved_progress_problem)
        for path in moved:
            log(f"moved unusable checkpoint to {path} (the reason is beside it)")
        if resume is None and not new_run:
            _refuse_to_start_over(paths, store)
    if world.size() > 1:  # every rank starts from rank 0's checkpoint, verified again, disks shared or not
        resume = share_checkpoint(resume, fingerprint=config.fingerprint, data_fingerprint=data_fp,
                                  required_files=CHECKPOINT_FILES, group=world)
    if resume is not None:
        check_resume_compatible(resume, config, data_fp)
    return resume


def _refuse_to_start_over(paths: RunPaths, store: CheckpointStore) -> None:
    """No checkpoint can be loaded but some were written: starting from step 0 is for --new-run to say."""
    quarantined = store.quarantined()
    if not quarantined:
        return
    reasons = "\n".join(f"  - {path.name}: {why}" for path, why in quarantined[-5:])
    error = NoUsableCheckpoint(
        f"no checkpoint of {paths.root} can be loaded; {len(quarantined)} failed verification and "
        f"{'is' if len(quarantined) == 1 else 'are'} kept in {paths.quarantine}:\n{reasons}\n"
        "Training does not start over by itself: move a checkpoint you trust back into "
        f"{paths.checkpoints}, or start over explicitly with `farense train ... --new-run`.")
    RunRecorder.refused(paths.state, str(error).splitlines()[0])
    raise error


def _start_over(paths: RunPaths, store: CheckpointStore) -> None:
    """--new-run: the old run's checkpoints (quarantined ones too), adapters and metrics go (we hold the lock)."""
    store.discard_after(None)
    store.remove_temporaries()
    shutil.rmtree(paths.quarantine, ignore_errors=True)
    shutil.rmtree(paths.adapters, ignore_errors=True)
    shutil.rmtree(paths.evaluation, ignore_errors=True)
    for p in (paths.metrics_jsonl, paths.metrics_json, paths.metrics_csv, paths.summary, paths.state):
        p.unlink(missing_ok=True)


class RunCheckpoints:
    """The loop's checkpoints: the disk guard before each write, the store's commit, retention after it."""

    def __init__(self, config: ExperimentConfig, setup: Setup, store: CheckpointStore, guard: RunDiskGuard | None,
                 *, data_fp: str, protect: list[int], clock: Callable[[], float], log: Log) -> None:
        self.config, self.setup, self.store, self.guard = config, setup, store, guard
        self.data_fp, self.protect, self.clock, self.log = data_fp, protect, clock, log
        self.policy = RetentionPolicy.from_config(config.checkpoint)
        self.save_policy = SavePolicy(config.checkpoint.every_steps)
        self.last_saved: CheckpointInfo | None = None  # the newest committed by this run (the mirror's next)

    def due(self, st: TrainingProgress, total_steps: int, *, preempting: bool) -> bool:
        return self.save_policy.due(st.step, total_steps, stopping=preempting or st.stopping)

    def save(self, st: TrainingProgress) -> None:
        """Write the checkpoint of `st` (rank 0), noting first whether it is the best so far (every rank)."""
        if SavePolicy.is_best(st.last_val_loss, st.best_checkpoint_val):
            st.best_checkpoint_step, st.best_checkpoint_val = st.step, st.last_val_loss
        if self.store.rank != 0:
            return
        if self.guard:
            self.guard.before_write(self.store, self.store.last_checkpoint_size() or 0,
                                    best_step=st.best_checkpoint_step, protect=self.protect)
        payload = st.to_json(self.config, self.setup.total_steps, len(self.setup.train_groups), self.data_fp)
        info = self.store.save(st.step, checkpoint_writers(self.setup.model, self.setup.optimizer, self.config, payload),
                               meta={"step": st.step, "fingerprint": self.config.fingerprint,
                                     "best_step": st.best_checkpoint_step, "val_loss": st.last_val_loss,
                                     "best_val_step": st.early_stopping.best_step})
        self.last_saved = info
        # Retention only after the new checkpoint committed.
        self.store.prune(self.policy, best_step=st.best_checkpoint_step, protect=self.protect)
        self.log(f"checkpoint {info.path.name} ({info.size_bytes} bytes)")

    def between_steps(self, st: TrainingProgress) -> None:
        """The disk guard's periodic look, when its interval has passed."""
        if self.guard and self.store.rank == 0 and self.guard.due(self.clock()):
            self.guard.periodic(self.store, self.store.last_checkpoint_size() or 0,
                                best_step=st.best_checkpoint_step, protect=self.protect)


@contextmanager
def _recording_stops(paths: RunPaths, st: TrainingProgress, recorder: RunRecorder) -> Iterator[None]:
    """A loop stopped by a signal, a full disk or a NaN leaves its state in run_state.json, then re-raises."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = _disk_full(e, paths.root)
        if full is None:
            raise
        recorder.stopped(RunState.PAUSED_DISK_FULL, st.step, str(full))
        raise full from e
    except (Preempted, DiskFull, NumericalError) as e:
        recorder.stopped(ExitCode(e.exit_code).state, st.step, str(e))
        raise


def _disk_full(exc: BaseException, where: Path) -> DiskFull | None:
    """A write outside the checkpoint store (best adapters, metrics, state) that failed for lack of
    space stops the run as resumable, like a checkpoint write does."""
    if not is_disk_full_error(exc, where):
        return None
    return DiskFull(f"paused: disk full while writing in {where} ({exc}); the last checkpoint is intact. "
                    "Free space and resume.")


def save_best_adapters(paths: RunPaths, model: nn.Module, config: ExperimentConfig, step: int, val_loss: float) -> None:
    """adapters/ always holds whole files: each is replaced atomically."""
    import os

    import mlx.core as mx
    from mlx.utils import tree_flatten

    paths.adapters.mkdir(parents=True, exist_ok=True)
    tmp = paths.adapters / f".best-{os.getpid()}.tmp.safetensors"  # mlx appends .safetensors otherwise
    try:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.trainable_parameters())))
        fsync_file(tmp)
        os.replace(tmp, paths.best_adapters)
        fsync_dir(paths.adapters)
    finally:
        tmp.unlink(missing_ok=True)
    if not paths.best_adapter_config.exists():
        atomic_write_bytes(paths.best_adapter_config, orjson.dumps(adapter_config(config), option=orjson.OPT_INDENT_2))
    atomic_write_bytes(paths.best_record, orjson.dumps({"step": step, "val_loss": val_loss}))


class _Bar:
    """A rich progress bar with ETA when a person watches; nothing otherwise (logs carry the steps)."""

    def __init__(self, total: int, done: int):
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), transient=False)
        self._p.start()
        self._task = self._p.add_task("train", total=total, completed=done, info="")

    def advance(self, loss: float, val: float | None) -> None:
        info = f"loss {loss:.3f}" + (f" val {val:.3f}" if val is not None else "")
        self._p.update(self._task, advance=1, info=info)

    def close(self) -> None:
        self._p.stop()


def _progress_bar(total: int, done: int, wanted: bool | None) -> _Bar | None:
    if wanted is None:
        wanted = sys.stderr.isatty()
    return _Bar(total, done) if wanted else None
