"""What a checkpoint holds: the resumable TrainingProgress, the named keys of state.json, the checkpoint's files.

Resume is exact because everything that changes from step to step is here (step, tokens, window
losses, early stopping, best checkpoint), the optimizer state (so the learning-rate schedule's
position) is saved beside the adapters, and the data position and RNG are functions of the step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from farense.config import ExperimentConfig, fingerprint_diff
from farense.errors import CheckpointCorrupt, FingerprintMismatch
from farense.faults import fault_point
from farense.overfitting import EarlyStoppingState
from farense.run.checkpoint import CheckpointInfo
from farense.run.fsutil import read_json_object
from farense.run.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTERS_FILE,
    OPTIMIZER_FILE,
    PROGRESS_FILE,
)
from farense.train.batching import position_of
from farense.train.setup import adapter_config, library_versions

if TYPE_CHECKING:
    import mlx.nn as nn
    import mlx.optimizers as optim


PROGRESS_FORMAT = 1
CHECKPOINT_FILES = (ADAPTERS_FILE, OPTIMIZER_FILE, ADAPTER_CONFIG_FILE, PROGRESS_FILE)

# The keys of state.json (torchtune's SEED_KEY style): what resume reads, named once.
FORMAT_KEY = "format"
STEP_KEY = "step"
TOTAL_STEPS_KEY = "total_steps"
DATA_POSITION_KEY = "data_position"
RNG_KEY = "rng"
PROGRESS_KEY = "progress"
EARLY_STOPPING_KEY = "early_stopping"
FINGERPRINT_KEY = "fingerprint"
FINGERPRINT_FIELDS_KEY = "fingerprint_fields"
DATA_FINGERPRINT_KEY = "data_fingerprint"
VERSIONS_KEY = "versions"


def step_seed(seed: int, step: int) -> int:
    """The RNG seed used for optimizer step `step` (1-based)."""
    return (seed * 1_000_003 + step) % (2**63)


@dataclass
class TrainingProgress:
    """Everything that changes from step to step and must survive a restart (state.json's progress)."""

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

    @property
    def stopping(self) -> bool:
        return self.early_stopping.stopped_at is not None

    def to_json(self, config: ExperimentConfig, total_steps: int, batches_per_epoch: int, data_fp: str) -> dict[str, Any]:
        """state.json: this progress plus what resume checks (fingerprints) and what a reader wants to know."""
        t = config.training
        micro = self.step * t.grad_accumulation
        pos = position_of(micro, batches_per_epoch)
        return {
            FORMAT_KEY: PROGRESS_FORMAT,
            STEP_KEY: self.step,
            TOTAL_STEPS_KEY: total_steps,
            DATA_POSITION_KEY: {"epoch": pos.epoch, "index": pos.index, "micro_batches": micro,
                                "batches_per_epoch": batches_per_epoch},
            RNG_KEY: {"scheme": "reseed(seed * 1000003 + step) before each optimizer step", "seed": t.seed,
                      "next_step_seed": step_seed(t.seed, self.step + 1)},
            PROGRESS_KEY: {**asdict(self), EARLY_STOPPING_KEY: self.early_stopping.to_dict()},
            FINGERPRINT_KEY: config.fingerprint,
            FINGERPRINT_FIELDS_KEY: config.fingerprint_fields(),
            DATA_FINGERPRINT_KEY: data_fp,
            VERSIONS_KEY: library_versions(),
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainingProgress:
        progress = saved[PROGRESS_KEY]
        return cls(**{k: v for k, v in progress.items() if k != EARLY_STOPPING_KEY},
                   early_stopping=EarlyStoppingState.from_dict(progress[EARLY_STOPPING_KEY]))


def _numbers_problem(values: dict[str, Any], where: str) -> str | None:
    """Every progress value is a number or null (what TrainingProgress and EarlyStoppingState hold)."""
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{where}.{key} is {type(value).__name__} {value!r}, expected a number or null"
    return None


def load_saved_progress(info: CheckpointInfo) -> tuple[dict[str, Any], TrainingProgress]:
    """state.json and the TrainingProgress in it; CheckpointCorrupt (with `.reason`) when it does not parse as one."""
    def corrupt(reason: str) -> CheckpointCorrupt:
        err = CheckpointCorrupt(f"checkpoint {info.path}: {PROGRESS_FILE} {reason}")
        err.reason = f"{PROGRESS_FILE} {reason}"  # type: ignore[attr-defined]
        return err

    try:
        saved = orjson.loads(info.file(PROGRESS_FILE).read_bytes())
    except (KeyError, OSError, orjson.JSONDecodeError) as exc:
        raise corrupt(f"cannot be read as JSON: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get(PROGRESS_KEY), dict):
        raise corrupt(f"is not an object with a {PROGRESS_KEY!r} object")
    progress = dict(saved[PROGRESS_KEY])
    early = progress.pop(EARLY_STOPPING_KEY, None)
    if not isinstance(early, dict):
        raise corrupt(f"has no {PROGRESS_KEY}.{EARLY_STOPPING_KEY} object")
    problem = _numbers_problem(progress, PROGRESS_KEY) or _numbers_problem(early, f"{PROGRESS_KEY}.{EARLY_STOPPING_KEY}")
    if problem is not None:
        raise corrupt(problem)
    if progress.get("step") != info.step or saved.get(STEP_KEY) != info.step:
        raise corrupt(f"says step {saved.get(STEP_KEY)!r} / {progress.get('step')!r}, its directory {info.step}")
    try:
        return saved, TrainingProgress.from_json(saved)
    except TypeError as exc:  # unknown or missing fields
        raise corrupt(f"does not hold a training state: {exc}") from None


def saved_progress_problem(info: CheckpointInfo) -> str | None:
    """Why a verified checkpoint's state.json cannot be resumed from; None when it can (the store's check)."""
    try:
        load_saved_progress(info)
    except CheckpointCorrupt as exc:
        return getattr(exc, "reason", str(exc))
    return None


def read_saved_progress(info: CheckpointInfo) -> dict[str, Any] | None:
    """A checkpoint's state.json for readers that only look (the monitor); None if it is gone or torn."""
    return read_json_object(info.path / PROGRESS_FILE)


def checkpoint_writers(model: nn.Module, optimizer: optim.Optimizer, config: ExperimentConfig, state: dict[str, Any]
                       ) -> dict[str, Callable[[Path], None]]:
    """The files of one checkpoint, each written by a function the store calls into its temp dir."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    adapters = dict(tree_flatten(model.trainable_parameters()))
    opt_state = dict(tree_flatten(optimizer.state))

    def write_adapters(p: Path) -> None:
        mx.save_safetensors(str(p), adapters)
        fault_point("checkpoint-write", state[STEP_KEY])  # tests SIGKILL here, mid-write

    return {
        ADAPTERS_FILE: write_adapters,
        OPTIMIZER_FILE: lambda p: mx.save_safetensors(str(p), opt_state),
        ADAPTER_CONFIG_FILE: lambda p: p.write_bytes(orjson.dumps(adapter_config(config), option=orjson.OPT_INDENT_2)),
        PROGRESS_FILE: lambda p: p.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2)),
    }


def restore_checkpoint(info: CheckpointInfo, model: nn.Module, optimizer: optim.Optimizer) -> TrainingProgress:
    """Weights and optimizer state back into place; returns the saved TrainingProgress."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    _, state = load_saved_progress(info)
    model.load_weights(list(mx.load(str(info.file(ADAPTERS_FILE))).items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(info.file(OPTIMIZER_FILE))).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def check_resume_compatible(info: CheckpointInfo, config: ExperimentConfig, data_fp: str) -> None:
    """Resuming under a different training config would silently mix two runs: refuse it."""
    state, _ = load_saved_progress(info)
    if state.get(FINGERPRINT_KEY) != config.fingerprint:
        recorded = state.get(FINGERPRINT_FIELDS_KEY)
        rows = fingerprint_diff(recorded if isinstance(recorded, dict) else {}, config)
        lines = "\n".join(f"  - {k}: checkpoint has {a!r}, config has {b!r}" for k, a, b in rows)
        raise FingerprintMismatch(
            f"cannot resume {info.path}: the config's training fields differ from the checkpoint's "
            f"(fingerprint {state.get(FINGERPRINT_KEY)} != {config.fingerprint}):\n{lines}\n"
            "Restore the config, or start over with --new-run."
        )
    if state.get(DATA_FINGERPRINT_KEY) != data_fp:
        raise FingerprintMismatch(
            f"cannot resume {info.path}: the train/valid data changed since the checkpoint was written. "
            "Restore the data, or start over with --new-run."
        )
