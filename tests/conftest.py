"""Shared fixtures: the repository's configs, small data directories, a stand-in model directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

from farense.model.blas import ensure_fast_blas

# Workers of pytest-xdist (scripts/test.sh) share the machine's cores: their trainings use one OpenBLAS
# thread each, whose threads would otherwise wait for each other on busy cores (farense.model.blas). Set
# before OpenBLAS is loaded below; the `farense` subprocesses inherit it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# As the farense command does, before any test imports mlx: MLX in this process then multiplies
# with the same BLAS as the `farense` subprocesses the tests start.
ensure_fast_blas()

# The machine-wide training lock is the user's: the suite's trainings take one of their own, one per
# pytest-xdist worker, so the workers' trainings (and a user's overnight run) never wait on each other.
# Tests of the lock itself set their own path.
if not os.environ.get("FARENSE_TRAINING_LOCK"):
    _lock_dir = Path(tempfile.mkdtemp(prefix=f"farense-tests-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"))
    os.environ["FARENSE_TRAINING_LOCK"] = str(_lock_dir / "training.lock")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# The longest files, longest first (wall seconds in a 3-worker run on the 2-core machine, FARENSE_TEST_CPU_LOG).
# scripts/test.sh has pytest-xdist hand files out in this order (--no-loadscope-reorder; by default it sorts
# them by their number of tests): started first, their waits on servers, heartbeats and leases overlap the
# rest of the suite instead of ending it. The other files keep pytest's order after them.
LONGEST_FIRST = ("test_deployment_e2e.py", "test_flows.py", "test_pool_e2e.py", "test_distributed.py",
                 "test_real_model.py", "test_resume_exact.py", "test_campaign_workers.py", "test_campaign.py",
                 "test_monitor.py", "test_trainer.py", "test_campaign_halving.py", "test_remote_training.py",
                 "test_property_cli.py", "test_gguf.py", "test_campaign_flow.py", "test_disk_full_training.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """FARENSE_TEST_CPU_LOG=FILE: one JSON line per test with its wall time and the CPU seconds of this
    process and of the processes it reaped (servers, trainers): where the suite's CPU goes, since on
    two cores the suite is CPU-bound. Off unless asked."""
    log = os.environ.get("FARENSE_TEST_CPU_LOG")
    if not log:
        yield
        return
    import resource
    import time

    def cpu(who: int) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    own, kids, wall = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.monotonic()
    yield
    row = {"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
           "start": round(time.time() - (time.monotonic() - wall), 2), "wall": round(time.monotonic() - wall, 2),
           "cpu_self": round(cpu(resource.RUSAGE_SELF) - own, 2),
           "cpu_children": round(cpu(resource.RUSAGE_CHILDREN) - kids, 2)}
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


def _chat_example(i: int) -> dict[str, Any]:
    return {"messages": [
        {"role": "system", "content": "Responde em português."},
        {"role": "user", "content": f"Pergunta {i}?"},
        {"role": "assistant", "content": f"Resposta {i}."},
    ]}


def _write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line; a str row is written as it is (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def chat_example() -> Callable[[int], dict[str, Any]]:
    """A valid chat example numbered i (system, user, assistant)."""
    return _chat_example


@pytest.fixture
def write_jsonl() -> Callable[[Path, Iterable[Any]], Path]:
    """Write rows as JSONL; a str row is written as it is (for malformed lines)."""
    return _write_jsonl


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A valid chat data directory: 8 train, 4 valid, 4 test examples."""
    d = tmp_path / "data"
    _write_jsonl(d / "train.jsonl", (_chat_example(i) for i in range(8)))
    _write_jsonl(d / "valid.jsonl", (_chat_example(i) for i in range(8, 12)))
    _write_jsonl(d / "test.jsonl", (_chat_example(i) for i in range(12, 16)))
    return d


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory that passes the model-path check (config.json and a weights file); not loadable."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    return d


@pytest.fixture
def write_config(tmp_path: Path, model_dir: Path, data_dir: Path) -> Callable[..., Path]:
    """Write a config that extends configs/v1.toml with the local model and data, plus overrides.

    `write_config({"lora": {"rank": 0}})` -> path of exp.toml; `raw=` writes text as it is.
    """
    import tomli_w

    def write(overrides: dict[str, Any] | None = None, *, name: str = "exp", raw: str | None = None) -> Path:
        path = tmp_path / f"{name}.toml"
        if raw is not None:
            path.write_text(raw)
            return path
        doc: dict[str, Any] = {
            "extends": str(CONFIGS / "v1.toml"),
            "name": name,
            "model": {"path": str(model_dir)},
            "data": {"dir": str(data_dir)},
        }
        for sec, values in (overrides or {}).items():
            if isinstance(values, dict):
                doc[sec] = {**doc.get(sec, {}), **values}
            else:
                doc[sec] = values
        path.write_text(tomli_w.dumps(doc))
        return path

    return write


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """`mount_tmpfs("2m")` -> a fresh tmpfs of that size (no reserved blocks, so root sees the same
    limit as anyone), unmounted after the test; a skip that says why where mounting is not allowed."""
    import os
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        if os.geteuid() != 0:
            pytest.skip(reason="mounting a small tmpfs for a real disk-full test needs root")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(reason=f"mount -t tmpfs failed here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# Fixtures for tests that train the demo model (kept in their own module).
pytest_plugins = ["training_fixtures"]
