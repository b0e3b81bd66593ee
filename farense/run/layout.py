"""Where a run keeps its files: one place that names every file and path, so no module guesses.

    <runs_dir>/<run_name>/
        run.lock                 fcntl.flock held by the live trainer (farense.run.locks)
        run_state.json           state (RunState), pid, step, updated_at, message
        config.json              the resolved config the run was started with
        checkpoints/
            step-00000200/       a committed checkpoint (MANIFEST.json written last)
            step-00000400.tmp-<hex>/   a write in progress (never read)
            quarantine/          checkpoints that failed verification, moved aside (never deleted for it)
                step-00000600/   as it was found
                step-00000600.reason.json   why, and when
        adapters/                best adapters: adapters.safetensors + adapter_config.json
        metrics.jsonl            one orjson line per step
        training_metrics.json    the seed's names for metrics and summary
        training_metrics.csv
        training_summary.json
        evaluation/              evaluation_report.json, evaluation_summary.csv, plots
    <production_dir>/
        releases/<release-id>/   immutable release directories
        current -> releases/<release-id>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
TMP_MARK = ".tmp-"
MANIFEST_NAME = "MANIFEST.json"
QUARANTINE_DIR = "quarantine"  # inside checkpoints/: what failed verification, kept with the reason
QUARANTINE_REASON_SUFFIX = ".reason.json"
# Files of a run directory and of each checkpoint (the checkpoint holds the first four).
ADAPTERS_FILE = "adapters.safetensors"  # mlx-lm's name: `--adapter-path` and fuse read it as is
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROGRESS_FILE = "state.json"  # a checkpoint's TrainingProgress; the name on disk is kept for checkpoints already written
BEST_RECORD_FILE = "best.json"  # adapters/best.json: the step and validation loss of the best adapters
RUN_STATE_FILE = "run_state.json"
RUN_LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
RESOLVED_CONFIG_FILE = "config.resolved.json"  # what the flow checked; the trainer child trains from it
SUMMARY_FILE = "training_summary.json"
# A directory holding any of these is a run (the trainer has started writing it).
RUN_MARKERS = (RUN_STATE_FILE, CONFIG_FILE, "checkpoints", RUN_LOCK_FILE, SUMMARY_FILE)
# Directories a run owns: never searched for other runs, never another run's.
RUN_OWN_DIRS = frozenset({"checkpoints", "adapters", "evaluation", "plots"})
_CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a committed checkpoint directory name, None for anything else."""
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def is_temporary(name: str) -> bool:
    return TMP_MARK in name


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK_FILE

    @property
    def state(self) -> Path:
        return self.root / RUN_STATE_FILE

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def quarantine(self) -> Path:
        return self.checkpoints / QUARANTINE_DIR

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def best_adapters(self) -> Path:
        return self.adapters / ADAPTERS_FILE

    @property
    def best_adapter_config(self) -> Path:
        return self.adapters / ADAPTER_CONFIG_FILE

    @property
    def best_record(self) -> Path:
        return self.adapters / BEST_RECORD_FILE

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_json(self) -> Path:
        return self.root / "training_metrics.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "training_metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclass(frozen=True)
class ProductionPaths:
    root: Path

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"
