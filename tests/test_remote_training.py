"""A run survives the loss of its machine ([storage] remote): real `farense train` processes, a real
S3 server (SeaweedFS), real SIGKILL. The workspace a run was killed on is deleted; another one, with
the same config and store, resumes from the store and ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest
from s3_server import S3Server, aws_env, store_for
from training_fixtures import SHORT, start_train, write_config_file

from farense.codes import ExitCode
from farense.config import ExperimentConfig, load_config
from farense.errors import Preempted
from farense.observe.monitor import parse_plain_line, plain_line, snapshot
from farense.observe.status import status_report
from farense.run.layout import MANIFEST_NAME, RunPaths
from farense.run.lease import LEASE_NAME, LeaseHolder, LeaseRecord
from farense.run.metrics import read_metrics
from farense.run.objectstore import ObjectStore
from farense.run.remote_layout import QUARANTINE_MARKER, checkpoint_key, list_remote_checkpoints
from farense.train.runner import run_training

pytest_plugins = ["conftest_s3"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LEASE_SECONDS = 3.0  # storage.lease_seconds' minimum is 2: a takeover within seconds


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(pred, timeout: float = 120, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tiny_config(demo_dir: Path, ws: Path, **sections: dict) -> ExperimentConfig:
    merged = {k: dict(v) for k, v in SHORT.items()}
    for sec, values in sections.items():
        merged[sec] = {**merged.get(sec, {}), **values}
    return load_config("v2", overlays=["tiny"], workspace=ws).with_overrides(
        **merged, model={"path": str(demo_dir / "model")}, data={"dir": str(demo_dir / "data")})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    """One uninterrupted run without a remote: the bytes every restored run must reproduce."""
    ws = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(demo_dir, ws)
    proc = start_train(write_config_file(cfg, ws / "v2.toml"), ws, log=ws / "log.txt")
    assert proc.wait(timeout=300) == ExitCode.OK, (ws / "log.txt").read_text()[-3000:]
    paths = RunPaths(cfg.run_dir)
    return {"adapters": sha(paths.best_adapters),
            "final_checkpoint": sha(paths.checkpoints / "step-00000024" / "adapters.safetensors"),
            "metrics": [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)]}


@pytest.fixture
def remote(s3_server: S3Server) -> tuple[str, ObjectStore]:
    """A prefix of this test's own on the session's server: (storage.remote, a store on it)."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    return f"s3://{s3_server.bucket}/{prefix}", store_for(s3_server, prefix)


class Workspace:
    """One machine's directory: the config file, the run's paths, its trainer processes and logs."""

    def __init__(self, root: Path, demo_dir: Path, server: S3Server, url: str, **sections: dict) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.server = root, server
        self.config = tiny_config(demo_dir, root, storage={"remote": url, "lease_seconds": LEASE_SECONDS},
                                  **sections)
        self.file = write_config_file(self.config, root / "v2.toml")
        self.paths = RunPaths(self.config.run_dir)
        self.runs = 0

    def start(self, **env: str) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        log = self.root / f"log{self.runs}.txt"
        return start_train(self.file, self.root, log=log, **self.server.env, **env), log

    def train_to_end(self) -> str:
        proc, log = self.start()
        assert proc.wait(timeout=300) == ExitCode.OK, log.read_text()[-3000:]
        return log.read_text()

    def run_state(self) -> dict:
        return orjson.loads(self.paths.state.read_bytes())


def run_prefix(store: ObjectStore) -> str:
    return store.key("runs", "v2")


def committed_remotely(store: ObjectStore, step: int) -> bool:
    return store.head(checkpoint_key(run_prefix(store), step, MANIFEST_NAME)) is not None


def wait_lease_expired(store: ObjectStore) -> None:
    """Until the killed holder's lease (wall-clock expiry) has run out."""
    found = store.get(store.key("runs", "v2", LEASE_NAME))
    assert found is not None
    record = LeaseRecord.from_bytes(found[0])
    assert record is not None
    time.sleep(max(0.0, record.expires_at - time.time()) + 0.2)


