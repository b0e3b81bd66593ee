"""The training loop, read top to bottom: checks, model, resume, steps, validation, checkpoints.

Built on mlx-lm's pieces (loading, `linear_to_lora_layers`, its datasets and loss) with a step
compiled as mlx-lm compiles it. What it adds is what an overnight run needs: every checkpoint is
whole (CheckpointStore), resume is exact (weights, optimizer, step, schedule, RNG, data position,
early stopping, metrics), the disk guard runs before every write, SIGTERM checkpoints and exits.

Exactness rests on three choices: the data order is a pure function of (seed, epoch); the RNG
is reseeded from (seed, step) before every optimizer step, so dropout never depends on where a
process started; and validation uses no randomness.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import orjson

from . import __version__
from .batching import batch_groups, eval_batches, position_of, train_batches
from .checkpoint import CheckpointInfo, CheckpointStore, RetentionPolicy
from .config import ExperimentConfig, check_inputs, check_world_size, config_to_json, fingerprint_diff
from .data import count_too_long, data_fingerprint, make_datasets, validate_data
from .distributed import collective_stream, share_checkpoint
from .errors import ConfigError, DiskFull, FingerprintMismatch, NumericalError, Preempted
from .faults import fault_point
from .fsutil import atomic_write_bytes, fsync_dir, fsync_file
from .layout import RunPaths
from .metrics import MetricsLog, write_seed_files
from .overfitting import EarlyStoppingState, classify_gap, observe_validation
from .runstate import write_run_state
from .signals import PreemptionFlag
from .states import RunState

STATE_FORMAT = 1
ADAPTERS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (ADAPTERS_FILE, OPTIMIZER_FILE, ADAPTER_CONFIG_FILE, STATE_FILE)


@dataclass(frozen=True)
class TrainResult:
    """How a call to run_training ended; also written as the CLI's --result-json."""

    state: RunState
    run_dir: str
    step: int
    total_steps: int
    resumed_from: int | None
    best_step: int | None
    best_val_loss: float | None
    train_val_gap: float | None
    gap_status: str | None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d


@dataclass
class Progress:
    """Everything that changes from step to step and must survive a restart (state.json)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0
    window_loss_sum: float = 0.0  # train losses since the last validation, for the gap
    window_steps: int = 0
    last_val_loss: float | None = None
    last_gap: float | None = None
    early_stopping: EarlyStoppingState = field(default_factory=EarlyStoppingState)
    best_checkpoint_step: int | None = None
    best_checkpoint_val: float | None = None


@dataclass(frozen=True)
class _InFlight:
    """An optimizer step queued on the device whose values have not been read yet."""

    step: int
    loss: Any  # mx.array: the mean micro-batch loss, summed over ranks
    tokens: Any  # mx.array: this rank's tokens
    learning_rate: Any  # mx.array: the rate this step used
    started: float
    stop_votes: Any = None  # mx.array: ranks whose preemption flag was up when the step was queued


class PhaseClock:
    """Wall time per phase of a run (training_summary.json's "phase_seconds"): where a run's fixed
    costs go, beside its steps. `lap(name)` books the time since the previous lap to `name`."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._last = clock()
        self.seconds: dict[str, float] = {}
        self.started_at = time.time()  # wall clock, for tools that time the process from outside

    def lap(self, name: str) -> None:
        now = self._clock()
        self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._last)
        self._last = now


