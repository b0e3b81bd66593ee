"""Real checkpoints for the object-store tests, written by farense's own CheckpointStore (the real format)."""

from __future__ import annotations

import os
from pathlib import Path

from farense.run.checkpoint import CheckpointInfo, CheckpointStore


def save_checkpoint(directory: Path, step: int, *, size: int = 4096, val_loss: float | None = None) -> CheckpointInfo:
    """A committed checkpoint with adapter-, optimizer- and state-like files of random content."""
    store = CheckpointStore(directory)
    writers = {
        "adapters.safetensors": lambda p: p.write_bytes(os.urandom(size)),
        "optimizer.safetensors": lambda p: p.write_bytes(os.urandom(size * 2)),
        "state.json": lambda p: p.write_bytes(b'{"step": %d}' % step),
    }
    info = store.save(step, writers, {"val_loss": val_loss if val_loss is not None else 1.0 / step})
    assert info is not None
    return info


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative name: to compare two checkpoints byte for byte."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
