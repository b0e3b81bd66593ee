"""farense.disk.cleanup on real directories: the seed's 333 stale checkpoints, active and stale locks,
leftovers, production, old finished runs, the Hugging Face cache and the CLI's dry-run default."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from farense.disk.cleanup import (
    FINISHED_RUN_EXTRAS,
    HF_CACHE,
    OLD_CHECKPOINT,
    TEMPORARY,
    apply_cleanup,
    plan_cleanup,
)
from farense.run.checkpoint import CheckpointStore
from farense.run.fsutil import allocated_bytes
from farense.run.layout import RunPaths, checkpoint_name

REPO = Path(__file__).resolve().parent.parent
NOW = 1_750_000_000.0
DAY = 86_400.0


# ---------------------------------------------------------------------- helpers


def make_checkpoint(run: Path, step: int, *, size: int = 1000, meta: dict | None = None) -> int:
    """A committed checkpoint in the store's own format (manifest written as the store writes it).

    Returns its bytes on disk (allocated blocks). Written directly, without fsync, to stay fast.
    """
    d = RunPaths(run).checkpoints / checkpoint_name(step)
    d.mkdir(parents=True)
    files = {}
    for name, n in (("adapters.safetensors", size), ("optimizer.safetensors", 2 * size), ("state.json", 50)):
        data = (f"{step}:{name}:".encode() * (n // 8 + 1))[:n]
        (d / name).write_bytes(data)
        files[name] = {"size": n, "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": "farense-checkpoint", "format_version": 1, "step": step, "created_at": NOW,
                "created_at_utc": "2025-06-15T00:00:00+00:00", "meta": meta if meta is not None else {}, "files": files}
    raw = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    (d / "MANIFEST.json").write_bytes(raw)
    return allocated_bytes(d)  # what deleting it frees, as cleanup reports it


def make_run(run: Path, steps: list[int], *, best: int | None, state: str | None = "preempted",
             updated_at: float = NOW, size: int = 1000) -> dict[int, int]:
    """A run with checkpoints at `steps`; every manifest's meta names `best` as the best step."""
    run.mkdir(parents=True, exist_ok=True)
    sizes = {s: make_checkpoint(run, s, size=size, meta={"step": s, "best_step": best, "val_loss": 1.0}) for s in steps}
    if state is not None:
        (run / "run_state.json").write_bytes(orjson.dumps({"state": state, "updated_at": updated_at}))
    return sizes


