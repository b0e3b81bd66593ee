"""farense.run.checkpoint against real files, real fsync, real processes and a real full disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import orjson
import pytest

from farense.errors import CheckpointCorrupt, DiskFull
from farense.run import fsutil
from farense.run.checkpoint import (
    CheckpointInfo,
    CheckpointStore,
    RetentionPolicy,
    read_manifest,
)
from farense.run.layout import MANIFEST_NAME, TMP_MARK, checkpoint_name

REPO = Path(__file__).resolve().parents[1]


class Skips:
    """Collects on_skip reports, the way a trainer's logger would."""

    def __init__(self) -> None:
        self.seen: list[tuple[Path, str]] = []

    def __call__(self, path: Path, reason: str) -> None:
        self.seen.append((path, reason))


@pytest.fixture
def skips() -> Skips:
    return Skips()


@pytest.fixture
def store(tmp_path: Path, skips: Skips) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoints", on_skip=skips)


def weights(seed: int, n: int = 64) -> dict[str, mx.array]:
    mx.random.seed(seed)
    return {"lora_a": mx.random.normal((n, 8)), "lora_b": mx.random.normal((8, n))}


def trainer_writers(seed: int, n: int = 64) -> dict[str, Callable[[Path], None]]:
    """What the trainer passes: safetensors for arrays, JSON for the rest."""
    w = weights(seed, n)
    opt = {k: v * 0.5 for k, v in w.items()}
    return {
        "adapters.safetensors": lambda p: mx.save_safetensors(str(p), w),
        "optimizer.safetensors": lambda p: mx.save_safetensors(str(p), opt),
        "trainer_state.json": lambda p: p.write_bytes(orjson.dumps({"seed": seed, "data_pos": seed * 10})),
    }


def tmp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name) if directory.exists() else []


def steps(infos: list[CheckpointInfo]) -> list[int]:
    return [i.step for i in infos]


# ---------------------------------------------------------------------- round trip


def test_save_list_verify_round_trip(store: CheckpointStore) -> None:
    saved = [store.save(s, trainer_writers(s), {"val_loss": 1.0 / s, "tag": f"s{s}"}) for s in (200, 400, 600)]
    assert steps(store.list()) == [200, 400, 600]
    assert store.list() == saved
    assert tmp_leftovers(store.directory) == []

    info = saved[1]
    assert info is not None and info.path == store.directory / checkpoint_name(400)
    assert info.meta == {"val_loss": 1.0 / 400, "tag": "s400"}
    assert info.files == ("adapters.safetensors", "optimizer.safetensors", "trainer_state.json")
    assert info.size_bytes == sum((info.path / f).stat().st_size for f in info.files)
    assert store.verify(400) == (True, "ok")
    assert store.verify(info) == (True, "ok")
    assert store.latest_verified() == saved[-1]

    loaded = mx.load(str(info.file("adapters.safetensors")))
    for k, v in weights(400).items():
        assert mx.array_equal(loaded[k], v).item()
    assert orjson.loads(info.file("trainer_state.json").read_bytes()) == {"seed": 400, "data_pos": 4000}

    manifest = read_manifest(info.path)
    assert manifest == read_manifest(info.path / MANIFEST_NAME)
    assert manifest["format"] == "farense-checkpoint" and manifest["format_version"] == 1
    assert manifest["step"] == 400 and manifest["meta"] == info.meta
    for name in info.files:
        assert manifest["files"][name] == {
            "size": (info.path / name).stat().st_size,
            "sha256": fsutil.sha256_file(info.path / name),
        }
    assert store.checkpoint_bytes(400) == info.size_bytes
    assert store.checkpoint_bytes(999) is None
    assert store.last_checkpoint_size() == saved[-1].size_bytes


def test_empty_store(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "nothing-yet")
    assert store.list() == []
    assert store.latest_verified() is None
    assert store.last_checkpoint_size() is None
    assert store.prune(RetentionPolicy(1, True), best_step=None) == []
    assert store.remove_temporaries() == 0
    assert store.verify(5) == (False, "checkpoint directory missing")
    assert not store.directory.exists()  # readers never create directories


