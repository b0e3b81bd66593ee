"""Exact resume with real processes and real signals: a run SIGKILLed anywhere (mid-step,
mid-checkpoint write, mid-validation) or SIGTERMed, then resumed, ends with adapters that are
byte-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import orjson
import pytest
from training_fixtures import start_train, write_config_file

from farense.codes import ExitCode
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(pred, timeout: float = 120, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def train_to_end(cfg_file: Path, ws: Path, log: Path) -> None:
    proc = start_train(cfg_file, ws, log=log)
    assert proc.wait(timeout=300) == ExitCode.OK, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    """One uninterrupted run: the bytes every interrupted run must reproduce."""
    from training_fixtures import SHORT

    from farense.config import load_config

    ws = tmp_path_factory.mktemp("reference")
    cfg = load_config("v2", overlays=["tiny"], workspace=ws).with_overrides(
        **{**SHORT, "model": {"path": str(demo_dir / "model")}, "data": {"dir": str(demo_dir / "data")}}
    )
    cfg_file = write_config_file(cfg, ws / "v2.toml")
    train_to_end(cfg_file, ws, ws / "log.txt")
    paths = RunPaths(cfg.run_dir)
    return {
        "config_file": cfg_file,
        "adapters": sha(paths.adapters / "adapters.safetensors"),
        "final_checkpoint": sha(paths.checkpoints / "step-00000024" / "adapters.safetensors"),
        "metrics": [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)],
    }


def run_dir_for(cfg_file: Path, ws: Path) -> RunPaths:
    from farense.config import load_config

    return RunPaths(load_config(cfg_file, workspace=ws).run_dir)


@pytest.mark.parametrize(
    "fault, resumes_from",
    [
        ("step:11", 8),              # killed inside an optimizer step (between micro-batches)
        ("checkpoint-write:16", 8),  # killed while step-16's files are being written
        ("validation:20", 16),       # killed in the middle of a validation pass
        ("step:3", None),            # killed before the first checkpoint: starts from step 0
    ],
)
def test_sigkill_anywhere_then_resume_gives_identical_adapters(tmp_path, reference, fault, resumes_from):
    ws = tmp_path
    cfg_file = write_config_file_from(reference["config_file"], ws)
    paths = run_dir_for(cfg_file, ws)
    marker = tmp_path / "fault.txt"
    proc = start_train(cfg_file, ws, log=ws / "log1.txt", FARENSE_FAULT=fault, FARENSE_FAULT_MARKER=str(marker))
    wait_for(marker.exists, what=f"fault point {fault}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    if fault.startswith("checkpoint-write"):
        leftovers = [p.name for p in paths.checkpoints.iterdir() if ".tmp-" in p.name]
        assert leftovers, "the kill should have left a half-written temporary checkpoint"
    assert orjson.loads(paths.state.read_bytes())["state"] == "running"  # what a crash leaves behind

    proc = start_train(cfg_file, ws, log=ws / "log2.txt")
    assert proc.wait(timeout=300) == ExitCode.OK, (ws / "log2.txt").read_text()[-3000:]
    state = orjson.loads(paths.state.read_bytes())
    assert state["state"] == "completed" and state["resumed_from"] == resumes_from
    assert not [p for p in paths.checkpoints.iterdir() if ".tmp-" in p.name]
    assert sha(paths.adapters / "adapters.safetensors") == reference["adapters"]
    assert sha(paths.checkpoints / "step-00000024" / "adapters.safetensors") == reference["final_checkpoint"]
    got = [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)]
    assert got == reference["metrics"], "the metrics history of a resumed run equals the uninterrupted one"


def test_sigterm_checkpoints_with_zero_steps_lost_then_resume_is_exact(tmp_path, reference):
    ws = tmp_path
    cfg_file = write_config_file_from(reference["config_file"], ws)
    paths = run_dir_for(cfg_file, ws)
    proc = start_train(cfg_file, ws, log=ws / "log1.txt")
    wait_for(lambda: len(read_metrics(paths.metrics_jsonl)) >= 10, what="10 steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == ExitCode.PREEMPTED, (ws / "log1.txt").read_text()[-3000:]

    last_step = read_metrics(paths.metrics_jsonl)[-1]["step"]
    latest = CheckpointStore(paths.checkpoints).latest_verified()
    assert latest.step == last_step, "every completed step is in the preemption checkpoint"
    assert orjson.loads(paths.state.read_bytes())["state"] == "preempted"

    proc = start_train(cfg_file, ws, log=ws / "log2.txt")
    assert proc.wait(timeout=300) == ExitCode.OK
    assert orjson.loads(paths.state.read_bytes())["resumed_from"] == last_step
    assert sha(paths.adapters / "adapters.safetensors") == reference["adapters"]


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "delete-manifest"])
def test_a_corrupt_newest_checkpoint_is_skipped_and_resume_uses_the_previous_one(tmp_path, reference, damage):
    ws = tmp_path
    cfg_file = write_config_file_from(reference["config_file"], ws)
    paths = run_dir_for(cfg_file, ws)
    marker = tmp_path / "fault.txt"
    proc = start_train(cfg_file, ws, log=ws / "log1.txt", FARENSE_FAULT="validation:20",
                       FARENSE_FAULT_MARKER=str(marker))
    wait_for(marker.exists, what="step 20")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    newest = paths.checkpoints / "step-00000016"
    target = newest / ("optimizer.safetensors" if damage != "flip-byte" else "adapters.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip-byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        (newest / "MANIFEST.json").unlink()

    proc = start_train(cfg_file, ws, log=ws / "log2.txt")
    assert proc.wait(timeout=300) == ExitCode.OK
    log = (ws / "log2.txt").read_text()
    assert "skipping checkpoint" in log and "step-00000016" in log
    assert orjson.loads(paths.state.read_bytes())["resumed_from"] == 8
    assert sha(paths.adapters / "adapters.safetensors") == reference["adapters"]


def write_config_file_from(src: Path, ws: Path) -> Path:
    dst = ws / src.name
    dst.write_text(src.read_text())
    return dst
