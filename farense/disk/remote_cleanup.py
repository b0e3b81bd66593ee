"""Cleanup on the object store: per remote run, the retention the disk has (last K + best), the leftovers
of crashed uploads, and stale multipart uploads; never a run whose lease is live.

    <prefix>/runs/<run>/LEASE.json                 live (a trainer renews it): the run is left alone
    <prefix>/runs/<run>/checkpoints/step-*/        committed (manifest there): keep the last K and the best
                                                   no manifest, older than the newest committed: half uploaded
                                                   QUARANTINED.json: kept for a person, never deleted
    multipart uploads older than N hours           a crashed uploader's parts: aborted (they cost storage)

The best step is read from the manifests as the disk's cleanup reads it (CheckpointStore.recorded_best):
the newest manifest's best_step, else the lowest val_loss. Planning deletes nothing; applying takes each
run's lease first (a trainer that started since planning keeps its run) and deletes manifests first
(farense.run.mirror.apply_remote_prune), so a delete cut short never leaves a committed checkpoint
missing files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from farense.errors import RunLocked
from farense.run.checkpoint import CheckpointInfo, CheckpointStore, RetentionPolicy
from farense.run.layout import MANIFEST_NAME
from farense.run.lease import LEASE_NAME, LeaseHolder, LeaseRecord, RunLease
from farense.run.mirror import RemotePrunePlan, apply_remote_prune, plan_remote_prune
from farense.run.objectstore import (
    MultipartUpload,
    ObjectInfo,
    ObjectStore,
    RemoteStoreError,
)
from farense.run.remote_layout import (
    RemoteCheckpoint,
    checkpoint_key,
    join_key,
    list_remote_checkpoints,
)

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
STALE_UPLOAD_HOURS = 24.0  # a multipart upload unfinished for a day belongs to an uploader that died
HOUR = 3600.0


@dataclass(frozen=True)
class RemoteSkip:
    """A remote run (or object) left alone, and why."""

    what: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "reason": self.reason}


@dataclass(frozen=True)
class RemoteRunPlan:
    """What the plan decided for one remote run."""

    run: str
    prefix: str
    stored_bytes: int  # everything under the run's prefix
    checkpoints: int  # committed and usable
    best_step: int | None
    prune: RemotePrunePlan  # keep, delete (beyond last K, not the best), orphans (half uploaded)
    quarantined: tuple[int, ...]

    @property
    def bytes_to_free(self) -> int:
        return self.prune.bytes_freed

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "prefix": self.prefix, "stored_bytes": self.stored_bytes,
                "checkpoints": self.checkpoints, "best_step": self.best_step, "kept_steps": list(self.prune.keep),
                "delete_steps": list(self.prune.delete), "half_uploaded_steps": list(self.prune.orphans),
                "quarantined_steps": list(self.quarantined), "bytes_to_free": self.bytes_to_free}


@dataclass
class RemoteCleanupPlan:
    """Everything a remote cleanup would delete or abort; nothing has been touched while making it."""

    location: str
    keep_last: int
    keep_best: bool
    stale_upload_hours: float
    runs: list[RemoteRunPlan] = field(default_factory=list)
    skipped: list[RemoteSkip] = field(default_factory=list)
    kept: list[RemoteSkip] = field(default_factory=list)
    stale_uploads: list[MultipartUpload] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.runs)

    @property
    def bytes_to_free(self) -> int:
        """What deleting frees (the parts of aborted multipart uploads come on top: S3 does not list their size)."""
        return sum(r.bytes_to_free for r in self.runs)

    @property
    def empty(self) -> bool:
        return not self.stale_uploads and not any(r.prune.delete or r.prune.orphans for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location,
                "policy": {"keep_last": self.keep_last, "keep_best": self.keep_best,
                           "stale_upload_hours": self.stale_upload_hours},
                "stored_bytes": self.stored_bytes, "bytes_to_free": self.bytes_to_free,
                "runs": [r.to_dict() for r in self.runs], "skipped": [s.to_dict() for s in self.skipped],
                "kept": [s.to_dict() for s in self.kept],
                "stale_uploads": [{"key": u.key, "upload_id": u.upload_id, "initiated": u.initiated}
                                  for u in self.stale_uploads]}


@dataclass
class RemoteCleanupResult:
    """What a remote cleanup did: checkpoints deleted (by key prefix), uploads aborted, runs skipped, errors."""

    bytes_freed: int = 0
    deleted: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    skipped: list[RemoteSkip] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_freed": self.bytes_freed, "deleted": list(self.deleted), "aborted": list(self.aborted),
                "skipped": [s.to_dict() for s in self.skipped], "errors": list(self.errors)}


# --------------------------------------------------------------------------- planning


def remote_runs(store: ObjectStore) -> dict[str, list[ObjectInfo]]:
    """Every run under `<prefix>/runs/`, with its objects (one LIST of the whole runs prefix)."""
    root = store.key(RUNS_DIR)
    runs: dict[str, list[ObjectInfo]] = {}
    for info in store.list(root):
        name, _, rest = info.key[len(root) + 1:].partition("/")
        if name and rest:
            runs.setdefault(name, []).append(info)
    return runs


def live_lease(store: ObjectStore, run_prefix: str, now: float) -> LeaseRecord | None:
    """The run's lease when someone holds it right now; None when there is none, or it is released or expired."""
    found = store.get(join_key(run_prefix, LEASE_NAME))
    record = LeaseRecord.from_bytes(found[0]) if found is not None else None
    return record if record is not None and record.live(now) else None


