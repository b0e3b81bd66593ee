"""The run mirrored to the object store in the background: a training step never waits for the network.

One worker thread takes jobs from a bounded queue. A checkpoint is uploaded file by file and its
MANIFEST.json LAST with If-None-Match (the commit marker), so a reader never sees a remote
checkpoint without all its files. When checkpoints come faster than they upload, the oldest queued
one is dropped (the newest wins) and the log says which. Run files (run_state.json, metrics, summary,
adapters) are coalesced by name: only their newest content matters. Transient failures are retried
with exponential backoff (tenacity); a failure is logged and counted, never raised into training.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from farense.run.checkpoint import RetentionPolicy, read_manifest
from farense.run.layout import MANIFEST_NAME, parse_checkpoint_name
from farense.run.objectstore import ObjectStore, PreconditionFailed, RemoteStoreError
from farense.run.remote_layout import checkpoint_key, join_key, list_remote_checkpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrySettings:
    """How long one object's upload is retried: exponential backoff, bounded by attempts and seconds."""

    attempts: int = 8
    initial_s: float = 0.5
    max_wait_s: float = 30.0
    deadline_s: float = 600.0


@dataclass(frozen=True)
class MirrorStatus:
    """What the mirror has done: the newest checkpoint safe remotely and the queue's counts."""

    last_safe_remote_step: int | None  # its manifest is on the store: a resume anywhere can start there
    pending: int  # jobs queued or in progress
    uploading: str | None  # what is being uploaded right now
    skipped: int  # checkpoints dropped from a full queue (a newer one replaced them) or pruned before upload
    failed: int  # jobs given up after retries
    uploaded_checkpoints: int
    uploaded_files: int
    last_error: str | None


@dataclass(frozen=True)
class RemotePrunePlan:
    """What remote retention keeps and deletes (a dry run shows it without deleting)."""

    keep: tuple[int, ...]
    delete: tuple[int, ...]  # committed checkpoints beyond keep-last-K, not the best
    orphans: tuple[int, ...]  # interrupted uploads (no manifest), older than the newest committed
    bytes_freed: int


@dataclass(frozen=True)
class _Job:
    kind: str  # "checkpoint", "file", "prune"
    name: str  # the checkpoint path, the run file's relative name, or "prune"
    path: Path | None = None
    step: int | None = None
    args: tuple[Any, ...] = ()


class _Abandoned(Exception):
    """close() gave up waiting: the job stops between two objects (never leaving a manifest behind)."""