def test_saving_a_committed_step_again_returns_it_untouched(store: CheckpointStore) -> None:
    first = store.save(200, trainer_writers(1), {"v": 1})
    mtime = (first.path / MANIFEST_NAME).stat().st_mtime_ns
    again = store.save(200, trainer_writers(2), {"v": 2})
    assert again == first
    assert (first.path / MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert tmp_leftovers(store.directory) == []


def test_saving_over_a_corrupt_committed_step_is_refused(store: CheckpointStore) -> None:
    info = store.save(200, trainer_writers(1), {})
    (info.path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointCorrupt, match=r"cannot save step 200: .*already exists and does not verify \(manifest missing\)"):
        store.save(200, trainer_writers(1), {})
    assert tmp_leftovers(store.directory) == []
    assert store.remove(200) is True
    assert store.save(200, trainer_writers(1), {}).step == 200


def test_writer_errors_remove_the_temporary_directory(store: CheckpointStore) -> None:
    store.save(1, trainer_writers(1), {})

    def boom(path: Path) -> None:
        path.write_bytes(b"partial")
        raise RuntimeError("writer exploded")

    with pytest.raises(RuntimeError, match="writer exploded"):
        store.save(2, {"a.bin": boom}, {})
    # mx.save_safetensors appends ".safetensors": a name without it is caught with a hint.
    with pytest.raises(ValueError, match=r"name the file adapters\.safetensors"):
        store.save(2, {"adapters": lambda p: mx.save_safetensors(str(p), weights(2))}, {})
    with pytest.raises(ValueError, match="did not create the file"):
        store.save(2, {"a.bin": lambda p: None}, {})
    with pytest.raises(TypeError, match="JSON-serializable"):
        store.save(2, {"a.bin": lambda p: p.write_bytes(b"x")}, {"bad": object()})
    with pytest.raises(ValueError, match="plain file name"):
        store.save(2, {"../escape": lambda p: p.write_bytes(b"x")}, {})
    with pytest.raises(ValueError, match="plain file name"):
        store.save(2, {MANIFEST_NAME: lambda p: p.write_bytes(b"x")}, {})
    with pytest.raises(ValueError, match="expected at least one"):
        store.save(2, {}, {})
    assert tmp_leftovers(store.directory) == []
    assert steps(store.list()) == [1]


def test_rank_other_than_zero_writes_and_deletes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    called: list[Path] = []
    other = CheckpointStore(directory, rank=1)
    assert other.save(1, {"a.bin": called.append}, {}) is None
    assert called == [] and not directory.exists()

    CheckpointStore(directory).save(1, {"a.bin": lambda p: p.write_bytes(b"x")}, {})
    CheckpointStore(directory).save(2, {"a.bin": lambda p: p.write_bytes(b"y")}, {})
    (directory / f"step-00000003{TMP_MARK}abc").mkdir()
    assert other.prune(RetentionPolicy(1, False), best_step=None) == []
    assert other.remove(1) is False
    assert other.remove_temporaries() == 0
    assert steps(other.list()) == [1, 2] and other.latest_verified().step == 2  # reading is fine
    assert tmp_leftovers(directory) == [f"step-00000003{TMP_MARK}abc"]


# ---------------------------------------------------------------------- corruption


def truncate(info: CheckpointInfo) -> str:
    p = info.path / "optimizer.safetensors"
    size = p.stat().st_size
    os.truncate(p, size - 10)
    return f"optimizer.safetensors: size {size - 10} != manifest {size}"


def flip_middle_byte(info: CheckpointInfo) -> str:
    p = info.path / "adapters.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return "sha256 mismatch in adapters.safetensors"


def delete_manifest(info: CheckpointInfo) -> str:
    (info.path / MANIFEST_NAME).unlink()
    return "manifest missing"


def garble_manifest(info: CheckpointInfo) -> str:
    p = info.path / MANIFEST_NAME
    p.write_bytes(p.read_bytes()[:-40])
    return "manifest is not valid JSON"


def add_extra_file(info: CheckpointInfo) -> str:
    (info.path / "stray.bin").write_bytes(b"?")
    return "unexpected file stray.bin (not in manifest)"


def delete_a_file(info: CheckpointInfo) -> str:
    (info.path / "trainer_state.json").unlink()
    return "missing file trainer_state.json"


def wrong_step_in_manifest(info: CheckpointInfo) -> str:
    p = info.path / MANIFEST_NAME
    m = orjson.loads(p.read_bytes())
    m["step"] = 1
    p.write_bytes(orjson.dumps(m))
    return "manifest step 1 != directory step 400"


@pytest.mark.parametrize(
    ("damage", "listed"),
    [
        (truncate, True),
        (flip_middle_byte, True),
        (delete_manifest, False),
        (garble_manifest, False),
        (add_extra_file, True),
        (delete_a_file, True),
        (wrong_step_in_manifest, False),
    ],
)
def test_corrupt_checkpoints_are_skipped_with_a_reason(
    store: CheckpointStore, skips: Skips, damage: Callable[[CheckpointInfo], str], listed: bool
) -> None:
    good = store.save(200, trainer_writers(200), {"n": 200})
    bad = store.save(400, trainer_writers(400), {"n": 400})
    expected = damage(bad)

    ok, reason = store.verify(bad)
    assert not ok and expected in reason
    assert store.latest_verified() == good
    assert skips.seen == [(bad.path, reason)]
    assert steps(store.list()) == ([200, 400] if listed else [200])
    if not listed:
        with pytest.raises(CheckpointCorrupt):
            read_manifest(bad.path)


def test_hidden_os_files_do_not_make_a_checkpoint_bad(store: CheckpointStore) -> None:
    info = store.save(1, trainer_writers(1), {})
    (info.path / ".DS_Store").write_bytes(b"finder was here")
    assert store.verify(info) == (True, "ok")


def test_required_files_must_be_in_the_manifest(tmp_path: Path, skips: Skips) -> None:
    plain = CheckpointStore(tmp_path / "ck")
    plain.save(1, trainer_writers(1), {})
    plain.save(2, {"adapters.safetensors": lambda p: mx.save_safetensors(str(p), weights(2))}, {})
    strict = CheckpointStore(tmp_path / "ck", required_files=["optimizer.safetensors"], on_skip=skips)
    assert strict.verify(2) == (False, "required file optimizer.safetensors not in manifest")
    assert strict.latest_verified().step == 1
    assert [r for _, r in skips.seen] == ["required file optimizer.safetensors not in manifest"]


def test_temporary_directories_are_never_read(store: CheckpointStore) -> None:
    info = store.save(1, trainer_writers(1), {})
    # A write that completed its manifest but died before the rename looks like this:
    shutil.copytree(info.path, store.directory / f"{checkpoint_name(2)}{TMP_MARK}deadbeef")
    assert steps(store.list()) == [1]
    assert store.latest_verified().step == 1
    freed = store.remove_temporaries()
    assert freed == info.size_bytes + (info.path / MANIFEST_NAME).stat().st_size
    assert tmp_leftovers(store.directory) == []


# ---------------------------------------------------------------------- crash mid-write

CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from farense.run.checkpoint import CheckpointStore

    store = CheckpointStore(Path(sys.argv[1]))
    store.save(100, {"state.bin": lambda p: p.write_bytes(b"committed" * 1000)}, {"ok": True})

    def slow_writer(path):
        with open(path, "wb") as f:
            for i in range(100_000):
                f.write(b"\\0" * (256 * 1024))
                f.flush()
                if i == 8:
                    print("WRITING", flush=True)
                time.sleep(0.005)

    store.save(200, {"state.bin": slow_writer}, {})
    print("FINISHED", flush=True)
    """
)


def test_sigkill_mid_write_leaves_the_previous_checkpoint(tmp_path: Path, skips: Skips) -> None:
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(directory)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", f"child did not start writing: {line!r}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    leftover = tmp_leftovers(directory)
    assert len(leftover) == 1 and leftover[0].startswith(checkpoint_name(200) + TMP_MARK)
    partial = fsutil.dir_size(directory / leftover[0])
    assert partial >= 9 * 256 * 1024

    store = CheckpointStore(directory, on_skip=skips)
    assert steps(store.list()) == [100]
    latest = store.latest_verified()
    assert latest is not None and latest.step == 100 and latest.meta == {"ok": True}
    assert skips.seen == []  # a temporary directory is not a checkpoint: nothing to skip
    assert store.remove_temporaries() == partial
    assert tmp_leftovers(directory) == []
    assert store.verify(100) == (True, "ok")
    # Resuming writes step 200 again, normally.
    assert store.save(200, {"state.bin": lambda p: p.write_bytes(b"again")}, {}).step == 200


# ---------------------------------------------------------------------- retention


def save_simple(store: CheckpointStore, step: int) -> CheckpointInfo:
    return store.save(step, {"state.bin": lambda p: p.write_bytes(step.to_bytes(4, "big") * 256)}, {"step": step})


def test_retention_keeps_last_n_and_the_best(store: CheckpointStore) -> None:
    policy = RetentionPolicy(keep_last=2, keep_best=True)
    deleted_all = []
    for step in range(100, 800, 100):
        save_simple(store, step)
        deleted_all += steps(store.prune(policy, best_step=200))  # after save returned: never before
    assert steps(store.list()) == [200, 600, 700]
    assert sorted(deleted_all) == [100, 300, 400, 500]
    assert tmp_leftovers(store.directory) == []
    assert all(store.verify(i)[0] for i in store.list())


def test_retention_without_keep_best_and_with_protect(store: CheckpointStore) -> None:
    for step in range(100, 700, 100):
        save_simple(store, step)
    deleted = store.prune(RetentionPolicy(keep_last=2, keep_best=False), best_step=200, protect=[300])
    assert steps(deleted) == [100, 200, 400]
    assert steps(store.list()) == [300, 500, 600]


def test_prune_to_minimum(store: CheckpointStore) -> None:
    for step in range(100, 700, 100):
        save_simple(store, step)
    deleted = store.prune_to_minimum(best_step=200, protect=[400])
    assert steps(deleted) == [100, 300, 500]
    assert steps(store.list()) == [200, 400, 600]
    assert store.prune_to_minimum(None) and steps(store.list()) == [600]


def test_prune_never_deletes_the_last_good_checkpoint(store: CheckpointStore) -> None:
    for step in (100, 200, 300):
        save_simple(store, step)
    flip = store.directory / checkpoint_name(300) / "state.bin"
    flip.write_bytes(b"\xff" + flip.read_bytes()[1:])
    store.prune(RetentionPolicy(keep_last=1, keep_best=False), best_step=None)
    assert steps(store.list()) == [200, 300]  # 300 is the latest, 200 the newest that verifies
    assert store.latest_verified().step == 200


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True, "3"])
def test_retention_policy_validates_keep_last(keep_last: object) -> None:
    with pytest.raises(ValueError, match=r"keep_last: expected an integer >= 1 \(the latest checkpoint is always kept\), got"):
        RetentionPolicy(keep_last=keep_last, keep_best=True)  # type: ignore[arg-type]


def test_retention_policy_validates_keep_best() -> None:
    with pytest.raises(ValueError, match="keep_best: expected true or false, got 'yes'"):
        RetentionPolicy(keep_last=1, keep_best="yes")  # type: ignore[arg-type]
    assert RetentionPolicy(keep_last=1, keep_best=False).keep_last == 1


# ---------------------------------------------------------------------- full disk


@pytest.fixture
def small_tmpfs(mount_tmpfs):
    """A 2m tmpfs, or a skip that says why there is none."""
    return mount_tmpfs("2m")


def test_disk_full_raises_diskfull_and_keeps_the_previous_checkpoint(small_tmpfs: Path) -> None:
    store = CheckpointStore(small_tmpfs / "checkpoints")
    first = store.save(100, trainer_writers(100, n=2048), {})  # ~130 KiB

    def too_big(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(os.urandom(4 << 20))

    with pytest.raises(DiskFull) as info:
        store.save(200, {"state.bin": too_big}, {})
    message = str(info.value)
    assert "step 200" in message and str(store.directory) in message and "No space left on device" in message
    assert info.value.retryable
    assert tmp_leftovers(store.directory) == []
    assert store.verify(first) == (True, "ok")
    assert store.latest_verified() == first

    # mx.save_safetensors reports a full disk as a RuntimeError without errno: still DiskFull.
    big = {"w": mx.zeros((1024, 1024))}  # 4 MiB
    with pytest.raises(DiskFull, match="step 300"):
        store.save(300, {"adapters.safetensors": lambda p: mx.save_safetensors(str(p), big)}, {})
    assert tmp_leftovers(store.directory) == []
    assert store.latest_verified() == first

    # Resumable: once the write fits, saving works again.
    assert store.save(200, trainer_writers(200), {}).step == 200
    assert steps(store.list()) == [100, 200]