def test_a_run_killed_with_its_machine_resumes_from_the_store_on_another(tmp_path, demo_dir, s3_server, remote,
                                                                        reference):
    url, store = remote
    a = Workspace(tmp_path / "a", demo_dir, s3_server, url)
    marker = tmp_path / "fault.txt"
    proc, _ = a.start(FARENSE_FAULT="step:11", FARENSE_FAULT_MARKER=str(marker))
    wait_for(marker.exists, what="step 11")
    wait_for(lambda: committed_remotely(store, 8), what="step 8's manifest on the store")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    shutil.rmtree(a.root)  # the machine is gone, with its disk

    wait_lease_expired(store)
    b = Workspace(tmp_path / "b", demo_dir, s3_server, url)
    log = b.train_to_end()
    assert f"remote: restored checkpoint step 8 from {url}/runs/v2" in log and "resuming from step 8" in log
    state = b.run_state()
    assert state["state"] == "completed" and state["resumed_from"] == 8 and state["remote_safe_step"] == 24
    assert sha(b.paths.best_adapters) == reference["adapters"]
    assert sha(b.paths.checkpoints / "step-00000024" / "adapters.safetensors") == reference["final_checkpoint"]
    got = [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(b.paths.metrics_jsonl)]
    assert got == reference["metrics"], "the history restored from the store plus the resumed steps"
    assert "remote: all uploads done" in log and "step 24 safe on" in log
    remote_summary = store.get(store.key("runs", "v2", "training_summary.json"))
    assert remote_summary is not None and orjson.loads(remote_summary[0])["final_step"] == 24
    seen = snapshot(b.paths.root)  # the monitor and `farense status` read it from run_state.json
    assert seen.remote_safe_step == 24 and parse_plain_line(plain_line(seen))["remote_safe_step"] == "24"
    [row] = status_report(b.paths.root.parent).runs
    assert row.cells(time.time())[3] == "24/24 (remote: 24)"