def steps_on_disk(run: Path) -> list[int]:
    d = RunPaths(run).checkpoints
    return sorted(int(p.name[5:]) for p in d.iterdir() if p.name.startswith("step-") and ".tmp-" not in p.name)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from farense.run.locks import RunLock
    RunLock(sys.argv[1], command="train").acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def hold_lock(run: Path) -> subprocess.Popen:
    """A live second process holding the run's lock, like a trainer."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(RunPaths(run).lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def scratch(tmp_path: Path):
    """A 64 MiB tmpfs when one can be mounted (creating thousands of files on a busy ext4 is slow), else tmp_path."""
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                                              capture_output=True).returncode == 0
    try:
        yield mnt
    finally:
        if ok:
            subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------------- the seed's 333 directories


def test_333_stale_checkpoints_are_cleaned_to_policy(scratch: Path) -> None:
    tmp_path = scratch
    runs = tmp_path / "runs"
    layout = {"v1": (150, 2000), "v2": (120, 4000), "v2-retry": (63, None)}  # 333 directories in all
    sizes: dict[str, dict[int, int]] = {}
    for name, (n, best) in layout.items():
        sizes[name] = make_run(runs / name, [200 * (i + 1) for i in range(n)], best=best)
    assert sum(len(s) for s in sizes.values()) == 333
    assert len(CheckpointStore(runs / "v1" / "checkpoints").list()) == 150  # the store reads our manifests

    plan = plan_cleanup(runs, production_dir=tmp_path / "production", keep_last=3, keep_best=True,
                        older_than_days=30, now=NOW)
    expected_keep = {
        "v1": [2000, 29600, 29800, 30000],
        "v2": [4000, 23600, 23800, 24000],
        "v2-retry": [12200, 12400, 12600],  # no best yet (best_step null): the last three
    }
    assert {r.path.name: list(r.kept_steps) for r in plan.runs} == expected_keep
    assert {i.kind for i in plan.items} == {OLD_CHECKPOINT}
    assert len(plan.items) == 333 - 11
    doomed_bytes = sum(b for name, s in sizes.items() for step, b in s.items() if step not in expected_keep[name])
    assert plan.total_bytes == doomed_bytes

    # The dry run (planning) deleted nothing.
    assert sum(len(steps_on_disk(runs / n)) for n in layout) == 333

    result = apply_cleanup(plan)
    assert result.errors == [] and result.skipped == []
    assert result.bytes_freed == doomed_bytes
    for name, keep in expected_keep.items():
        assert steps_on_disk(runs / name) == keep
        assert not [p for p in (runs / name / "checkpoints").iterdir() if ".tmp-" in p.name]
        assert [i.step for i in CheckpointStore(runs / name / "checkpoints").list()] == keep
    # A second plan finds nothing more to do.
    assert plan_cleanup(runs, keep_last=3, now=NOW).items == []


def test_best_falls_back_to_val_loss_and_unknown_best_keeps_everything(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s, loss in ((100, 2.0), (200, 0.5), (300, 1.0), (400, 1.5), (500, 1.2)):
        make_checkpoint(runs / "losses", s, meta={"val_loss": loss})
    for s in (100, 200, 300, 400, 500):
        make_checkpoint(runs / "nothing", s, meta={"step": s})
    plan = plan_cleanup(runs, keep_last=2, now=NOW)
    kept = {r.path.name: list(r.kept_steps) for r in plan.runs}
    assert kept["losses"] == [200, 400, 500]
    assert kept["nothing"] == [100, 200, 300, 400, 500]
    assert any(s.path.name == "nothing" and "best step unknown" in s.reason for s in plan.skipped)
    assert {i.path.parent.parent.name for i in plan.items} == {"losses"}


def test_damaged_newest_keeps_the_newest_intact_and_unloadable_old_dirs_go(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    make_run(run, [100, 200, 300, 400, 500], best=None)
    (run / "checkpoints" / checkpoint_name(500) / "optimizer.safetensors").write_bytes(b"short")  # truncated
    broken_old = run / "checkpoints" / checkpoint_name(50)
    broken_old.mkdir()
    (broken_old / "adapters.safetensors").write_bytes(b"x" * 300)  # no manifest: never loadable
    broken_new = run / "checkpoints" / checkpoint_name(600)
    broken_new.mkdir()  # newer than every valid one: the trainer deals with it under its lock
    plan = plan_cleanup(run.parent, keep_last=1, now=NOW)
    assert list(plan.runs[0].kept_steps) == [400, 500]
    assert sorted(i.step for i in plan.items) == [50, 100, 200, 300]
    step50 = next(i for i in plan.items if i.step == 50)
    assert step50.bytes == allocated_bytes(step50.path) > 300
    apply_cleanup(plan)
    assert steps_on_disk(run) == [400, 500, 600]


# ---------------------------------------------------------------------- locks


def test_active_run_is_never_touched(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "live", [100, 200, 300, 400], best=None, state="running")
    (runs / "live" / "checkpoints" / "step-00000500.tmp-writing").mkdir()  # the live trainer's write
    make_run(runs / "idle", [100, 200, 300, 400], best=None)
    holder = hold_lock(runs / "live")
    try:
        plan = plan_cleanup(runs, keep_last=1, now=NOW)
        skipped = {s.path.name: s.reason for s in plan.skipped}
        assert skipped["live"].startswith(f"active: locked by pid {holder.pid}") and "(train)" in skipped["live"]
        assert all(i.run != runs / "live" for i in plan.items)
        apply_cleanup(plan)
        assert steps_on_disk(runs / "live") == [100, 200, 300, 400]
        assert (runs / "live" / "checkpoints" / "step-00000500.tmp-writing").is_dir()
        assert steps_on_disk(runs / "idle") == [400]
    finally:
        sigkill(holder)


def test_run_that_becomes_active_after_planning_is_skipped_at_apply(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "r", [100, 200, 300], best=None)
    plan = plan_cleanup(runs, keep_last=1, now=NOW)
    assert len(plan.items) == 2
    holder = hold_lock(runs / "r")
    try:
        result = apply_cleanup(plan)
        assert result.bytes_freed == 0 and result.deleted == []
        assert result.skipped and f"pid {holder.pid}" in result.skipped[0].reason
        assert steps_on_disk(runs / "r") == [100, 200, 300]
    finally:
        sigkill(holder)


def test_stale_lock_of_a_killed_trainer_does_not_block_cleanup(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "crashed", [100, 200, 300], best=None, state="running")
    holder = hold_lock(runs / "crashed")
    sigkill(holder)  # the kernel drops the flock; its record stays in run.lock
    plan = plan_cleanup(runs, keep_last=1, now=NOW)
    assert plan.skipped == []
    assert plan.runs[0].lock is not None and plan.runs[0].lock.stale and plan.runs[0].lock.pid == holder.pid
    result = apply_cleanup(plan)
    assert result.skipped == [] and len(result.deleted) == 2
    assert steps_on_disk(runs / "crashed") == [300]


# ---------------------------------------------------------------------- leftovers, production, old runs


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = runs / "r"
    make_run(run, [100], best=None)
    partial = run / "checkpoints" / "step-00000200.tmp-0123abcd"
    partial.mkdir()
    (partial / "adapters.safetensors").write_bytes(b"p" * 700)
    (run / "run_state.json.tmp-ffff").write_bytes(b"{}")
    (run / "adapters").mkdir()
    (run / "adapters" / ".best-4242.tmp.safetensors").write_bytes(b"b" * 100)
    (run / "adapters" / "adapters.safetensors").write_bytes(b"a" * 100)
    plan = plan_cleanup(runs, keep_last=1, now=NOW)
    temps = {i.path.name: i.bytes for i in plan.items if i.kind == TEMPORARY}
    expected = {p.name: allocated_bytes(p) for p in (partial, run / "run_state.json.tmp-ffff",
                                                     run / "adapters" / ".best-4242.tmp.safetensors")}
    assert temps == expected
    assert apply_cleanup(plan).bytes_freed == sum(expected.values())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000100"]
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["adapters.safetensors"]
    assert (run / "run_state.json").exists()


def test_production_and_what_its_symlinks_point_at_are_untouched(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    prod = tmp_path / "production"
    make_run(runs / "r", [100, 200, 300, 400], best=None)
    rel = prod / "releases" / "20250101-r"
    (rel / "adapters").mkdir(parents=True)
    (rel / "adapters" / "adapters.safetensors").write_bytes(b"w" * 64)
    (prod / "current").symlink_to("releases/20250101-r")
    (prod / "pinned").symlink_to(runs / "r" / "checkpoints" / checkpoint_name(200))  # someone pinned one
    # A production directory inside the runs directory is not a run either.
    (runs / "production-copy").symlink_to(prod)

    plan = plan_cleanup(runs, production_dir=prod, keep_last=1, now=NOW)
    assert sorted(i.step for i in plan.items) == [100, 300]
    assert any(s.path.name == checkpoint_name(200) and s.reason.startswith("production") for s in plan.skipped)
    before = sorted(str(p.relative_to(prod)) for p in prod.rglob("*"))
    apply_cleanup(plan)
    assert steps_on_disk(runs / "r") == [200, 400]
    assert sorted(str(p.relative_to(prod)) for p in prod.rglob("*")) == before
    assert (prod / "current" / "adapters" / "adapters.safetensors").read_bytes() == b"w" * 64


def test_cleanup_never_takes_runs_inside_a_finished_run_as_its_extras(tmp_path: Path) -> None:
    """Issue 13.1: a finished run runs/demo that holds runs/demo/v2 (made before such runs were
    refused) loses its extras, never the inner run."""
    runs = tmp_path / "runs"
    outer, inner = runs / "demo", runs / "demo" / "v2"
    make_run(outer, [10, 20], best=20, state="completed", updated_at=NOW - 40 * DAY)
    make_run(inner, [10, 20], best=20, state="completed", updated_at=NOW)
    for run in (outer, inner):
        (run / "adapters").mkdir()
        (run / "adapters" / "adapters.safetensors").write_bytes(b"a" * 100)
    (outer / "metrics.jsonl").write_bytes(b"{}\n")

    plan = plan_cleanup(runs, keep_last=1, older_than_days=0, now=NOW)
    assert not [i for i in plan.items if i.path == inner or inner in i.path.parents]
    assert any(s.path == inner and "never the extras" in s.reason for s in plan.skipped)
    apply_cleanup(plan)
    assert steps_on_disk(inner) == [10, 20] and (inner / "adapters" / "adapters.safetensors").is_file()
    assert not (outer / "metrics.jsonl").exists()


def test_finished_runs_older_than_n_days_keep_only_adapters_and_summary(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old, recent, no_adapters = runs / "old", runs / "recent", runs / "old-without-adapters"
    for run, age in ((old, 40), (recent, 10), (no_adapters, 40)):
        make_run(run, [100, 200, 300, 400], best=200, state="completed", updated_at=NOW - age * DAY)
        for name in ("training_summary.json", "metrics.jsonl", "training_metrics.json", "training_metrics.csv",
                     "config.json"):
            (run / name).write_bytes(b"{}" * 50)
        (run / "plots").mkdir()
        (run / "plots" / "loss.png").write_bytes(b"p" * 500)
        (run / "evaluation").mkdir()
        (run / "evaluation" / "evaluation_report.json").write_bytes(b"{}")
    for run in (old, recent):
        (run / "adapters").mkdir()
        (run / "adapters" / "adapters.safetensors").write_bytes(b"a" * 100)

    plan = plan_cleanup(runs, keep_last=1, older_than_days=30, now=NOW)
    old_items = [i for i in plan.items if i.run == old]
    assert {i.kind for i in old_items} == {FINISHED_RUN_EXTRAS}
    assert "finished 40 days ago (completed)" in old_items[0].reason
    result = apply_cleanup(plan)
    assert result.errors == []
    assert sorted(p.name for p in old.iterdir()) == [
        "adapters", "checkpoints", "config.json", "evaluation", "run.lock", "run_state.json", "training_summary.json"]
    assert list((old / "checkpoints").iterdir()) == []
    # A recent finished run and one without final adapters follow the ordinary policy.
    assert steps_on_disk(recent) == [200, 400]
    assert steps_on_disk(no_adapters) == [200, 400]
    assert (recent / "metrics.jsonl").exists() and (no_adapters / "plots" / "loss.png").exists()


# ---------------------------------------------------------------------- Hugging Face cache


def make_hf_repo(cache: Path, repo_id: str, size: int) -> Path:
    """A model repo laid out as huggingface_hub caches it (blobs, snapshots symlinks, refs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    data = repo_id.encode() * (size // len(repo_id) + 1)
    data = data[:size]
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return repo


def test_hf_cache_entries_no_config_refers_to(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    used = make_hf_repo(cache, "mlx-community/used-4bit", 4096)
    by_run = make_hf_repo(cache, "org/by-a-run", 4096)
    unused = make_hf_repo(cache, "org/unused", 8192)
    runs = tmp_path / "runs"
    make_run(runs / "r", [100], best=None)
    (runs / "r" / "config.json").write_bytes(orjson.dumps({"model": {"path": "org/by-a-run"}}))

    assert not [i for i in plan_cleanup(runs, now=NOW, hf_cache_dir=cache).items if i.kind == HF_CACHE]
    plan = plan_cleanup(runs, now=NOW, include_hf_cache=True, referenced_models=["mlx-community/used-4bit"],
                        hf_cache_dir=cache)
    hf = [i for i in plan.items if i.kind == HF_CACHE]
    assert [i.path for i in hf] == [unused] and hf[0].bytes >= 8192
    apply_cleanup(plan)
    assert used.is_dir() and by_run.is_dir() and not unused.exists()


# ---------------------------------------------------------------------- speed and the command


def test_planning_thousands_of_checkpoints_is_fast(scratch: Path) -> None:
    runs = scratch / "runs"
    for r in range(4):
        make_run(runs / f"r{r}", list(range(1, 251)), best=125, size=8)
    t0 = time.perf_counter()
    plan = plan_cleanup(runs, keep_last=3, now=NOW)
    elapsed = time.perf_counter() - t0
    assert len(plan.items) == 4 * (250 - 4)
    # About 40 ms here when the machine is idle; bench/bench_cleanup_plan.py times 10,000.
    assert elapsed < 2.0, f"planning 1000 checkpoints took {elapsed:.2f}s"


def farense(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "farense"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)


def test_cli_cleanup_is_a_dry_run_unless_apply(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sizes = make_run(runs / "r", [100, 200, 300, 400, 500], best=200)
    (runs / "r" / "checkpoints" / "step-00000600.tmp-dead").mkdir()
    doomed = sizes[100] + sizes[300] + allocated_bytes(runs / "r" / "checkpoints" / "step-00000600.tmp-dead")

    out = farense("cleanup", "--runs-dir", str(runs), "--keep-last", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dry run" in out.stdout and f"({doomed} bytes)" in out.stdout and "old-checkpoint" in out.stdout
    assert steps_on_disk(runs / "r") == [100, 200, 300, 400, 500]
    assert (runs / "r" / "checkpoints" / "step-00000600.tmp-dead").exists()

    out = farense("cleanup", "--runs-dir", str(runs), "--keep-last", "2", "--apply", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report["dry_run"] is False and report["result"]["bytes_freed"] == doomed
    assert steps_on_disk(runs / "r") == [200, 400, 500]
    assert not (runs / "r" / "checkpoints" / "step-00000600.tmp-dead").exists()


def test_cli_cleanup_takes_the_policy_from_a_config(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    make_run(ws / "runs" / "v1", [100, 200, 300, 400, 500, 600], best=100)  # v1.toml: keep_last 3 + best
    out = farense("--workspace", str(ws), "cleanup", str(REPO / "configs" / "v1.toml"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    assert report["dry_run"] is True and report["result"] is None
    assert report["plan"]["policy"]["keep_last"] == 3
    assert report["plan"]["runs"][0]["kept_steps"] == [100, 400, 500, 600]
    assert steps_on_disk(ws / "runs" / "v1") == [100, 200, 300, 400, 500, 600]


# ---------------------------------------------------------------------- a disk that is already full


@pytest.fixture
def tmpfs_2m(mount_tmpfs):
    """A 2m tmpfs, or a skip that says why there is none."""
    return mount_tmpfs("2m")


def fill(path: Path) -> None:
    """Write until the filesystem refuses (ENOSPC), like the seed's 926 of 926 GB."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28
    finally:
        os.close(fd)


def test_cleanup_frees_space_on_a_disk_that_is_100_percent_full(tmpfs_2m: Path) -> None:
    runs = tmpfs_2m / "runs"
    with_lock, without_lock = runs / "a", runs / "b"
    make_run(with_lock, [100, 200, 300], best=None, size=100_000)
    make_run(without_lock, [100, 200, 300], best=None, size=100_000)
    (with_lock / "run.lock").write_bytes(orjson.dumps({"pid": 999999, "host": "gone"}))  # a dead trainer's
    fill(tmpfs_2m / "filler")
    assert os.statvfs(tmpfs_2m).f_bavail == 0
    plan = plan_cleanup(runs, keep_last=1, now=NOW)
    result = apply_cleanup(plan)
    assert result.errors == [] and len(result.deleted) == 4 and result.bytes_freed == plan.total_bytes
    assert steps_on_disk(with_lock) == [300] and steps_on_disk(without_lock) == [300]
    assert os.statvfs(tmpfs_2m).f_bavail * os.statvfs(tmpfs_2m).f_frsize >= 4 * 300_000


def test_delete_when_even_a_rename_needs_space_removes_the_manifest_first(tmp_path: Path, monkeypatch) -> None:
    import errno

    import farense.disk.cleanup as cleanup_mod

    runs = tmp_path / "runs"
    make_run(runs / "r", [100, 200], best=None)

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cleanup_mod, "_rename", no_space)
    result = apply_cleanup(plan_cleanup(runs, keep_last=1, now=NOW))
    assert result.errors == [] and [i.step for i in result.deleted] == [100]
    assert steps_on_disk(runs / "r") == [200]


def test_cleanup_reports_what_the_filesystem_frees_and_says_what_it_keeps(tmp_path: Path) -> None:
    """Issue 13.10: sizes are allocated blocks (a sparse file's length is not freed space, 4 KB blocks
    are); checkpoints newer than the newest valid one that do not verify, and quarantined ones, are kept
    and the dry run says what and why."""
    runs = tmp_path / "runs"
    run = runs / "r"
    make_run(run, [100, 200], best=100, state="preempted")
    with open(RunPaths(run).checkpoints / "step-00000100" / "sparse.bin", "wb") as f:
        f.truncate(50_000_000)  # 50 MB long, (almost) nothing allocated
    broken = RunPaths(run).checkpoints / "step-00000300"
    broken.mkdir()
    (broken / "adapters.safetensors").write_bytes(b"x" * 5000)  # no manifest: a write that never committed
    q = RunPaths(run).quarantine
    (q / "step-00000400").mkdir(parents=True)
    (q / "step-00000400" / "adapters.safetensors").write_bytes(b"q" * 9000)
    (q / "step-00000400.reason.json").write_bytes(b'{"reason": "sha256 mismatch in adapters.safetensors"}')

    plan = plan_cleanup(runs, keep_last=1, keep_best=False, now=NOW)
    [item] = plan.items
    assert item.step == 100 and item.bytes == allocated_bytes(item.path) < 1_000_000
    kept = {k.path: k.reason for k in plan.kept}
    assert "does not verify (manifest missing)" in kept[broken] and "quarantine" in kept[broken]
    assert "1 checkpoint(s) that failed verification" in kept[q] and "never deletes" in kept[q]
    out = farense("cleanup", "--runs-dir", str(runs), "--keep-last", "1", cwd=tmp_path)
    assert f"kept {broken}: " in out.stdout and f"kept {q}: " in out.stdout
    result = apply_cleanup(plan)
    assert result.bytes_freed == item.bytes and broken.is_dir() and (q / "step-00000400").is_dir()
