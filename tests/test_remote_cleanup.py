"""`farense cleanup` over the object store, against a real S3 server: the seed's pile of stale checkpoints,
now on a bucket, shrinks to the last K and the best; a run whose lease is live is left alone; a dry run
deletes nothing; half-uploaded checkpoints and stale multipart uploads go."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from remote_checkpoints import save_checkpoint
from s3_server import S3Server, aws_env

from farense.cli import main
from farense.disk.remote_cleanup import apply_remote_cleanup, plan_remote_cleanup
from farense.run.checkpoint import CheckpointInfo
from farense.run.layout import MANIFEST_NAME
from farense.run.lease import LEASE_NAME, LeaseHolder, RunLease
from farense.run.objectstore import ObjectStore
from farense.run.remote_layout import (
    QUARANTINE_MARKER,
    checkpoint_key,
    list_remote_checkpoints,
)

pytest_plugins = ["conftest_s3"]

BEST = 120


def upload(store: ObjectStore, run_prefix: str, info: CheckpointInfo, *, manifest: bool = True) -> None:
    """A checkpoint on the store as the mirror leaves it: its files, then (unless cut short) its manifest."""
    for name in info.files:
        store.put(checkpoint_key(run_prefix, info.step, name), (info.path / name).read_bytes())
    if manifest:
        store.put_if_absent(checkpoint_key(run_prefix, info.step, MANIFEST_NAME), (info.path / MANIFEST_NAME).read_bytes())


def seed_run(store: ObjectStore, tmp_path: Path, run: str, steps: range) -> str:
    """Tiny committed checkpoints at `steps` on the store; the lowest validation loss at step BEST."""
    prefix = store.key("runs", run)
    for step in steps:
        info = save_checkpoint(tmp_path / run, step, size=32, val_loss=0.5 + abs(step - BEST) / 1000)
        upload(store, prefix, info)
    return prefix


def remote_steps(store: ObjectStore, prefix: str) -> list[int]:
    return [c.step for c in list_remote_checkpoints(store, prefix) if c.committed]


def cleanup_cli(server: S3Server, store: ObjectStore, tmp_path: Path, *args: str) -> int:
    with aws_env(server.env):
        return main(["cleanup", "--runs-dir", str(tmp_path / "local-runs"), "--production-dir",
                     str(tmp_path / "production"), "--remote", f"s3://{server.bucket}/{store.location.prefix}",
                     "--keep-last", "3", *args])


def test_forty_stale_remote_checkpoints_shrink_to_the_last_k_and_the_best(s3_server, s3_store, tmp_path, capsys):
    prefix = seed_run(s3_store, tmp_path, "exp1", range(10, 410, 10))
    before = [i.key for i in s3_store.list(s3_store.key("runs"))]
    assert len(remote_steps(s3_store, prefix)) == 40

    assert cleanup_cli(s3_server, s3_store, tmp_path, "--json") == 0  # a dry run by default
    report = orjson.loads(capsys.readouterr().out)
    remote = report["plan"]["remote"]
    (run,) = remote["runs"]
    assert (run["run"], run["best_step"], run["kept_steps"]) == ("exp1", BEST, [BEST, 380, 390, 400])
    assert len(run["delete_steps"]) == 36 and run["bytes_to_free"] > 0 and remote["stored_bytes"] > run["bytes_to_free"]
    assert report["dry_run"] and report["result"] is None
    assert [i.key for i in s3_store.list(s3_store.key("runs"))] == before  # nothing deleted

    assert cleanup_cli(s3_server, s3_store, tmp_path, "--apply") == 0
    out = capsys.readouterr().out
    assert "exp1" in out and "remote: deleted 36 checkpoints" in out
    assert remote_steps(s3_store, prefix) == [BEST, 380, 390, 400]
    assert not [i for i in s3_store.list(prefix + "/checkpoints") if "step-00000010" in i.key]  # no file left behind


def test_a_run_whose_lease_is_live_is_not_touched(s3_server, s3_store, tmp_path, capsys):
    busy = seed_run(s3_store, tmp_path, "busy", range(10, 110, 10))
    idle = seed_run(s3_store, tmp_path, "idle", range(10, 110, 10))
    holder = LeaseHolder("trainer-host", 4242, "busy", time.time())
    with RunLease(s3_store, f"{busy}/{LEASE_NAME}", holder, ttl_s=120):
        plan = plan_remote_cleanup(s3_store, keep_last=3)
        assert [r.run for r in plan.runs] == ["idle"]
        (skip,) = plan.skipped
        assert skip.what == busy and "active: lease held by host trainer-host pid 4242" in skip.reason
        assert cleanup_cli(s3_server, s3_store, tmp_path, "--apply") == 0
        out = capsys.readouterr().out
        assert f"skipped {busy}: active: lease held by host trainer-host pid 4242" in out
        assert remote_steps(s3_store, busy) == list(range(10, 110, 10))
        assert remote_steps(s3_store, idle) == [80, 90, 100]  # best is step 100 here: the lowest loss seen


def test_a_trainer_that_took_the_lease_after_planning_keeps_its_run(s3_store, tmp_path):
    prefix = seed_run(s3_store, tmp_path, "exp1", range(10, 110, 10))
    plan = plan_remote_cleanup(s3_store, keep_last=3)
    assert plan.runs[0].prune.delete
    with RunLease(s3_store, f"{prefix}/{LEASE_NAME}", LeaseHolder("late", 7, "exp1", time.time()), ttl_s=120):
        result = apply_remote_cleanup(s3_store, plan)
    assert result.deleted == [] and "active now" in result.skipped[0].reason and "host late pid 7" in result.skipped[0].reason
    assert remote_steps(s3_store, prefix) == list(range(10, 110, 10))


def test_half_uploaded_checkpoints_and_stale_multipart_uploads_are_cleaned(s3_store, tmp_path):
    prefix = s3_store.key("runs", "exp1")
    for step in (10, 20, 30, 40, 50):
        upload(s3_store, prefix, save_checkpoint(tmp_path / "c", step, size=32, val_loss=1.0 / step))
    half_old = save_checkpoint(tmp_path / "c", 25, size=32)
    upload(s3_store, prefix, half_old, manifest=False)  # a crash between its files and its manifest
    in_flight = save_checkpoint(tmp_path / "c", 60, size=32)
    upload(s3_store, prefix, in_flight, manifest=False)  # newer than every committed one: maybe still uploading
    s3_store.put(checkpoint_key(prefix, 10, QUARANTINE_MARKER), b'{"reason": "sha256 mismatch"}')
    client, bucket = s3_store._client(), s3_store.location.bucket
    key = checkpoint_key(prefix, 70, "adapters.safetensors")
    up = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 10)

    young = plan_remote_cleanup(s3_store, keep_last=2, stale_upload_hours=1)
    assert young.stale_uploads == []  # started just now: an uploader may still be at it
    plan = plan_remote_cleanup(s3_store, keep_last=2, stale_upload_hours=1, now=time.time() + 2 * 3600)
    (run,) = plan.runs
    assert (run.prune.keep, run.prune.delete, run.prune.orphans, run.quarantined) == ((40, 50), (20, 30), (25,), (10,))
    assert [u.key for u in plan.stale_uploads] == [key]
    assert any("1 quarantined checkpoint(s)" in k.reason for k in plan.kept)

    result = apply_remote_cleanup(s3_store, plan)
    assert result.errors == [] and result.aborted == [key]
    steps = {c.step: c for c in list_remote_checkpoints(s3_store, prefix)}
    assert sorted(steps) == [10, 40, 50, 60]  # quarantined kept, in-flight upload kept, half upload 25 gone
    assert steps[10].quarantined and not steps[60].committed
    assert s3_store.list_multipart_uploads(prefix) == []