def describe_holder(record: LeaseRecord, now: float) -> str:
    h = record.holder
    return (f"host {h.host} pid {h.pid} (lease renewed {max(0.0, now - record.renewed_at):.0f} s ago, "
            f"expires in {record.expires_at - now:.0f} s)")


def remote_best(store: ObjectStore, committed: list[RemoteCheckpoint]) -> tuple[int | None, bool]:
    """(best step, known?) from the manifests, by the disk's rule: the newest one's best_step when it
    records one (one GET), else the lowest val_loss over all of them."""
    if not committed:
        return None, True
    newest = _manifest_info(store, committed[-1])
    if newest is not None and "best_step" in newest.meta:
        return CheckpointStore.recorded_best([newest])
    infos = [i for c in committed[:-1] if (i := _manifest_info(store, c)) is not None]
    infos += [newest] if newest is not None else []
    return CheckpointStore.recorded_best(infos) if infos else (None, False)


def _manifest_info(store: ObjectStore, ckpt: RemoteCheckpoint) -> CheckpointInfo | None:
    """The manifest's description (its meta is what counts here); None when it is gone or unreadable."""
    found = store.get(ckpt.key(MANIFEST_NAME))
    try:
        m = orjson.loads(found[0]) if found is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(m, dict) or not isinstance(m.get("meta"), dict):
        return None
    return CheckpointInfo(step=ckpt.step, path=Path(ckpt.prefix), meta=m["meta"], size_bytes=ckpt.size,
                          created_at=0.0)


def plan_remote_cleanup(store: ObjectStore, *, keep_last: int = 3, keep_best: bool = True,
                        stale_upload_hours: float = STALE_UPLOAD_HOURS, now: float | None = None) -> RemoteCleanupPlan:
    """What a cleanup of the store would delete and abort, and why; touches nothing. `now`: Unix seconds."""
    RetentionPolicy(keep_last=keep_last, keep_best=keep_best)  # bad values fail here, named
    if not stale_upload_hours >= 0:
        raise ValueError(f"stale_upload_hours: expected hours >= 0, got {stale_upload_hours!r}")
    now = time.time() if now is None else now
    plan = RemoteCleanupPlan(str(store.location), keep_last, keep_best, stale_upload_hours)
    live: list[str] = []
    for name, objects in sorted(remote_runs(store).items()):
        prefix = store.key(RUNS_DIR, name)
        if (holder := live_lease(store, prefix, now)) is not None:
            plan.skipped.append(RemoteSkip(prefix, f"active: lease held by {describe_holder(holder, now)}"))
            live.append(prefix + "/")
            continue
        _plan_run(store, plan, name, prefix, sum(o.size for o in objects))
    root = store.location.prefix + "/" if store.location.prefix else ""
    for upload in store.list_multipart_uploads(root):
        if now - upload.initiated <= stale_upload_hours * HOUR:
            continue
        if any(upload.key.startswith(p) for p in live):
            plan.skipped.append(RemoteSkip(upload.key, "multipart upload of a run whose lease is live"))
        else:
            plan.stale_uploads.append(upload)
    return plan