class RunMirror:
    """Mirrors one run to `store` under `run_prefix` (a whole key prefix: `store.key("runs", name)`).

    `before_put(key)` is called before every object is written (a fault hook for tests: raising there
    interrupts the job as a crash would). `sleep` is tenacity's, so tests need not wait out backoffs.
    """

    def __init__(self, store: ObjectStore, run_prefix: str, *, max_pending_checkpoints: int = 2,
                 retry: RetrySettings = RetrySettings(), sleep: Callable[[float], None] = time.sleep,
                 before_put: Callable[[str], None] | None = None, start: bool = True) -> None:
        if max_pending_checkpoints < 1:
            raise ValueError(f"max_pending_checkpoints: expected >= 1, got {max_pending_checkpoints!r}")
        self.store, self.run_prefix = store, run_prefix
        self.max_pending_checkpoints = max_pending_checkpoints
        self._retry, self._sleep, self._before_put = retry, sleep, before_put
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._busy: _Job | None = None
        self._closing = self._abandon = False
        self._last_safe: int | None = None
        self._skipped = self._failed = self._ckpts = self._files = 0
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._work, name="farense-mirror", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker (once; `start=False` lets a caller queue first, e.g. to see the queue's rule)."""
        if not self._thread.is_alive() and not self._closing:
            self._thread.start()

    # ------------------------------------------------------------------ the trainer's side (never blocks)

    def submit_checkpoint(self, path: str | Path) -> None:
        """Queue a committed checkpoint directory; with the queue full, the oldest queued one is dropped."""
        job = _Job("checkpoint", str(path), Path(path))
        with self._cond:
            queued = [j for j in self._queue if j.kind == "checkpoint"]
            if len(queued) >= self.max_pending_checkpoints:
                dropped = queued[0]
                self._queue.remove(dropped)
                self._skipped += 1
                log.warning("remote mirror: not uploading %s (%d checkpoints already waiting; %s is newer)",
                            dropped.path.name if dropped.path else dropped.name, len(queued), job.path.name)
            self._queue.append(job)
            self._cond.notify_all()

    def submit_file(self, relative_name: str, path: str | Path) -> None:
        """Queue a run file (e.g. "run_state.json", "adapters/adapters.safetensors"); a queued older
        submission of the same name is replaced, since only the newest content matters."""
        self.store.location.key(relative_name)  # a bad name fails here, in the caller, not in the worker
        job = _Job("file", relative_name, Path(path))
        with self._cond:
            for i, queued in enumerate(self._queue):
                if queued.kind == "file" and queued.name == relative_name:
                    self._queue[i] = job
                    return
            self._queue.append(job)
            self._cond.notify_all()

    def submit_prune(self, keep_last: int, best_step: int | None, *, keep_best: bool = True) -> None:
        """Queue remote retention after the uploads before it (run by the worker, so it never races them)."""
        RetentionPolicy(keep_last=keep_last, keep_best=keep_best)  # invalid values fail in the caller
        with self._cond:
            self._queue = deque(j for j in self._queue if j.kind != "prune")
            self._queue.append(_Job("prune", "prune", args=(keep_last, best_step, keep_best)))
            self._cond.notify_all()

    def status(self) -> MirrorStatus:
        with self._cond:
            return MirrorStatus(self._last_safe, len(self._queue) + (self._busy is not None),
                                self._busy.name if self._busy else None, self._skipped, self._failed,
                                self._ckpts, self._files, self._last_error)

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued is uploaded (or given up); False when `timeout_s` ran out first."""
        start = time.monotonic()
        with self._cond:
            done = self._cond.wait_for(lambda: not self._queue and self._busy is None, timeout=timeout_s)
            left = len(self._queue) + (self._busy is not None)
        waited = time.monotonic() - start
        if done:
            log.info("remote mirror drained in %.1f s (last checkpoint safe remotely: step %s)", waited,
                     self._last_safe)
        else:
            log.warning("remote mirror not drained after %.1f s: %d uploads left (last checkpoint safe "
                        "remotely: step %s)", waited, left, self._last_safe)
        return done

    def close(self, timeout_s: float = 60.0) -> bool:
        """Drain (at most `timeout_s`), then stop the worker; what is left is abandoned between objects."""
        drained = self.drain(timeout_s) if self._thread.is_alive() else not self._queue
        with self._cond:
            self._closing = True
            self._abandon = not drained
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, timeout_s / 10))
        return drained

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue or self._abandon:
                    if self._queue:
                        log.warning("remote mirror closed with %d uploads not done: %s", len(self._queue),
                                    ", ".join(j.name for j in self._queue))
                    return
                job = self._busy = self._queue.popleft()
            try:
                self._run(job)
            except _Abandoned:
                log.warning("remote mirror: upload of %s abandoned at close (its manifest was not written)", job.name)
            except Exception as exc:  # noqa: BLE001  never into training: logged, counted, the next job goes on
                with self._cond:
                    self._failed += 1
                    self._last_error = f"{job.name}: {exc}"
                log.error("remote mirror: gave up on %s: %s", job.name, exc)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _run(self, job: _Job) -> None:
        if job.kind == "checkpoint":
            assert job.path is not None
            self._upload_checkpoint(job.path)
        elif job.kind == "file":
            assert job.path is not None
            self._upload_run_file(job.name, job.path)
        else:
            self.prune_remote(*job.args[:2], keep_best=job.args[2])

    def _upload_checkpoint(self, path: Path) -> None:
        try:
            manifest_bytes = (path / MANIFEST_NAME).read_bytes()
            manifest = read_manifest(path)
        except (FileNotFoundError, NotADirectoryError):
            return self._pruned_before_upload(path)
        step: int = manifest["step"]
        manifest_key = checkpoint_key(self.run_prefix, step, MANIFEST_NAME)
        if self._already_there(manifest_key, manifest_bytes, step):
            return None
        for name in sorted(manifest["files"]):
            key = checkpoint_key(self.run_prefix, step, name)
            try:
                self._put(key, lambda k=key, n=name: self.store.upload_file(k, path / n))
            except FileNotFoundError:
                return self._pruned_before_upload(path)
        try:
            self._put(manifest_key, lambda: self.store.put_if_absent(manifest_key, manifest_bytes))
        except PreconditionFailed:  # a retry whose first attempt had landed, or another writer
            if not self._already_there(manifest_key, manifest_bytes, step):
                raise
        with self._cond:
            self._ckpts += 1
            self._last_safe = step if self._last_safe is None else max(self._last_safe, step)
        log.info("remote mirror: checkpoint step %d is safe remotely (%s)", step, manifest_key)
        return None

    def _already_there(self, manifest_key: str, manifest_bytes: bytes, step: int) -> bool:
        """True when the same manifest is already on the store; an error when a different one is."""
        found = self._put(manifest_key, lambda: self.store.get(manifest_key), quiet=True)
        if found is None:
            return False
        if found[0] != manifest_bytes:
            raise RemoteStoreError(f"remote checkpoint step {step} ({manifest_key}) has a different manifest "
                                   "than the local one; not overwriting it (another trainer wrote that step)")
        with self._cond:
            self._last_safe = step if self._last_safe is None else max(self._last_safe, step)
        return True

    def _pruned_before_upload(self, path: Path) -> None:
        with self._cond:
            self._skipped += 1
        log.warning("remote mirror: checkpoint %s was deleted locally before its upload finished; skipped", path)

    def _upload_run_file(self, name: str, path: Path) -> None:
        key = join_key(self.run_prefix, name)
        try:
            self._put(key, lambda: self.store.upload_file(key, path))
        except FileNotFoundError:
            log.warning("remote mirror: %s is gone; not uploaded", path)
            return
        with self._cond:
            self._files += 1

    def _put(self, key: str, call: Callable[[], Any], *, quiet: bool = False) -> Any:
        """One store call with retries; the fault hook and close()'s abandon checked before it."""
        if self._abandon:
            raise _Abandoned(key)
        if self._before_put is not None and not quiet:
            self._before_put(key)
        r = self._retry
        retrying = Retrying(stop=stop_after_attempt(r.attempts) | stop_after_delay(r.deadline_s),
                            wait=wait_exponential(multiplier=r.initial_s, max=r.max_wait_s),
                            retry=retry_if_exception(_transient), sleep=self._sleep, reraise=True,
                            before_sleep=_log_retry(key))
        return retrying(call)

    # ------------------------------------------------------------------ remote retention

    def prune_remote(self, keep_last: int, best_step: int | None, *, keep_best: bool = True,
                     dry_run: bool = False) -> RemotePrunePlan:
        """Apply keep-last-K + best to the remote checkpoints (manifest deleted first); the plan either way."""
        with self._cond:  # queued or uploading now: their directories have no manifest yet, and are not orphans
            busy = {j.path for j in (*self._queue, self._busy) if j is not None and j.kind == "checkpoint"}
        plan = plan_remote_prune(self.store, self.run_prefix, keep_last, best_step, keep_best=keep_best,
                                 busy_steps=_steps_of(busy))
        if not dry_run:
            apply_remote_prune(self.store, self.run_prefix, plan)
        return plan


def plan_remote_prune(store: ObjectStore, run_prefix: str, keep_last: int, best_step: int | None, *,
                      keep_best: bool = True, busy_steps: Iterable[int] = ()) -> RemotePrunePlan:
    """What remote retention would delete: the local rule (last K, the newest, the best), quarantined
    checkpoints never (kept for a person), interrupted uploads older than the newest committed one."""
    policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best)
    found = list_remote_checkpoints(store, run_prefix)
    committed = [c for c in found if c.usable]
    keep = {c.step for c in committed[-policy.keep_last:]}
    if policy.keep_best and best_step is not None:
        keep.add(best_step)
    delete = [c for c in committed if c.step not in keep]
    newest = committed[-1].step if committed else -1
    busy = set(busy_steps)
    orphans = [c for c in found if not c.committed and not c.quarantined and c.step < newest and c.step not in busy]
    return RemotePrunePlan(keep=tuple(sorted(keep & {c.step for c in committed})),
                           delete=tuple(c.step for c in delete), orphans=tuple(c.step for c in orphans),
                           bytes_freed=sum(c.size for c in delete + orphans))


