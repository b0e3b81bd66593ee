"""Unwritable storage (issue 13, item 5): a read-only output directory is found by a real probe write
before any work starts, and every command meets a read-only workspace with one clear line and a
documented non-zero exit, never a traceback. Read-only bind mounts (root) make it real: mode bits do
not stop root, a read-only mount does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_decision import make_fake_run
from training_fixtures import farense_env, start_train, write_config_file

from farense.cli import main
from farense.codes import ExitCode
from farense.release.promotion import promote
from farense.run.fsutil import write_problem
from farense.run.layout import RunPaths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def read_only():
    """`read_only(dir)`: bind-mount `dir` onto itself read-only until the test ends (skips without root)."""
    mounted: list[Path] = []

    def make(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip(reason="a read-only bind mount needs root")
        for cmd in (["mount", "--bind", str(d), str(d)], ["mount", "-o", "remount,bind,ro", str(d)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                if mounted or cmd[1] != "--bind":
                    subprocess.run(["umount", str(d)], check=False)
                pytest.skip(reason=f"{' '.join(cmd[:3])} failed here: {r.stderr.strip()}")
            if cmd[1] == "--bind":
                mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def one_clear_line(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("farense:")]
    assert len(lines) == 1, err


def test_the_probe_writes_for_real(tmp_path, read_only):
    assert write_problem(tmp_path) is None
    assert write_problem(tmp_path / "not" / "yet") is None  # probed where it would be created
    ro = read_only(tmp_path / "ro")
    assert write_problem(ro) == (ro, "read-only file system")
    assert write_problem(ro / "runs" / "v2") == (ro, "read-only file system")
    assert not any(p.name.startswith(".farense-write-probe") for p in tmp_path.iterdir())


def test_a_probe_swept_away_meanwhile_still_counts_as_written(tmp_path, monkeypatch):
    """Rank 1 probes the checkpoints directory while rank 0, resuming, sweeps the temporary files an
    interrupted write left there: the probe (a temporary name) may vanish between its write and its
    unlink. It was written, so the directory is writable (seen once in a loaded CI run)."""
    import farense.run.fsutil as fsutil

    flush = fsutil._flush_fd

    def flush_then_sweep(fd: int) -> None:
        flush(fd)
        for leftover in tmp_path.iterdir():
            if fsutil.TMP_MARK in leftover.name:
                leftover.unlink()

    monkeypatch.setattr(fsutil, "_flush_fd", flush_then_sweep)
    assert write_problem(tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_preflight_says_which_directory_is_read_only(tmp_path, make_config, read_only, capsys, monkeypatch):
    cfg = make_config(workspace=tmp_path)
    cfg_file = write_config_file(cfg, tmp_path / "exp.toml")
    ckpts = read_only(RunPaths(cfg.run_dir).checkpoints)
    monkeypatch.setenv("FARENSE_WORKSPACE", str(tmp_path))
    rc = main(["--workspace", str(tmp_path), "preflight", str(cfg_file)])
    err = capsys.readouterr().err
    assert rc == ExitCode.BAD_INPUT, err
    one_clear_line(err)
    assert f"{ckpts}: not writable, read-only file system (for its checkpoints)" in err, err
    assert "short" not in err


def test_training_with_a_read_only_checkpoints_dir_stops_before_the_first_step(tmp_path, make_config, read_only):
    """Before: 14 steps trained, then OSError at the first checkpoint write."""
    cfg = make_config(workspace=tmp_path)
    cfg_file = write_config_file(cfg, tmp_path / "exp.toml")
    paths = RunPaths(cfg.run_dir)
    read_only(paths.checkpoints)
    log = tmp_path / "train.log"
    t0 = time.monotonic()
    proc = start_train(cfg_file, tmp_path, log=log)
    assert proc.wait(timeout=120) == ExitCode.BAD_INPUT, log.read_text()
    out = log.read_text()
    one_clear_line(out)
    assert "not writable, read-only file system (for its checkpoints)" in out, out
    assert not paths.metrics_jsonl.exists(), "no step was trained"
    assert time.monotonic() - t0 < 60


@pytest.fixture
def read_only_workspace(tmp_path, make_config, read_only):
    """A workspace with a config, an evaluated run and two releases, then mounted read-only."""
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = make_config(workspace=ws)
    cfg_file = write_config_file(cfg, tmp_path / "exp.toml")  # outside: the config itself stays readable
    prod = ws / "production"
    for name in ("v1", "v2"):
        promote(make_fake_run(ws, name), None, prod, force=True)
    read_only(ws)
    return ws, cfg_file, prod


def run_cli(*argv: str, cwd: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "farense", *argv], cwd=cwd, env=farense_env(), capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("command", ["train", "evaluate", "rollback", "demo-init", "preflight"])
def test_a_read_only_workspace_gives_one_line_and_a_nonzero_exit(read_only_workspace, command):
    ws, cfg_file, prod = read_only_workspace
    argv = {
        "train": ["--workspace", str(ws), "train", str(cfg_file), "--no-progress"],
        "evaluate": ["--workspace", str(ws), "evaluate", str(ws / "runs" / "v2")],
        "rollback": ["--workspace", str(ws), "rollback", "--production", str(prod)],
        "demo-init": ["demo", "init", "--tiny"],
        "preflight": ["--workspace", str(ws), "preflight", str(cfg_file)],
    }[command]
    rc, out = run_cli(*argv, cwd=ws)
    assert rc == ExitCode.BAD_INPUT, out
    one_clear_line(out)
    assert "read-only file system" in out and str(ws) in out, out