def _plan_run(store: ObjectStore, plan: RemoteCleanupPlan, name: str, prefix: str, stored: int) -> None:
    found = list_remote_checkpoints(store, prefix)
    committed = [c for c in found if c.usable]
    quarantined = tuple(c.step for c in found if c.quarantined)
    best, known = remote_best(store, committed) if plan.keep_best else (None, True)
    if not known:
        plan.kept.append(RemoteSkip(prefix, f"{len(committed)} checkpoints kept: best step unknown (no best_step "
                                            "or val_loss in the manifests)"))
        prune = RemotePrunePlan(tuple(c.step for c in committed), (), (), 0)
    else:
        prune = plan_remote_prune(store, prefix, plan.keep_last, best, keep_best=plan.keep_best)
    if quarantined:
        size = sum(c.size for c in found if c.quarantined)
        plan.kept.append(RemoteSkip(prefix, f"{len(quarantined)} quarantined checkpoint(s) ({size} bytes, steps "
                                            f"{', '.join(map(str, quarantined))}) kept: they failed verification; "
                                            "inspect, then remove by hand"))
    plan.runs.append(RemoteRunPlan(name, prefix, stored, len(committed), best, prune, quarantined))


# --------------------------------------------------------------------------- applying


def apply_remote_cleanup(store: ObjectStore, plan: RemoteCleanupPlan, *, lease_ttl_s: float = 120.0
                         ) -> RemoteCleanupResult:
    """Delete and abort what the plan lists, each run under its lease (taken now: a run whose trainer
    started since planning is skipped whole, with its uploads); errors are collected, never half-raised."""
    result = RemoteCleanupResult()
    busy: list[str] = []
    for run in plan.runs:
        if not (run.prune.delete or run.prune.orphans):
            continue
        lease = RunLease(store, join_key(run.prefix, LEASE_NAME), LeaseHolder.this_process(run.run), ttl_s=lease_ttl_s)
        try:
            lease.acquire()
        except RunLocked as exc:
            result.skipped.append(RemoteSkip(run.prefix, f"active now: {exc}"))
            busy.append(run.prefix + "/")
            continue
        except RemoteStoreError as exc:
            result.errors.append(f"{run.prefix}: cannot take the lease: {exc}")
            busy.append(run.prefix + "/")
            continue
        try:
            apply_remote_prune(store, run.prefix, run.prune)
            result.deleted += [checkpoint_key(run.prefix, s) for s in (*run.prune.delete, *run.prune.orphans)]
            result.bytes_freed += run.bytes_to_free
        except RemoteStoreError as exc:
            result.errors.append(f"{run.prefix}: {exc}")
        finally:
            lease.release()
    for upload in plan.stale_uploads:
        if any(upload.key.startswith(p) for p in busy):
            continue
        try:
            store.abort_multipart(upload)
            result.aborted.append(upload.key)
            log.info("aborted a stale multipart upload of %s", upload.key)
        except RemoteStoreError as exc:
            result.errors.append(f"abort multipart upload {upload.key}: {exc}")
    return result


# --------------------------------------------------------------------------- presentation

REMOTE_HEADERS = ["run", "stored", "checkpoints", "kept", "delete", "half uploaded", "quarantined", "frees"]


def remote_rows(plan: RemoteCleanupPlan, size: Any = str) -> list[list[str]]:
    """One row per remote run: what is stored, kept and would go (`size` formats bytes)."""
    def steps(s: tuple[int, ...]) -> str:
        return "-" if not s else (f"{len(s)} ({s[0]}..{s[-1]})" if len(s) > 2 else ", ".join(map(str, s)))

    return [[r.run, size(r.stored_bytes), str(r.checkpoints), steps(r.prune.keep), steps(r.prune.delete),
             steps(r.prune.orphans), steps(r.quarantined), size(r.bytes_to_free)] for r in plan.runs]