def apply_remote_prune(store: ObjectStore, run_prefix: str, plan: RemotePrunePlan) -> None:
    """Delete what the plan says: each checkpoint's manifest first, so a delete cut short leaves an
    uncommitted (invisible) directory, never a committed one missing files."""
    by_step = {c.step: c for c in list_remote_checkpoints(store, run_prefix)}
    for step in (*plan.delete, *plan.orphans):
        ckpt = by_step.get(step)
        if ckpt is None:
            continue
        if MANIFEST_NAME in ckpt.objects:
            store.delete(ckpt.key(MANIFEST_NAME))
        for name in sorted(ckpt.objects):
            if name != MANIFEST_NAME:
                store.delete(ckpt.key(name))
        log.info("remote retention: deleted %s", ckpt.prefix)


def _steps_of(paths: Iterable[Path | None]) -> set[int]:
    return {s for p in paths if p is not None and (s := parse_checkpoint_name(p.name)) is not None}


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the store was unreachable or failed on its side (never a lost conditional put)."""
    return isinstance(exc, RemoteStoreError) and exc.retryable


def _log_retry(key: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("remote mirror: %s failed (attempt %d: %s); retrying in %.1f s", key, state.attempt_number,
                    exc, state.next_action.sleep if state.next_action else 0.0)
    return before_sleep