def _since_process_start() -> float | None:
    """Seconds from this process's start to now: the interpreter and the imports before training."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:
        return None


def step_seed(seed: int, step: int) -> int:
    """The RNG seed used for optimizer step `step` (1-based)."""
    return (seed * 1_000_003 + step) % (2**63)


def build_schedule(t: Any, total_steps: int) -> Any:
    """Linear warm-up to the peak, then constant, cosine or linear decay (mlx's schedulers)."""
    import mlx.optimizers as optim

    decay_steps = max(total_steps - t.warmup_steps, 1)
    if t.schedule == "cosine":
        main = optim.cosine_decay(t.learning_rate, decay_steps, t.min_learning_rate)
    elif t.schedule == "linear":
        main = optim.linear_schedule(t.learning_rate, t.min_learning_rate, decay_steps)
    else:
        main = t.learning_rate
    if not t.warmup_steps:
        return main
    if not callable(main):
        main = optim.linear_schedule(t.learning_rate, t.learning_rate, 1)
    warm = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optim.join_schedules([warm, main], [t.warmup_steps])


def build_optimizer(config: ExperimentConfig, total_steps: int) -> Any:
    import mlx.optimizers as optim

    t = config.training
    lr = build_schedule(t, total_steps)
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    return optim.Adam(learning_rate=lr)


def adapter_config(config: ExperimentConfig) -> dict[str, Any]:
    """adapter_config.json in mlx-lm's format, so mlx_lm.generate/fuse read our adapters as is."""
    params: dict[str, Any] = {"rank": config.lora.rank, "scale": config.lora.scale, "dropout": config.lora.dropout}
    if config.lora.keys:
        params["keys"] = list(config.lora.keys)
    return {
        "model": config.model_path,
        "fine_tune_type": config.lora.type,
        "num_layers": config.lora.num_layers,
        "lora_parameters": params,
        "max_seq_length": config.training.max_seq_length,
        "mask_prompt": config.training.mask_prompt,
        "seed": config.training.seed,
        "farense_fingerprint": config.fingerprint,
    }


def load_base_model(config: ExperimentConfig, log: Callable[[str], None] | None = None) -> tuple[Any, Any]:
    """The base model and tokenizer via mlx-lm, quantized on load when the config asks (QLoRA), then
    dequantized or cast for the device as `model.compute` decides (farense.compute)."""
    import mlx.nn as nn
    from mlx_lm.utils import load

    from .compute import apply_compute, resolve_compute
    from .gguf import resolve_model_dir

    model, tokenizer = load(resolve_model_dir(config),  # a .gguf is imported once into the workspace's cache
                            tokenizer_config={"trust_remote_code": config.model.trust_remote_code})
    if config.model.quantize_bits:
        nn.quantize(model, group_size=config.model.quantize_group_size, bits=config.model.quantize_bits)
    t = config.training
    choice = resolve_compute(model, config.model.compute, tokens_per_step=t.batch_size * t.max_seq_length)
    if log:
        from .blas import describe_blas

        log(f"{choice.describe()}; {describe_blas()}")
    model = apply_compute(model, choice)
    if choice.dequantize or choice.dtype:
        import mlx.core as mx

        # Now, not inside the first step: the packed weights are freed as each layer is done, and
        # the load's time is booked to the load.
        for layer in getattr(model, "layers", []):
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model, tokenizer


def attach_adapters(model: Any, config: ExperimentConfig) -> None:
    """Freeze the base and add LoRA/DoRA layers (initialised from the seed)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    if config.lora.num_layers > n_layers:  # check_inputs catches this first for local models
        raise ConfigError(f"lora.num_layers: requested to train {config.lora.num_layers} layers but the model "
                          f"only has {n_layers} layers (expected 1..{n_layers}, or -1 for all)", source=config.source)
    mx.random.seed(config.training.seed)
    model.freeze()
    linear_to_lora_layers(model, config.lora.num_layers, adapter_config(config)["lora_parameters"],
                          use_dora=config.lora.type == "dora")


def _library_versions() -> dict[str, str]:
    import mlx.core as mx
    import mlx_lm

    return {"farense": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "python": platform.python_version()}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_writers(model: Any, optimizer: Any, config: ExperimentConfig, state: dict[str, Any],
                       fault: str | None = None) -> dict[str, Callable[[Path], None]]:
    """The files of one checkpoint, each written by a function the store calls into its temp dir."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    adapters = dict(tree_flatten(model.trainable_parameters()))
    opt_state = dict(tree_flatten(optimizer.state))

    def write_adapters(p: Path) -> None:
        mx.save_safetensors(str(p), adapters)
        fault_point("checkpoint-write", state["step"])  # tests SIGKILL here, mid-write

    return {
        ADAPTERS_FILE: write_adapters,
        OPTIMIZER_FILE: lambda p: mx.save_safetensors(str(p), opt_state),
        ADAPTER_CONFIG_FILE: lambda p: p.write_bytes(orjson.dumps(adapter_config(config), option=orjson.OPT_INDENT_2)),
        STATE_FILE: lambda p: p.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2)),
    }