def test_a_checkpoint_without_its_manifest_or_with_a_flipped_byte_on_the_store_is_never_loaded(
        tmp_path, demo_dir, s3_server, remote, reference):
    url, store = remote
    a = Workspace(tmp_path / "a", demo_dir, s3_server, url, checkpoint={"keep_last": 3})
    a.train_to_end()
    assert [c.step for c in list_remote_checkpoints(store, run_prefix(store)) if c.usable] == [8, 16, 24]
    store.delete(checkpoint_key(run_prefix(store), 24, MANIFEST_NAME))  # its upload never finished
    key = checkpoint_key(run_prefix(store), 16, "adapters.safetensors")
    data = bytearray(store.get(key)[0])
    data[len(data) // 2] ^= 0x01
    store.put(key, bytes(data))  # rotted on the store

    b = Workspace(tmp_path / "b", demo_dir, s3_server, url, checkpoint={"keep_last": 3})
    log = b.train_to_end()
    assert "remote: restored checkpoint step 8" in log and "quarantined on the store: steps 16" in log
    assert b.run_state()["resumed_from"] == 8
    marker = store.get(checkpoint_key(run_prefix(store), 16, QUARANTINE_MARKER))
    assert marker is not None and "sha256 mismatch in adapters.safetensors" in orjson.loads(marker[0])["reason"]
    assert store.head(checkpoint_key(run_prefix(store), 24, QUARANTINE_MARKER)) is None  # never a candidate
    assert sha(b.paths.best_adapters) == reference["adapters"]


def test_one_trainer_per_run_the_other_exits_73_then_takes_over_when_the_lease_expires(
        tmp_path, demo_dir, s3_server, remote, reference):
    url, store = remote
    a = Workspace(tmp_path / "a", demo_dir, s3_server, url)
    b = Workspace(tmp_path / "b", demo_dir, s3_server, url)
    markers = {w: tmp_path / f"fault-{w.root.name}.txt" for w in (a, b)}
    procs = {w: w.start(FARENSE_FAULT="step:11", FARENSE_FAULT_MARKER=str(markers[w])) for w in (a, b)}
    wait_for(lambda: any(p.poll() is not None for p, _ in procs.values()), what="one of the two to exit")
    loser = next(w for w, (p, _) in procs.items() if p.poll() is not None)
    holder = b if loser is a else a
    proc, log = procs[loser]
    assert proc.returncode == ExitCode.LOCKED, log.read_text()[-3000:]
    holder_pid = procs[holder][0].pid
    assert "is held by host" in log.read_text() and f"pid {holder_pid}" in log.read_text()

    wait_for(markers[holder].exists, what="the holder at step 11")
    wait_for(lambda: committed_remotely(store, 8), what="step 8's manifest on the store")
    procs[holder][0].send_signal(signal.SIGKILL)
    assert procs[holder][0].wait(timeout=30) == -signal.SIGKILL
    proc, log = loser.start()  # the dead holder's lease is still live: refused again, naming it
    assert proc.wait(timeout=120) == ExitCode.LOCKED and f"pid {holder_pid}" in log.read_text()

    wait_lease_expired(store)
    out = loser.train_to_end()
    assert "remote: restored checkpoint step 8" in out and loser.run_state()["resumed_from"] == 8
    assert sha(loser.paths.best_adapters) == reference["adapters"]


def test_a_lost_lease_stops_the_run_as_preempted_and_nothing_more_reaches_the_store(
        tmp_path, demo_dir, s3_server, remote):
    """Another process takes the lease over mid-run: the trainer stops at the step boundary as preempted,
    its preemption checkpoint stays local, and nothing more is uploaded."""
    url, store = remote
    cfg = tiny_config(demo_dir, tmp_path, storage={"remote": url, "lease_seconds": LEASE_SECONDS})
    lease_key = store.key("runs", "v2", LEASE_NAME)
    lines: list[str] = []

    def on_step_end(step: int, row: dict, model: object) -> None:
        if step == 10:  # step 8 went out meanwhile; now another machine writes the lease over ours
            wait_for(lambda: committed_remotely(store, 8), what="step 8 on the store")
            now = time.time()
            other = LeaseRecord(LeaseHolder("elsewhere", 4242, "v2", now), "theirs", renewed_at=now,
                                expires_at=now + 60)
            store.put(lease_key, other.to_bytes())
            wait_for(lambda: any("stopping at the next step" in line for line in lines), timeout=30,
                     what="the trainer to notice")

    with aws_env(s3_server.env), pytest.raises(Preempted, match="the loss of the run's lease"):
        run_training(cfg, log=lines.append, on_step_end=on_step_end, progress_bar=False)
    paths = RunPaths(cfg.run_dir)
    assert orjson.loads(paths.state.read_bytes())["state"] == "preempted"
    assert (paths.checkpoints / "step-00000010").is_dir()  # the preemption checkpoint, local only
    assert [c.step for c in list_remote_checkpoints(store, run_prefix(store))] == [8]
    assert LeaseRecord.from_bytes(store.get(lease_key)[0]).holder.host == "elsewhere"  # theirs, untouched

    # The other machine lets go; this one resumes: its local step 10 is newer than the store's, so it goes out.
    theirs = LeaseRecord.from_bytes(store.get(lease_key)[0])
    store.put(lease_key, dataclasses.replace(theirs, released=True, expires_at=time.time()).to_bytes())
    lines.clear()
    with aws_env(s3_server.env):
        run_training(cfg, log=lines.append, progress_bar=False)
    assert "remote: the local checkpoint step 10 is newer than the store's (8); queued for upload" in lines
    assert orjson.loads(paths.state.read_bytes())["remote_safe_step"] == 24


def test_the_disk_preflight_counts_what_a_restore_will_download_when_the_local_run_is_behind(
        tmp_path, demo_dir, s3_server, remote):
    from remote_checkpoints import save_checkpoint

    from farense.disk.preflight import preflight
    from farense.run.mirror import RunMirror

    url, store = remote
    cfg = tiny_config(demo_dir, tmp_path / "ws", storage={"remote": url})
    elsewhere = tmp_path / "other-machine"
    mirror = RunMirror(store, run_prefix(store))
    for step in (8, 16):
        mirror.submit_checkpoint(save_checkpoint(elsewhere, step, size=50_000).path)
    assert mirror.close(timeout_s=60)
    newest = max(c.size for c in list_remote_checkpoints(store, run_prefix(store)))

    with aws_env(s3_server.env):
        report = preflight(cfg, allow_cleanup=False)
    [item] = [i for i in report.estimate.items if i.name == "remote restore"]
    assert item.bytes == newest and "step 16" in item.detail and "no local checkpoint" in item.detail
    [row] = [r for r in report.rows if "remote restore" in r.items]
    assert row.writes >= newest

    shutil.copytree(elsewhere / "step-00000016", RunPaths(cfg.run_dir).checkpoints / "step-00000016")
    with aws_env(s3_server.env):
        report = preflight(cfg, allow_cleanup=False)  # not behind: nothing to download
    assert not [i for i in report.estimate.items if i.name == "remote restore"]
