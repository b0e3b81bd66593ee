"""`farense status` over a runs directory holding a run in every state, and a production release.

The running run is a real process holding the run lock; the crashed one says "running" in its state
file while its process is dead and nobody holds the lock; the others are as the trainer leaves them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from farense.cli import main
from farense.codes import RunState
from farense.config import config_to_json, load_config
from farense.observe.status import PRODUCTION_HEADERS, RUN_HEADERS, status_report
from farense.run.runstate import write_run_state

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent

_HOLDER = """
import sys, time
from farense.run.locks import RunLock
with RunLock(sys.argv[1] + "/run.lock", command="train"):
    print("holding", flush=True)
    time.sleep(120)
"""


def _run(root: Path, name: str, state: RunState | None, *, steps: int, total: int = 40, pid: int | None = None,
         message: str = "", summary: dict | None = None) -> Path:
    """A run directory as the trainer leaves it in `state` after `steps` steps (validation every 10)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = load_config("v2", overlays=["tiny"], workspace=root)
    (run / "config.json").write_bytes(config_to_json(cfg))
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "train_loss": 3.0 - 0.05 * step, "learning_rate": 2e-4, "tokens_per_second": 900.0,
               "peak_memory_gb": 0.1, "elapsed_seconds": 1.5 * step}
        if step % 10 == 0:
            row.update(val_loss=3.2 - 0.04 * step, gap=0.2, gap_status="MODERADO", patience_left=5)
        rows.append(row)
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    if state is not None:
        fields = {"step": steps, "total_steps": total, "message": message}
        if pid is not None:
            fields["pid"] = pid
        write_run_state(run / "run_state.json", state, **fields)
    if summary is not None:
        (run / "training_summary.json").write_bytes(orjson.dumps(summary))
        (run / "adapters").mkdir()
        (run / "adapters" / "adapters.safetensors").write_bytes(b"\0" * 4096)
    return run


def _release(prod: Path) -> str:
    rid = "20250101T000000Z-v2-abcdef12"
    rel = prod / "releases" / rid
    rel.mkdir(parents=True)
    (rel / "release.json").write_bytes(orjson.dumps({
        "format": "farense.release/1", "id": rid, "created_at": "2025-01-01T00:00:00Z", "run_name": "v2",
        "config_name": "v2", "config_fingerprint": "0123456789abcdef", "previous": None, "forced": False,
        "metrics": {"f1": 0.9412}, "files": {},
    }))
    os.symlink(f"releases/{rid}", prod / "current")
    return rid


@pytest.fixture
def runs(tmp_path):
    """runs/ with one run in every state (two of them one level down, as the demo overlay puts them)."""
    root = tmp_path / "runs"
    live = _run(root, "live", RunState.RUNNING, steps=12)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(live)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "holding"
    write_run_state(live / "run_state.json", RunState.RUNNING, step=12, total_steps=40, pid=holder.pid)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _run(root, "crashed", RunState.RUNNING, steps=15, pid=dead.pid)
    _run(root, "preempted", RunState.PREEMPTED, steps=20, message="preempted by signal 15 after step 20")
    _run(root, "paused", RunState.PAUSED_DISK_FULL, steps=21, message="paused: disk full")
    _run(root, "failed", RunState.FAILED, steps=9, message="step 9: the training loss is nan")
    _run(root / "demo", "v1", RunState.COMPLETED, steps=40,
         summary={"state": "completed", "best_step": 40, "best_val_loss": 1.6, "train_val_gap": 0.12,
                  "gap_status": "BOM"})
    _run(root / "demo", "v2", RunState.EARLY_STOPPED, steps=30, message="early stop at step 30",
         summary={"state": "early-stopped", "best_step": 20, "best_val_loss": 2.4, "train_val_gap": 0.03,
                  "gap_status": "EXCELENTE"})
    _run(root, "fresh", None, steps=0)
    prod = tmp_path / "production"
    rid = _release(prod)
    yield root, prod, rid, holder.pid, dead.pid
    holder.kill()
    holder.wait(30)