def restore_checkpoint(info: CheckpointInfo, model: Any, optimizer: Any) -> dict[str, Any]:
    """Weights and optimizer state back into place; returns state.json."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    state = orjson.loads(info.file(STATE_FILE).read_bytes())
    model.load_weights(list(mx.load(str(info.file(ADAPTERS_FILE))).items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(info.file(OPTIMIZER_FILE))).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def check_resume_compatible(info: CheckpointInfo, config: ExperimentConfig, data_fp: str) -> None:
    """Resuming under a different training config would silently mix two runs: refuse it."""
    state = orjson.loads(info.file(STATE_FILE).read_bytes())
    if state.get("fingerprint") != config.fingerprint:
        rows = fingerprint_diff(state.get("fingerprint_fields", {}), config)
        lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in rows)
        raise FingerprintMismatch(
            f"cannot resume {info.path}: the config's training fields differ from the checkpoint's "
            f"(fingerprint {state.get('fingerprint')} != {config.fingerprint}):\n{lines}\n"
            "Restore the config, or start over with --new-run."
        )
    if state.get("data_fingerprint") != data_fp:
        raise FingerprintMismatch(
            f"cannot resume {info.path}: the train/valid data changed since the checkpoint was written. "
            "Restore the data, or start over with --new-run."
        )


def save_best_adapters(paths: RunPaths, model: Any, config: ExperimentConfig, step: int, val_loss: float) -> None:
    """adapters/ always holds whole files: each is replaced atomically."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    paths.adapters.mkdir(parents=True, exist_ok=True)
    tmp = paths.adapters / f".best-{os.getpid()}.tmp.safetensors"  # mlx appends .safetensors otherwise
    try:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.trainable_parameters())))
        fsync_file(tmp)
        os.replace(tmp, paths.adapters / ADAPTERS_FILE)
        fsync_dir(paths.adapters)
    finally:
        tmp.unlink(missing_ok=True)
    cfg_path = paths.adapters / ADAPTER_CONFIG_FILE
    if not cfg_path.exists():
        atomic_write_bytes(cfg_path, orjson.dumps(adapter_config(config), option=orjson.OPT_INDENT_2))
    atomic_write_bytes(paths.adapters / "best.json", orjson.dumps({"step": step, "val_loss": val_loss}))


# --------------------------------------------------------------------------- the compiled step


def make_step(model: Any, optimizer: Any, grad_accumulation: int, loss: Callable) -> tuple[Callable, list]:
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


def validation_loss(model: Any, dataset: Any, groups: list, config: ExperimentConfig, loss: Callable,
                    world: Any, step: int) -> float:
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
    if world.size() > 1:
        total = mx.distributed.all_sum(total, group=world, stream=collective_stream())
        ntok = mx.distributed.all_sum(ntok, group=world, stream=collective_stream())
    model.train()
    return (total / ntok).item()


# --------------------------------------------------------------------------- the run


