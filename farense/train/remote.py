"""A training's home on the object store (`[storage] remote`): the run's lease, the restore when this
machine is behind the store, the background mirror of checkpoints and run files, the drain at the end.

Rank 0 only; without `[storage] remote` none of this runs. Upload failures are logged and counted,
never raised into training; a lost lease stops the run as preempted at the next step boundary and
nothing more is uploaded. Endpoint and credentials come from the AWS_* variables (farense.run.objectstore).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farense.config import ExperimentConfig, format_size
from farense.run.checkpoint import CheckpointInfo, CheckpointStore, RetentionPolicy
from farense.run.fsutil import fsync_dir, tmp_sibling
from farense.run.layout import CONFIG_FILE, RUN_STATE_FILE, RunPaths
from farense.run.lease import LEASE_NAME, LeaseHolder, RunLease
from farense.run.metrics import read_metrics
from farense.run.mirror import RunMirror
from farense.run.objectstore import (
    ObjectStore,
    RemoteStoreError,
    RemoteUnavailable,
)
from farense.run.remote_layout import join_key, list_remote_checkpoints
from farense.run.remote_restore import RestoreResult, restore_latest
from farense.run.runstate import RunRecorder
from farense.signals import PreemptionFlag
from farense.train.progress import CHECKPOINT_FILES

Log = Callable[[str], None]
# What a final wait for the last small file (run_state.json after the drain) may add to drain_seconds.
LAST_FILE_SECONDS = 5.0


class RemoteRun:
    """One training's side of the store: take_lease, restore_if_behind, on_* hooks, finish."""

    def __init__(self, config: ExperimentConfig, paths: RunPaths, store: ObjectStore, *, log: Log,
                 preemption: PreemptionFlag) -> None:
        self.config, self.paths, self.store, self.log, self.preemption = config, paths, store, log, preemption
        self.run_prefix = store.key("runs", config.run_name)
        self.url = f"s3://{store.location.bucket}/{self.run_prefix}"
        self.mirror = RunMirror(store, self.run_prefix, max_pending_checkpoints=config.storage.upload_queue)
        self.policy = RetentionPolicy.from_config(config.checkpoint)
        self.lease: RunLease | None = None
        self.recorder: RunRecorder | None = None
        self.safe_at_start: int | None = None  # the newest checkpoint already on the store when we started
        self._lost: str | None = None

    @classmethod
    def open(cls, config: ExperimentConfig, paths: RunPaths, *, log: Log,
             preemption: PreemptionFlag) -> RemoteRun | None:
        """The run's remote side, or None when `[storage] remote` is empty (local only)."""
        if not config.storage.remote:
            return None
        return cls(config, paths, ObjectStore.at(config.storage.remote), log=log,
                   preemption=preemption)

    # ------------------------------------------------------------------ before the first step

    def take_lease(self) -> None:
        """One trainer per run across machines: RunLocked (exit 73, naming the holder) when another holds it."""
        ttl = self.config.storage.lease_seconds
        self.lease = RunLease(self.store, join_key(self.run_prefix, LEASE_NAME),
                              LeaseHolder.this_process(self.config.run_name), ttl_s=ttl, on_lost=self._on_lost)
        self.lease.acquire()
        self.lease.start_renewing()
        self.log(f"remote: {self.url} is this run's home; its lease is ours ({ttl:g} s, renewed every {ttl / 3:.3g} s)")

    def start_over(self) -> None:
        """--new-run: the run's remote checkpoints and files go too (the lease stays: we hold it)."""
        lease_key = join_key(self.run_prefix, LEASE_NAME)
        gone = [o for o in self.store.list(self.run_prefix) if o.key != lease_key]
        for obj in gone:
            self.store.delete(obj.key)
        self.log(f"remote: --new-run deleted {len(gone)} objects ({format_size(sum(o.size for o in gone))}) "
                 f"under {self.url}")

    def restore_if_behind(self) -> RestoreResult | None:
        """When the local checkpoints are missing or older than the store's newest that verifies, bring it
        here (older ones if it does not verify), with the metrics history and best adapters."""
        result = restore_latest(self.store, self.run_prefix, self.paths.checkpoints, required_files=CHECKPOINT_FILES)
        if result is None:
            usable = [c.step for c in list_remote_checkpoints(self.store, self.run_prefix) if c.usable]
            self.safe_at_start = max(usable, default=None)
            self._send_if_ahead()
            return None
        self.safe_at_start = result.step
        files = self._restore_run_files()
        skipped = f"; quarantined on the store: steps {', '.join(map(str, result.quarantined))}" \
            if result.quarantined else ""
        self.log(f"remote: restored checkpoint step {result.step} from {self.url} ({format_size(result.bytes)}, "
                 f"{result.bytes} bytes in {result.seconds:.1f} s){skipped}; run files: "
                 + (", ".join(f"{n} ({b} bytes)" for n, b in files) or "none on the store"))
        self._check_history(result.step)
        return result

    def _send_if_ahead(self) -> None:
        """The local run is ahead of the store (its last uploads did not finish in time): send its newest
        checkpoint now, so the store is not behind until the next one."""
        local = CheckpointStore(self.paths.checkpoints, required_files=CHECKPOINT_FILES,
                                on_skip=lambda path, why: None).latest_verified()
        if local is not None and (self.safe_at_start is None or local.step > self.safe_at_start):
            self.log(f"remote: the local checkpoint step {local.step} is newer than the store's "
                     f"({self.safe_at_start}); queued for upload")
            self.mirror.submit_file(self._name(self.paths.metrics_jsonl), self.paths.metrics_jsonl)
            self.mirror.submit_checkpoint(local.path)

    def _restore_run_files(self) -> list[tuple[str, int]]:
        """metrics.jsonl and adapters/ from the store, each replacing the local file whole; those found."""
        found = []
        for path in (self.paths.metrics_jsonl, self.paths.best_adapters, self.paths.best_adapter_config,
                     self.paths.best_record):
            name = self._name(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_sibling(path)
            try:
                got = self.store.download_file(join_key(self.run_prefix, name), tmp)
            except RemoteUnavailable:
                tmp.unlink(missing_ok=True)
                raise  # the network, not the file: the run stops resumable, as at the lease
            except RemoteStoreError:
                tmp.unlink(missing_ok=True)
                continue  # not on the store (never written, or its upload failed)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            found.append((name, got.size))
        return found

    def _check_history(self, step: int) -> None:
        rows = read_metrics(self.paths.metrics_jsonl, warn=None)
        last = max((r["step"] for r in rows), default=0)
        if last < step:
            self.log(f"remote: warning: the store's metrics.jsonl ends at step {last}, before the checkpoint's "
                     f"{step}; the summary's history lacks steps {last + 1}-{step}")

    # ------------------------------------------------------------------ during the run (never blocking)

    def attach(self, recorder: RunRecorder) -> None:
        """run_state.json carries what is safe remotely from now on."""
        self.recorder = recorder
        recorder.extra = self.status_fields

    def status_fields(self) -> dict[str, Any]:
        status = self.mirror.status()
        safe = max((s for s in (status.last_safe_remote_step, self.safe_at_start) if s is not None), default=None)
        return {"remote": self.url, "remote_safe_step": safe, "remote_pending": status.pending,
                "remote_failed": status.failed}

    def on_checkpoint(self, info: CheckpointInfo | None, best_step: int | None) -> None:
        """A checkpoint committed (its step's metrics row written): the history first, then the checkpoint,
        then remote retention, so the store never holds a checkpoint without the history up to it."""
        if info is None or self._lost:
            return
        self.mirror.submit_file(self._name(self.paths.metrics_jsonl), self.paths.metrics_jsonl)
        self.mirror.submit_checkpoint(info.path)
        self.mirror.submit_prune(self.policy.keep_last, best_step, keep_best=self.policy.keep_best)

    def on_best_adapters(self) -> None:
        """adapters/ was replaced by a new best: mirror its files."""
        if not self._lost:
            for path in (self.paths.best_adapters, self.paths.best_adapter_config, self.paths.best_record):
                self.mirror.submit_file(self._name(path), path)

    def on_run_files(self) -> None:
        """The end of a run: the files it leaves (run_state.json is sent by finish, after the drain)."""
        if self._lost:
            return
        p = self.paths
        for path in (p.metrics_jsonl, p.metrics_json, p.metrics_csv, p.summary, p.root / CONFIG_FILE):
            if path.exists():
                self.mirror.submit_file(self._name(path), path)

    def _on_lost(self, reason: str) -> None:
        """From the lease's thread: stop at the next step boundary; nothing more reaches the store."""
        self._lost = reason
        self.log(f"remote: {reason}; stopping at the next step, nothing more is uploaded")
        self.preemption.request(signal.SIGTERM, reason=f"the loss of the run's lease ({reason})")
        self.mirror.close(timeout_s=0)  # whatever is queued is abandoned between two objects

    # ------------------------------------------------------------------ the end

    def finish(self) -> None:
        """Wait for the uploads (at most storage.drain_seconds), say what is safe where, release the lease."""
        if self.lease is None or (not self.lease.held and not self.lease.lost):  # never held: nothing was queued
            self.mirror.close(timeout_s=0)
            return
        try:
            if self._lost:
                self.log(f"remote: lease lost; newest checkpoint safe on {self.url}: "
                         f"step {self.status_fields()['remote_safe_step']}")
                return
            self._drain()
        finally:
            self.lease.release()

    def _drain(self) -> None:
        start = time.monotonic()
        drained = self.mirror.drain(self.config.storage.drain_seconds)
        if self.recorder is not None:
            self.recorder.restamp()  # run_state.json says what is safe now, and goes to the store last
        if (self.paths.root / RUN_STATE_FILE).exists():
            self.mirror.submit_file(RUN_STATE_FILE, self.paths.root / RUN_STATE_FILE)
        self.mirror.close(timeout_s=LAST_FILE_SECONDS if drained else 0)
        status, fields = self.mirror.status(), self.status_fields()
        seconds = time.monotonic() - start
        failed = f"; {status.failed} uploads failed (last: {status.last_error})" if status.failed else ""
        if drained:
            self.log(f"remote: all uploads done in {seconds:.1f} s, step {fields['remote_safe_step']} safe on "
                     f"{self.url}{failed}")
        else:
            self.log(f"remote: {status.pending} uploads still pending after {seconds:.1f} s "
                     f"(storage.drain_seconds = {self.config.storage.drain_seconds:g}); newest step safe on "
                     f"{self.url}: {fields['remote_safe_step']}; the rest stays local until the next run{failed}")

    def _name(self, path: Path) -> str:
        """A run file's name on the store: its path under the run directory."""
        return path.relative_to(self.paths.root).as_posix()
