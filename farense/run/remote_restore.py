"""Resume on any machine: bring the newest remote checkpoint that verifies into the local checkpoints
directory, by the same commit protocol as a local save.

    checkpoints/step-00000400.tmp-<hex>/   files streamed in, each hashed on the way and fsynced
        ...                                sizes and SHA-256 checked against the remote manifest
        MANIFEST.json                      written LAST, the directory fsynced
    checkpoints/step-00000400/             os.rename, then the parent fsynced (farense.fsutil.commit_dir)

A remote checkpoint that does not verify gets a QUARANTINED.json marker beside its files (never
deleted: a person may want it) and the next older one is tried. Network failures are not a verdict
on the checkpoint: they propagate (RemoteUnavailable) and nothing is quarantined for them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from farense.run import fsutil
from farense.run.checkpoint import CheckpointStore, Verify, read_manifest
from farense.errors import CheckpointCorrupt
from farense.run.layout import MANIFEST_NAME, checkpoint_name
from farense.run.objectstore import (
    ObjectStore,
    PreconditionFailed,
    RemoteStoreError,
    RemoteUnavailable,
)
from farense.run.remote_layout import (
    QUARANTINE_MARKER,
    RemoteCheckpoint,
    list_remote_checkpoints,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestorePlan:
    """What a restore would do: the local checkpoint to beat and the remote ones newer than it, newest first."""

    local_step: int | None  # the newest local checkpoint that verifies
    candidates: tuple[RemoteCheckpoint, ...]

    @property
    def download_bytes(self) -> int:
        """Disk a restore needs at most (one candidate at a time: a failed one is removed before the next)."""
        return max((c.size for c in self.candidates), default=0)


@dataclass(frozen=True)
class RestoreResult:
    """A checkpoint brought from the store and committed locally."""

    step: int
    path: Path
    bytes: int
    seconds: float
    quarantined: tuple[int, ...]  # newer remote checkpoints that failed verification on the way


class _Broken(Exception):
    """This remote checkpoint does not verify (the reason): quarantine it remotely, try the next."""


def plan_restore(store: ObjectStore, run_prefix: str, local_checkpoints_dir: Path, *,
                 required_files: Iterable[str] = ()) -> RestorePlan:
    """The remote checkpoints newer than the newest local one that verifies: none means nothing to download."""
    local = CheckpointStore(local_checkpoints_dir, required_files=required_files).latest_verified()
    local_step = local.step if local is not None else None
    usable = [c for c in list_remote_checkpoints(store, run_prefix) if c.usable]
    newer = [c for c in reversed(usable) if local_step is None or c.step > local_step]
    return RestorePlan(local_step, tuple(newer))


def restore_latest(store: ObjectStore, run_prefix: str, local_checkpoints_dir: Path, *,
                   required_files: Iterable[str] = (), now: Callable[[], float] = time.time,
                   monotonic: Callable[[], float] = time.monotonic) -> RestoreResult | None:
    """Restore the newest remote checkpoint that verifies and is newer than every local one; None when
    there is none (the local one is newer or equal, or no remote one verifies). Broken ones are quarantined."""
    required = tuple(required_files)
    local_dir = Path(local_checkpoints_dir)
    plan = plan_restore(store, run_prefix, local_dir, required_files=required)
    quarantined: list[int] = []
    for ckpt in plan.candidates:
        start = monotonic()
        try:
            size = _restore_one(store, ckpt, local_dir, required)
        except _Broken as broken:
            quarantine_remote(store, ckpt, str(broken), now=now)
            quarantined.append(ckpt.step)
            continue
        if size is None:
            continue
        seconds = monotonic() - start
        log.info("restored checkpoint step %d from %s (%d bytes in %.1f s)", ckpt.step, ckpt.prefix, size, seconds)
        return RestoreResult(ckpt.step, local_dir / checkpoint_name(ckpt.step), size, seconds, tuple(quarantined))
    if plan.candidates:
        log.warning("no remote checkpoint newer than local step %s verifies; quarantined: %s", plan.local_step,
                    quarantined)
    return None


def _restore_one(store: ObjectStore, ckpt: RemoteCheckpoint, local_dir: Path, required: tuple[str, ...]) -> int | None:
    """Download, verify and commit one checkpoint; its bytes, or None when it vanished (pruned meanwhile)."""
    found = store.get(ckpt.key(MANIFEST_NAME))
    if found is None:
        log.info("remote checkpoint %s vanished while restoring (pruned); trying an older one", ckpt.prefix)
        return None
    manifest_bytes = found[0]
    manifest = _checked_manifest(manifest_bytes, local_dir, ckpt.step)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for name in required:
        if name not in files:
            raise _Broken(f"required file {name} not in manifest")
    final = local_dir / checkpoint_name(ckpt.step)
    local = CheckpointStore(local_dir, required_files=required)
    with fsutil.staged_dir(final) as tmp:
        for name, entry in sorted(files.items()):
            _download_verified(store, ckpt.key(name), tmp / name, name, entry)

        def check_sizes() -> None:  # the real reader's check, on the finished directory, before the rename
            ok, reason = local.verify_path(tmp, Verify.SIZES)
            if not ok:
                raise _Broken(reason)

        if final.exists():  # a local copy that did not verify (else it would have won): kept aside, not deleted
            local.quarantine(final, "replaced by a verified copy restored from the object store")
        fsutil.commit_dir(tmp, final, synced=True, before_rename=check_sizes,
                          manifest=lambda d: fsutil.write_new_file(d / MANIFEST_NAME, manifest_bytes))
    return sum(entry["size"] for entry in files.values()) + len(manifest_bytes)


def _download_verified(store: ObjectStore, key: str, target: Path, name: str, entry: dict[str, Any]) -> None:
    try:
        got = store.download_file(key, target)
    except RemoteUnavailable:
        raise  # the network, not the checkpoint
    except RemoteStoreError as exc:
        raise _Broken(f"file {name} unreadable on the store: {exc}") from exc
    if got.size != entry["size"]:
        raise _Broken(f"{name}: size {got.size} != manifest {entry['size']}")
    if got.sha256 != entry["sha256"]:
        raise _Broken(f"sha256 mismatch in {name}")


def _checked_manifest(data: bytes, local_dir: Path, step: int) -> dict[str, Any]:
    """The remote manifest, checked by the local reader (farense.checkpoint.read_manifest) before any
    file is downloaded: a bad file name (`../x`) never reaches the disk."""
    with fsutil.staged_dir(local_dir / f"{checkpoint_name(step)}-manifest") as scratch:
        (scratch / MANIFEST_NAME).write_bytes(data)
        try:
            manifest = read_manifest(scratch)
        except CheckpointCorrupt as exc:
            raise _Broken(getattr(exc, "reason", str(exc))) from exc
    if manifest["step"] != step:
        raise _Broken(f"manifest step {manifest['step']} != directory step {step}")
    return manifest


def quarantine_remote(store: ObjectStore, ckpt: RemoteCheckpoint, reason: str, *,
                      now: Callable[[], float] = time.time) -> None:
    """Mark a remote checkpoint as never to be loaded (QUARANTINED.json beside its files); nothing is deleted."""
    t = now()
    record = {"checkpoint": ckpt.prefix, "step": ckpt.step, "reason": reason, "quarantined_at": t,
              "quarantined_at_utc": datetime.fromtimestamp(t, timezone.utc).isoformat(), "by_host": socket.gethostname()}
    try:
        store.put_if_absent(ckpt.key(QUARANTINE_MARKER), orjson.dumps(record, option=orjson.OPT_INDENT_2))
    except PreconditionFailed:
        pass  # another machine quarantined it first: its reason stands
    log.warning("remote checkpoint %s does not verify (%s): quarantined with %s", ckpt.prefix, reason,
                QUARANTINE_MARKER)