def test_status_has_one_row_per_run_in_every_state(runs):
    root, prod, rid, live_pid, dead_pid = runs
    report = status_report(root, prod)
    rows = {r.name: r for r in report.runs}
    assert sorted(rows) == ["crashed", "demo/v1", "demo/v2", "failed", "fresh", "live", "paused", "preempted"]
    expected = {
        "live": ("running", f"running (pid {live_pid})"),
        "crashed": ("crashed", f"crashed (pid {dead_pid} is dead)"),
        "preempted": ("preempted", "preempted (resumable: run `farense train` again)"),
        "paused": ("paused-disk-full", "paused: disk full (resumable once space is freed)"),
        "failed": ("failed", "failed: step 9: the training loss is nan"),
        "demo/v1": ("completed", "completed"),
        "demo/v2": ("early-stopped", "early-stopped: early stop at step 30"),
        "fresh": ("not-started", "not started (no run_state.json yet)"),
    }
    assert {n: (r.state, r.state_detail) for n, r in rows.items()} == expected
    assert [n for n, r in rows.items() if r.running] == ["live"]
    assert set(RunState) - {RunState.NOT_STARTED} == {RunState(r.state) for r in rows.values() if r.state != "not-started"}

    live = rows["live"]
    assert (live.step, live.total_steps, live.config) == (12, 40, "v2")
    assert (live.best_val_loss, live.best_step, live.gap_status) == (pytest.approx(3.2 - 0.4), 10, "MODERADO")
    # A finished run is judged by its summary: the gap at the best step, as the seed reported it.
    v1, v2 = rows["demo/v1"], rows["demo/v2"]
    assert (v1.best_val_loss, v1.best_step, v1.gap_status) == (1.6, 40, "BOM")
    assert (v2.best_val_loss, v2.best_step, v2.gap_status) == (2.4, 20, "EXCELENTE")
    assert rows["failed"].best_val_loss is None and rows["fresh"].step == 0
    assert v1.disk_bytes > 4096 and all(r.last_activity is not None for r in rows.values())

    assert report.production is not None
    assert (report.production.id, report.production.run_name, report.production.f1) == (rid, "v2", 0.9412)


def test_status_command_plain_off_a_terminal_and_json(runs, capsys):
    root, prod, rid, live_pid, dead_pid = runs
    assert main(["status", "--runs-dir", str(root), "--production-dir", str(prod)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\x1b[" not in "".join(lines)
    i = lines.index(f"# runs in {root}")
    assert lines[i + 1].split("\t") == list(RUN_HEADERS)
    table = [line.split("\t") for line in lines[i + 2:i + 10]]
    by_name = {cells[0]: cells for cells in table}
    assert by_name["crashed"][2] == f"crashed (pid {dead_pid} is dead)" and by_name["crashed"][3] == "15/40"
    assert by_name["demo/v1"][4] == "1.6000 @ 40" and by_name["demo/v1"][5] == "BOM"
    assert all(len(c) == len(RUN_HEADERS) for c in table)
    j = lines.index(f"# production ({prod}/current)")
    assert lines[j + 1].split("\t") == list(PRODUCTION_HEADERS) and lines[j + 2].split("\t")[:2] == [rid, "v2"]

    assert main(["status", "--runs-dir", str(root), "--production-dir", str(prod), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["state"] for r in doc["runs"]}["live"] == "running"
    assert doc["production"]["id"] == rid and doc["production"]["f1"] == 0.9412


def test_status_with_nothing_yet(tmp_path, capsys):
    assert main(["status", "--runs-dir", str(tmp_path / "runs"), "--production-dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert f"no runs in {tmp_path / 'runs'}" in out and "nothing promoted yet" in out


def test_status_survives_a_config_that_is_not_an_object_and_names_a_corrupt_run_state(tmp_path, capsys):
    """Issue 13.7: a config.json of `[1,2,3]` crashes nothing; a torn run_state.json reads as corrupt,
    not as "no run_state.json yet"."""
    runs = tmp_path / "runs"
    odd = _run(runs, "odd", RunState.PREEMPTED, steps=5)
    (odd / "config.json").write_bytes(b"[1, 2, 3]")
    torn = _run(runs, "torn", None, steps=5)
    (torn / "run_state.json").write_bytes(b'{"state": "runn')
    fresh = _run(runs, "fresh", None, steps=0)
    assert main(["status", "--runs-dir", str(runs), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert rows["odd"]["state"] == "preempted" and rows["odd"]["config"] is None
    assert rows["torn"]["state"] == "corrupt" and "run_state.json is corrupt" in rows["torn"]["state_detail"]
    assert rows["fresh"]["state_detail"] == "not started (no run_state.json yet)"
