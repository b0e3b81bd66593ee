"""farense.run.remote_restore against a real S3 server: byte-identical restores, quarantine, fallback."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from remote_checkpoints import save_checkpoint, tree_bytes
from s3_server import store_for

from farense.run.checkpoint import CheckpointStore
from farense.run.layout import MANIFEST_NAME, TMP_MARK, checkpoint_name
from farense.run.mirror import RunMirror
from farense.run.objectstore import ObjectStore, RemoteUnavailable
from farense.run.remote_layout import (
    QUARANTINE_MARKER,
    checkpoint_key,
    list_remote_checkpoints,
)
from farense.run.remote_restore import plan_restore, restore_latest

pytest_plugins = ["conftest_s3"]

PREFIX = "runs/exp1"


def mirrored(store: ObjectStore, local: Path, steps: tuple[int, ...], before_put=None) -> None:
    """Save each step locally with CheckpointStore and mirror it; wait until all are uploaded."""
    mirror = RunMirror(store, store.key(PREFIX), before_put=before_put, max_pending_checkpoints=len(steps))
    for step in steps:
        mirror.submit_checkpoint(save_checkpoint(local, step, size=50_000).path)
    assert mirror.close(timeout_s=30)


def no_leftovers(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if TMP_MARK in p.name]


def test_restore_is_byte_identical_and_verifies(s3_store: ObjectStore, tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100, 200))
    plan = plan_restore(s3_store, s3_store.key(PREFIX), tmp_path / "b")
    assert plan.local_step is None and [c.step for c in plan.candidates] == [200, 100]
    assert plan.download_bytes > 150_000
    result = restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "b")
    assert result is not None and result.step == 200 and result.quarantined == ()
    assert result.path == tmp_path / "b" / checkpoint_name(200)
    assert tree_bytes(result.path) == tree_bytes(tmp_path / "a" / checkpoint_name(200))
    assert result.bytes == sum(len(v) for v in tree_bytes(result.path).values()) and result.seconds >= 0
    assert CheckpointStore(tmp_path / "b").verify(200) == (True, "ok")
    assert no_leftovers(tmp_path / "b")


def test_local_newer_or_equal_downloads_nothing(s3_store: ObjectStore, tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100, 200))
    plan = plan_restore(s3_store, s3_store.key(PREFIX), tmp_path / "a")
    assert plan.local_step == 200 and plan.candidates == () and plan.download_bytes == 0
    assert restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "a") is None
    save_checkpoint(tmp_path / "c", 100)  # an older local one: only the newer remote one is a candidate
    assert [c.step for c in plan_restore(s3_store, s3_store.key(PREFIX), tmp_path / "c").candidates] == [200]


def test_flipped_byte_is_quarantined_remotely_and_the_older_one_restored(s3_store: ObjectStore, tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100, 200))
    key = checkpoint_key(s3_store.key(PREFIX), 200, "optimizer.safetensors")
    data = bytearray(s3_store.get(key)[0])  # type: ignore[index]
    data[1234] ^= 0x01
    s3_store.put(key, bytes(data))
    result = restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "b", now=lambda: 1_800_000_000.0)
    assert result is not None and result.step == 100 and result.quarantined == (200,)
    marker = orjson.loads(s3_store.get(checkpoint_key(s3_store.key(PREFIX), 200, QUARANTINE_MARKER))[0])  # type: ignore[index]
    assert marker["reason"] == "sha256 mismatch in optimizer.safetensors" and marker["step"] == 200
    assert marker["quarantined_at_utc"].startswith("2027-01-15")
    remote = {c.step: c for c in list_remote_checkpoints(s3_store, s3_store.key(PREFIX))}
    assert MANIFEST_NAME in remote[200].objects and "optimizer.safetensors" in remote[200].objects  # never deleted
    assert not (tmp_path / "b" / checkpoint_name(200)).exists() and no_leftovers(tmp_path / "b")
    assert [c.step for c in plan_restore(s3_store, s3_store.key(PREFIX), tmp_path / "d").candidates] == [100]


def test_checkpoint_without_manifest_is_ignored(s3_store: ObjectStore, tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100,))

    def crash_before_manifest(key: str) -> None:
        if key.endswith(MANIFEST_NAME):
            raise RuntimeError("trainer machine lost")

    mirrored(s3_store, tmp_path / "a", (200,), before_put=crash_before_manifest)
    result = restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "b")
    assert result is not None and result.step == 100 and result.quarantined == ()
    assert s3_store.head(checkpoint_key(s3_store.key(PREFIX), 200, QUARANTINE_MARKER)) is None


def test_a_manifest_naming_a_path_outside_is_quarantined_before_any_download(s3_store: ObjectStore,
                                                                             tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100, 200))
    key = checkpoint_key(s3_store.key(PREFIX), 200, MANIFEST_NAME)
    manifest = orjson.loads(s3_store.get(key)[0])  # type: ignore[index]
    manifest["files"]["../../escaped"] = manifest["files"].pop("state.json")
    s3_store.put(key, orjson.dumps(manifest))
    result = restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "b" / "checkpoints")
    assert result is not None and result.step == 100 and result.quarantined == (200,)
    assert not list(tmp_path.rglob("escaped"))


def test_broken_local_copy_of_the_same_step_is_set_aside(s3_store: ObjectStore, tmp_path: Path) -> None:
    mirrored(s3_store, tmp_path / "a", (100,))
    broken = save_checkpoint(tmp_path / "b", 100)
    (broken.path / "adapters.safetensors").write_bytes(b"truncated")
    result = restore_latest(s3_store, s3_store.key(PREFIX), tmp_path / "b")
    assert result is not None and result.step == 100
    assert tree_bytes(result.path) == tree_bytes(tmp_path / "a" / checkpoint_name(100))
    assert [p.name for p, _ in CheckpointStore(tmp_path / "b").quarantined()] == [checkpoint_name(100)]


def test_unreachable_store_raises_and_quarantines_nothing(private_s3, tmp_path: Path) -> None:
    store = store_for(private_s3, "", client_retries=0)
    mirrored(store, tmp_path / "a", (100,))
    private_s3.stop()
    with pytest.raises(RemoteUnavailable):
        restore_latest(store, store.key(PREFIX), tmp_path / "b")
    private_s3.start()
    assert store.head(checkpoint_key(store.key(PREFIX), 100, QUARANTINE_MARKER)) is None
