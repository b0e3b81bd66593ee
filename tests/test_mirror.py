"""farense.run.mirror against a real S3 server: manifest last, newest wins, failures never raise, retention."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from remote_checkpoints import save_checkpoint
from s3_server import store_for

from farense.run.layout import MANIFEST_NAME, checkpoint_name
from farense.run.mirror import RetrySettings, RunMirror, plan_remote_prune
from farense.run.objectstore import ObjectStore
from farense.run.remote_layout import (
    QUARANTINE_MARKER,
    checkpoint_key,
    list_remote_checkpoints,
)

pytest_plugins = ["conftest_s3"]

FAST = RetrySettings(attempts=3, initial_s=0.01, max_wait_s=0.01, deadline_s=30)


def run_prefix(store: ObjectStore) -> str:
    return store.key("runs", "exp1")


def test_checkpoint_files_first_manifest_last(s3_store: ObjectStore, tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "checkpoints", 200)
    prefix = run_prefix(s3_store)
    order: list[str] = []
    present_at_manifest: list[bool] = []

    def before_put(key: str) -> None:
        order.append(key.rsplit("/", 1)[1])
        if key.endswith(MANIFEST_NAME):  # all the files must already be readable on the store
            present_at_manifest.extend(s3_store.head(checkpoint_key(prefix, 200, n)) is not None for n in info.files)
        else:
            assert s3_store.head(checkpoint_key(prefix, 200, MANIFEST_NAME)) is None

    mirror = RunMirror(s3_store, prefix, before_put=before_put)
    mirror.submit_checkpoint(info.path)
    assert mirror.close(timeout_s=30)
    assert order == [*info.files, MANIFEST_NAME] and all(present_at_manifest)
    status = mirror.status()
    assert (status.last_safe_remote_step, status.uploaded_checkpoints, status.failed, status.pending) == (200, 1, 0, 0)
    remote = s3_store.get(checkpoint_key(prefix, 200, MANIFEST_NAME))
    assert remote is not None and remote[0] == (info.path / MANIFEST_NAME).read_bytes()


def test_interrupted_upload_leaves_no_manifest(s3_store: ObjectStore, tmp_path: Path, caplog) -> None:
    info = save_checkpoint(tmp_path / "checkpoints", 300)

    def crash_on_second_file(key: str) -> None:
        if key.endswith(info.files[1]):
            raise RuntimeError("simulated crash mid-upload")

    mirror = RunMirror(s3_store, run_prefix(s3_store), before_put=crash_on_second_file)
    mirror.submit_checkpoint(info.path)  # never raises, whatever happens in the worker
    assert mirror.close(timeout_s=30)
    status = mirror.status()
    assert status.failed == 1 and status.last_safe_remote_step is None and "simulated crash" in status.last_error
    [remote] = list_remote_checkpoints(s3_store, run_prefix(s3_store))
    assert remote.step == 300 and not remote.committed and sorted(remote.objects) == [info.files[0]]
    assert "gave up on" in caplog.text


def test_queue_full_drops_the_oldest_and_says_so(s3_store: ObjectStore, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    infos = [save_checkpoint(tmp_path / "checkpoints", s) for s in (100, 200, 300, 400)]
    mirror = RunMirror(s3_store, run_prefix(s3_store), max_pending_checkpoints=2, start=False)
    for info in infos:
        mirror.submit_checkpoint(info.path)  # returns at once: nothing uploads yet
    assert mirror.status().skipped == 2 and mirror.status().pending == 2
    assert f"not uploading {checkpoint_name(100)}" in caplog.text and f"not uploading {checkpoint_name(200)}" in caplog.text
    mirror.start()
    assert mirror.close(timeout_s=30)
    committed = [c.step for c in list_remote_checkpoints(s3_store, run_prefix(s3_store)) if c.committed]
    assert committed == [300, 400] and mirror.status().last_safe_remote_step == 400


def test_run_files_coalesce_by_name(s3_store: ObjectStore, tmp_path: Path) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text('{"state": "running"}')
    new.write_text('{"state": "completed"}')
    mirror = RunMirror(s3_store, run_prefix(s3_store), start=False)
    mirror.submit_file("run_state.json", old)
    mirror.submit_file("adapters/adapters.safetensors", old)
    mirror.submit_file("run_state.json", new)
    assert mirror.status().pending == 2
    with pytest.raises(ValueError):
        mirror.submit_file("../escape.json", new)
    mirror.start()
    assert mirror.close(timeout_s=30)
    assert s3_store.get(run_prefix(s3_store) + "/run_state.json")[0] == new.read_bytes()  # type: ignore[index]
    assert s3_store.head(run_prefix(s3_store) + "/adapters/adapters.safetensors") is not None
    assert mirror.status().uploaded_files == 2


def test_same_manifest_already_remote_is_fine_a_different_one_is_refused(s3_store: ObjectStore, tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "a", 500)
    for _ in range(2):
        mirror = RunMirror(s3_store, run_prefix(s3_store))
        mirror.submit_checkpoint(info.path)
        assert mirror.close(timeout_s=30)
        assert mirror.status().failed == 0 and mirror.status().last_safe_remote_step == 500
    other = save_checkpoint(tmp_path / "b", 500)  # same step, other content: another trainer's
    mirror = RunMirror(s3_store, run_prefix(s3_store))
    mirror.submit_checkpoint(other.path)
    assert mirror.close(timeout_s=30)
    assert mirror.status().failed == 1 and "different manifest" in mirror.status().last_error  # type: ignore[operator]
    got = s3_store.get(checkpoint_key(run_prefix(s3_store), 500, "adapters.safetensors"))
    assert got is not None and got[0] == (info.path / "adapters.safetensors").read_bytes()  # untouched


def test_outage_is_retried_with_backoff_and_never_raises(private_s3, tmp_path: Path) -> None:
    store = store_for(private_s3, "", client_retries=0)
    info = save_checkpoint(tmp_path / "checkpoints", 600)
    waits: list[float] = []

    def sleep_then_come_back(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            private_s3.start()  # the outage ends after the second failed attempt

    private_s3.stop()
    mirror = RunMirror(store, "runs/exp1", retry=RetrySettings(attempts=5, initial_s=0.01, max_wait_s=0.05),
                       sleep=sleep_then_come_back)
    mirror.submit_checkpoint(info.path)
    assert mirror.close(timeout_s=60)
    assert len(waits) == 2 and waits[1] >= waits[0]
    assert mirror.status().failed == 0 and mirror.status().last_safe_remote_step == 600


def test_gives_up_after_retries_and_counts_it(private_s3, tmp_path: Path) -> None:
    store = store_for(private_s3, "", client_retries=0)
    (tmp_path / "run_state.json").write_text("{}")
    private_s3.stop()
    mirror = RunMirror(store, "runs/exp1", retry=FAST)
    mirror.submit_file("run_state.json", tmp_path / "run_state.json")
    assert mirror.close(timeout_s=60)
    status = mirror.status()
    assert status.failed == 1 and status.uploaded_files == 0 and "unavailable" in status.last_error  # type: ignore[operator]


def test_close_with_timeout_abandons_before_the_manifest(s3_store: ObjectStore, tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "checkpoints", 700)
    release = threading.Event()
    mirror = RunMirror(s3_store, run_prefix(s3_store), before_put=lambda key: release.wait(10))
    mirror.submit_checkpoint(info.path)
    threading.Timer(0.5, release.set).start()
    assert mirror.close(timeout_s=0.2) is False  # not drained: told so, and the trainer goes on
    assert not mirror._thread.is_alive()
    [remote] = list_remote_checkpoints(s3_store, run_prefix(s3_store))
    assert not remote.committed


def test_prune_keeps_last_k_and_best_and_plans_dry(s3_store: ObjectStore, tmp_path: Path) -> None:
    prefix = run_prefix(s3_store)
    mirror = RunMirror(s3_store, prefix, max_pending_checkpoints=5)  # none dropped, however slow the worker
    for step in (10, 20, 30, 40, 50):
        mirror.submit_checkpoint(save_checkpoint(tmp_path / "checkpoints", step).path)
    assert mirror.drain(30)
    s3_store.put(checkpoint_key(prefix, 35, "adapters.safetensors"), b"half an upload")  # interrupted: no manifest
    s3_store.put(checkpoint_key(prefix, 20, QUARANTINE_MARKER), b'{"reason": "sha256 mismatch"}')
    plan = mirror.prune_remote(keep_last=2, best_step=10, dry_run=True)
    assert (plan.keep, plan.delete, plan.orphans) == ((10, 40, 50), (30,), (35,)) and plan.bytes_freed > 0
    assert len(list_remote_checkpoints(s3_store, prefix)) == 6  # a dry run deletes nothing
    mirror.submit_prune(keep_last=2, best_step=10)
    assert mirror.close(30)
    left = {c.step: c for c in list_remote_checkpoints(s3_store, prefix)}
    assert sorted(left) == [10, 20, 40, 50] and left[20].quarantined  # quarantined: kept for a person
    assert plan_remote_prune(s3_store, prefix, 2, 10).delete == ()