def plan_total_steps(config: ExperimentConfig, batches_per_epoch: int) -> int:
    t = config.training
    if t.iters:
        return t.iters
    return max((t.epochs * batches_per_epoch) // t.grad_accumulation, 1)


def run_training(
    config: ExperimentConfig,
    *,
    new_run: bool = False,
    preemption: PreemptionFlag | None = None,
    guard: Any = None,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    progress_bar: bool | None = None,
    on_step_end: Callable[[int, dict[str, Any], Any], None] | None = None,
) -> TrainResult:
    """Train `config` to the end, resuming from the newest verified checkpoint unless new_run.

    Raises Preempted, DiskFull (both resumable), NumericalError, or input errors (before any
    model is loaded). The disk guard (default: the config's; False for none), the preemption flag,
    the clock and `on_step_end(step, row, model)` are passed in, so tests drive them.
    """
    phases = PhaseClock(clock)
    phases.started_at = time.time()
    start_up = _since_process_start()
    if start_up is not None:
        phases.seconds["process_start_to_training"] = start_up
    # 1. Everything that can be wrong with the input is found before anything heavy is loaded.
    check_inputs(config)
    _, loaded = validate_data(config)
    data_fp = data_fingerprint(config)
    paths = RunPaths(config.run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)

    from .distributed import rank_zero_lock

    if guard is None:
        from .diskguard import RunDiskGuard

        guard = RunDiskGuard.for_config(config, clock=clock, log=log)
    with rank_zero_lock(paths.lock, command="train"):  # only rank 0 writes, so only rank 0 locks
        return _train_locked(config, paths, loaded, data_fp, new_run=new_run,
                             preemption=preemption or PreemptionFlag(), guard=guard, clock=clock, log=log,
                             progress_bar=progress_bar, on_step_end=on_step_end, phases=phases)


def _start_over(paths: RunPaths, store: CheckpointStore) -> None:
    """--new-run: the old run's checkpoints, adapters and metrics go (we hold the lock)."""
    import shutil

    store.discard_after(None)
    store.remove_temporaries()
    shutil.rmtree(paths.adapters, ignore_errors=True)
    shutil.rmtree(paths.evaluation, ignore_errors=True)
    for p in (paths.metrics_jsonl, paths.metrics_json, paths.metrics_csv, paths.summary, paths.state):
        p.unlink(missing_ok=True)


def _train_locked(config: ExperimentConfig, paths: RunPaths, loaded: dict, data_fp: str, *, new_run: bool,
                  preemption: PreemptionFlag, guard: Any, clock: Callable[[], float],
                  log: Callable[[str], None], progress_bar: bool | None,
                  on_step_end: Callable[[int, dict[str, Any], Any], None] | None,
                  phases: PhaseClock) -> TrainResult:
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    is_writer = rank == 0
    store = CheckpointStore(paths.checkpoints, rank=rank, required_files=CHECKPOINT_FILES,
                            on_skip=lambda p, why: log(f"skipping checkpoint {p}: {why}"))
    policy = RetentionPolicy(config.checkpoint.keep_last, config.checkpoint.keep_best)
    t = config.training
    check_world_size(config, world_size)

    # 2. Where do we start? The newest checkpoint that verifies; never a half-written one.
    if new_run and is_writer:
        _start_over(paths, store)
    if is_writer:
        store.remove_temporaries()  # leftovers of writes killed mid-way; we hold the run lock
    resume = None if new_run or not is_writer else store.latest_verified()
    if is_writer:
        # Checkpoints newer than the one we resume from failed verification: they go.
        for path in store.discard_after(resume.step if resume else None):
            log(f"removed unverifiable checkpoint {path.name}")
    if world_size > 1:  # every rank starts from rank 0's checkpoint, verified again, disks shared or not
        resume = share_checkpoint(resume, fingerprint=config.fingerprint, data_fingerprint=data_fp,
                                  required_files=CHECKPOINT_FILES, group=world)
    if resume is not None:
        check_resume_compatible(resume, config, data_fp)
    if is_writer:
        atomic_write_bytes(paths.config, config_to_json(config))

    # 3. The model, the data, the adapters, the optimizer.
    phases.lap("checks_and_resume_choice")
    log(f"loading {config.model_path}")
    model, tokenizer = load_base_model(config, log)
    phases.lap("model_load")
    datasets = make_datasets(config, tokenizer, loaded)
    train_set, valid_set = datasets["train"], datasets["valid"]
    too_long, longest = count_too_long(train_set, t.max_seq_length)
    if too_long:
        log(f"warning: {too_long} training examples exceed max_seq_length={t.max_seq_length} "
            f"(longest {longest} tokens) and will be truncated")
    attach_adapters(model, config)
    if t.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    train_groups = batch_groups([len(train_set[i][0]) for i in range(len(train_set))], t.batch_size)
    valid_groups = batch_groups([len(valid_set[i][0]) for i in range(len(valid_set))], t.batch_size)
    total_steps = plan_total_steps(config, len(train_groups))
    optimizer = build_optimizer(config, total_steps)
    optimizer.init(model.trainable_parameters())

    prog = Progress()
    if resume is not None:
        saved = restore_checkpoint(resume, model, optimizer)
        prog = Progress(**{k: v for k, v in saved["progress"].items() if k != "early_stopping"},
                        early_stopping=EarlyStoppingState.from_dict(saved["progress"]["early_stopping"]))
        log(f"resuming from step {prog.step} ({resume.path.name})")
    resumed_from = prog.step if resume is not None else None
    phases.lap("data_adapters_optimizer")

    # Metrics after the checkpoint belong to work a crash threw away.
    metrics = MetricsLog(paths.metrics_jsonl, enabled=is_writer)
    history = metrics.truncate_after(prog.step) if is_writer else []

    step_fn, compiled_state = make_step(model, optimizer, t.grad_accumulation, default_loss)
    model.train()
    batches = train_batches(train_set, train_groups, seed=t.seed,
                            start=position_of(prog.step * t.grad_accumulation, len(train_groups)),
                            max_seq_length=t.max_seq_length, rank=rank, world_size=world_size)

    def state_payload() -> dict[str, Any]:
        pos = position_of(prog.step * t.grad_accumulation, len(train_groups))
        return {
            "format": STATE_FORMAT,
            "step": prog.step,
            "total_steps": total_steps,
            "data_position": {"epoch": pos.epoch, "index": pos.index, "micro_batches": prog.step * t.grad_accumulation,
                              "batches_per_epoch": len(train_groups)},
            "rng": {"scheme": "reseed(seed * 1000003 + step) before each optimizer step", "seed": t.seed,
                    "next_step_seed": step_seed(t.seed, prog.step + 1)},
            "progress": {**asdict(prog), "early_stopping": prog.early_stopping.to_dict()},
            "fingerprint": config.fingerprint,
            "fingerprint_fields": config.fingerprint_fields(),
            "data_fingerprint": data_fp,
            "versions": _library_versions(),
        }

    def checkpoint() -> None:
        if not is_writer:
            return
        next_bytes = store.last_checkpoint_size() or 0
        if guard:
            guard.before_write(store, next_bytes, best_step=prog.best_checkpoint_step, protect=protect)
        info = store.save(prog.step, checkpoint_writers(model, optimizer, config, state_payload()),
                          meta={"step": prog.step, "fingerprint": config.fingerprint,
                                "best_step": prog.best_checkpoint_step, "val_loss": prog.last_val_loss,
                                "best_val_step": prog.early_stopping.best_step})
        # Retention only after the new checkpoint committed.
        store.prune(policy, best_step=prog.best_checkpoint_step, protect=protect)
        log(f"checkpoint {info.path.name} ({info.size_bytes} bytes)")

    def launch(step_no: int) -> _InFlight:
        """Queue optimizer step `step_no` on the device; nothing here waits for it."""
        started = clock()
        mx.random.seed(step_seed(t.seed, step_no))
        grad, losses, toks = None, [], []
        for k in range(t.grad_accumulation):
            _, (batch, lengths) = next(batches)
            lvalue, ntok, grad = step_fn(batch, lengths, grad, k == t.grad_accumulation - 1)
            mx.async_eval(compiled_state, lvalue, ntok, grad)
            losses.append(lvalue)
            toks.append(ntok)
            if k == 0:
                fault_point("step", step_no)  # tests SIGKILL here, mid-step
        loss = mx.stack(losses).mean()
        stop_votes = None
        if world_size > 1:
            # The ranks' preemption flags ride on the loss's all_sum, queued behind this step: a
            # collective of its own, read after the step, would wait for the next step queued on
            # the same stream (NCCL) and undo the overlap.
            both = mx.stack([loss.astype(mx.float32), mx.array(float(preemption.requested))])
            both = mx.distributed.all_sum(both, group=world, stream=collective_stream())
            loss, stop_votes = both[0], both[1]
        ntoks = sum(toks[1:], toks[0])
        lr = optimizer.learning_rate  # this step's: the next step replaces it
        mx.async_eval(loss, ntoks, lr, *([stop_votes] if stop_votes is not None else []))
        return _InFlight(step_no, loss, ntoks, lr, started, stop_votes)

    protect = [resumed_from] if resumed_from else []
    if is_writer:
        write_run_state(paths.state, RunState.RUNNING, step=prog.step, total_steps=total_steps,
                        resumed_from=resumed_from, fingerprint=config.fingerprint)
    bar = _progress_bar(total_steps, prog.step, progress_bar)
    outcome = RunState.COMPLETED
    message = ""
    try:
        # 4. The loop: one iteration is one optimizer step. The device runs ahead by one step:
        # step s+1 is queued before step s's values are read and its bookkeeping (metrics, state
        # file, hooks) is done, so that Python's work per step overlaps the device's instead of
        # adding to it. Never across a step that validates or checkpoints: those need the model
        # as it is after their own step, so exactness (invariant 2) is untouched.
        inflight = launch(prog.step + 1) if prog.step < total_steps and prog.early_stopping.stopped_at is None else None
        stop_pending = False  # a preemption agreed on while the next step was already queued
        last_done: float | None = None
        state_written = -math.inf
        while inflight is not None:
            cur = inflight
            boundary = (cur.step % config.validation.every_steps == 0 or cur.step % config.checkpoint.every_steps == 0
                        or cur.step == total_steps)
            inflight = launch(cur.step + 1) if not boundary and not stop_pending else None
            step_loss = cur.loss.item() / world_size  # waits for this step only; the next one keeps running
            ntoks = int(cur.tokens.item())
            done = clock()
            phases.lap("steps" if last_done is not None else "first_step_with_compile")
            if not math.isfinite(step_loss):
                raise NumericalError(
                    f"step {cur.step}: the training loss is {step_loss}; nothing from this step was "
                    f"checkpointed. Resume restarts from the last checkpoint; consider a lower learning rate."
                )
            # The step's time: from the end of the previous one when it was queued behind it (the
            # previous step's bookkeeping included), else from its own start.
            dt = done - (max(cur.started, last_done) if last_done is not None else cur.started)
            last_done = done
            prog.step = cur.step
            prog.tokens_seen += ntoks * world_size
            prog.elapsed_seconds += dt
            prog.window_loss_sum += step_loss
            prog.window_steps += 1
            row: dict[str, Any] = {
                "step": prog.step,
                "epoch": position_of(prog.step * t.grad_accumulation - 1, len(train_groups)).epoch,
                "train_loss": step_loss,
                "learning_rate": cur.learning_rate.item(),
                "tokens": ntoks * world_size,
                "tokens_per_second": (ntoks * world_size) / dt if dt > 0 else None,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "elapsed_seconds": prog.elapsed_seconds,
                "timestamp": time.time(),  # wall clock, for the monitor's ETA (validation and checkpoints included)
            }

            # Validation: the gap, its label, early stopping and the best adapters.
            if prog.step % config.validation.every_steps == 0 or prog.step == total_steps:
                phases.lap("steps")
                val = validation_loss(model, valid_set, valid_groups, config, default_loss, world, prog.step)
                train_window = prog.window_loss_sum / max(prog.window_steps, 1)
                gap = val - train_window
                prog.window_loss_sum, prog.window_steps = 0.0, 0
                prog.last_val_loss, prog.last_gap = val, gap
                prog.early_stopping, is_best = observe_validation(prog.early_stopping, prog.step, val,
                                                                  config.early_stopping)
                row.update(val_loss=val, train_loss_window=train_window, gap=gap,
                           gap_status=classify_gap(gap, config.overfitting).value, best=is_best,
                           patience_left=(config.early_stopping.patience - prog.early_stopping.evaluations_without_improvement
                                          if config.early_stopping.patience else None))
                if is_best and is_writer:
                    save_best_adapters(paths, model, config, prog.step, val)
                phases.lap("validation")
                log(f"step {prog.step}/{total_steps}: train {train_window:.4f} val {val:.4f} "
                    f"gap {gap:+.4f} {row['gap_status']}{' (best)' if is_best else ''}")

            if on_step_end is not None:
                on_step_end(prog.step, row, model)  # the next step may already be queued
            # One reading of the flag decides both the checkpoint and the exit: a signal that
            # arrives later is served after the next step, never between the two. When the next
            # step is already queued (every rank queues the same steps), it is that step. Several
            # ranks read the flags as they were when this step was queued, summed over all ranks
            # with its loss: every rank takes the same decision.
            requested = cur.stop_votes.item() > 0 if cur.stop_votes is not None else preemption.requested
            preempt_now = stop_pending or requested
            if preempt_now and inflight is not None:
                stop_pending, preempt_now = True, False
            due = (prog.step % config.checkpoint.every_steps == 0 or prog.step == total_steps
                   or prog.early_stopping.stopped_at is not None or preempt_now)
            if due:
                if prog.last_val_loss is not None and (prog.best_checkpoint_val is None
                                                       or prog.last_val_loss < prog.best_checkpoint_val):
                    prog.best_checkpoint_step, prog.best_checkpoint_val = prog.step, prog.last_val_loss
                phases.lap("steps")
                started = clock()
                checkpoint()
                row["checkpoint_seconds"] = clock() - started
                phases.lap("checkpoints")
            metrics.append(row)
            history.append(row)
            # run_state.json is for people and monitors: at most about once a second, and at every
            # step that validated or checkpointed, not a file replaced every few milliseconds.
            if is_writer and (boundary or due or done - state_written >= 1.0):
                state_written = done
                write_run_state(paths.state, RunState.RUNNING, durable=False, step=prog.step,
                                total_steps=total_steps,
                                resumed_from=resumed_from, fingerprint=config.fingerprint,
                                last_train_loss=step_loss, last_val_loss=prog.last_val_loss)
            if bar:
                bar.advance(step_loss, prog.last_val_loss)
            if preempt_now:
                raise Preempted(f"preempted by signal {preemption.signal} after step {prog.step}; "
                                f"checkpoint step-{prog.step:08d} written, resume continues from it")
            if guard and is_writer and guard.due(clock()):
                guard.periodic(store, store.last_checkpoint_size() or 0,
                               best_step=prog.best_checkpoint_step, protect=protect)
            if inflight is None and prog.step < total_steps and prog.early_stopping.stopped_at is None:
                inflight = launch(prog.step + 1)
            phases.lap("steps")

        if prog.early_stopping.stopped_at is not None:
            outcome = RunState.EARLY_STOPPED
            message = (f"early stop at step {prog.early_stopping.stopped_at}: no improvement larger than "
                       f"{config.early_stopping.min_delta} in {config.early_stopping.patience} validations")
            log(message)
    except (OSError, RuntimeError) as e:
        full = _disk_full(e, paths.root)
        if full is None:
            raise
        _finish_state(paths, RunState.PAUSED_DISK_FULL, prog, total_steps, resumed_from, str(full), is_writer)
        raise full from e
    except Preempted as e:
        _finish_state(paths, RunState.PREEMPTED, prog, total_steps, resumed_from, str(e), is_writer)
        raise
    except DiskFull as e:
        _finish_state(paths, RunState.PAUSED_DISK_FULL, prog, total_steps, resumed_from, str(e), is_writer)
        raise
    except NumericalError as e:
        _finish_state(paths, RunState.FAILED, prog, total_steps, resumed_from, str(e), is_writer)
        raise
    finally:
        metrics.close()
        if bar:
            bar.close()

    # 5. The end: seed-format metrics, the summary, the final state.
    es = prog.early_stopping
    best_row = next((r for r in history if r.get("step") == es.best_step and "val_loss" in r), {})
    gap_at_best = best_row.get("gap")
    summary = {
        "run_name": config.run_name,
        "config_name": config.name,
        "fingerprint": config.fingerprint,
        "data_fingerprint": data_fp,
        "state": outcome.value,
        "final_step": prog.step,
        "total_steps": total_steps,
        "best_step": es.best_step,
        "best_val_loss": es.best_val_loss,
        "train_loss_at_best": best_row.get("train_loss_window"),
        "train_val_gap": gap_at_best,
        "gap_status": classify_gap(gap_at_best, config.overfitting).value if gap_at_best is not None else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_val_loss": prog.last_val_loss,
        "final_gap": prog.last_gap,
        "early_stopped": outcome is RunState.EARLY_STOPPED,
        "early_stop_step": es.stopped_at,
        "training_time_seconds": prog.elapsed_seconds,
        "tokens_seen": prog.tokens_seen,
        "best_checkpoint_step": prog.best_checkpoint_step,
        "adapters": str(paths.adapters / ADAPTERS_FILE),
        "versions": _library_versions(),
    }
    if is_writer:
        write_seed_files(history, paths.metrics_json, paths.metrics_csv)
        phases.lap("finish_metrics_files")
        try:  # the loss curves (`farense plot RUN` redraws them); a plot never fails a finished run
            from .plots import plot_loss_curves

            plot_loss_curves(history, summary, paths.plots / "loss_curves.png")
        except Exception as e:
            log(f"warning: could not draw the loss curves in {paths.plots}: {e}")
        phases.lap("finish_plot")
        summary["phase_seconds"] = {k: round(v, 4) for k, v in phases.seconds.items()}
        summary["training_started_at"] = phases.started_at
        atomic_write_bytes(paths.summary, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        _finish_state(paths, outcome, prog, total_steps, resumed_from, message, is_writer)
    return TrainResult(outcome, str(paths.root), prog.step, total_steps, resumed_from, es.best_step,
                       es.best_val_loss, gap_at_best, summary["gap_status"], message)


def _disk_full(exc: BaseException, where: Path) -> DiskFull | None:
    """A write outside the checkpoint store (best adapters, metrics, state) that failed for lack of
    space stops the run as resumable, like a checkpoint write does."""
    from .fsutil import free_bytes, is_disk_full_error

    if not is_disk_full_error(exc):
        try:
            if free_bytes(where) >= 1 << 20:
                return None
        except OSError:
            return None
    return DiskFull(f"paused: disk full while writing in {where} ({exc}); the last checkpoint is intact. "
                    "Free space and resume.")


def _finish_state(paths: RunPaths, state: RunState, prog: Progress, total: int, resumed_from: int | None,
                  message: str, is_writer: bool) -> None:
    if not is_writer:
        return
    try:
        write_run_state(paths.state, state, step=prog.step, total_steps=total, resumed_from=resumed_from,
                        message=message)
    except OSError:
        pass  # best effort: on a full disk even this small file may not fit


class _Bar:
    """A rich progress bar with ETA when a person watches; nothing otherwise (logs carry the steps)."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
