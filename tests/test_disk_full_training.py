"""A real training run on a real, small filesystem that fills up: no checkpoint is corrupt, the run
pauses as "paused: disk full", and after space is freed the resumed run's final adapters are
byte-identical to an undisturbed run's. Needs root to mount a tmpfs; skipped (with the reason)
elsewhere, e.g. on a user's laptop."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import orjson
import pytest

from farense.codes import RunState
from farense.errors import DiskFull
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.train.runner import run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def small_fs(mount_tmpfs):
    """A 12 MiB tmpfs (no reserved blocks, so free space is exact even as root)."""
    return mount_tmpfs("12m")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def fill(fs: Path, leave: int) -> Path:
    """Write a filler file until only `leave` bytes are free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


@pytest.fixture
def undisturbed(make_config, tmp_path):
    cfg = make_config(workspace=tmp_path / "reference")
    run_training(cfg, progress_bar=False)
    return sha(RunPaths(cfg.run_dir).adapters / "adapters.safetensors")


@pytest.mark.parametrize("how", ["guard-flood", "enospc-mid-write"])
def test_disk_fills_during_training_pauses_cleanly_and_resume_is_exact(make_config, small_fs, undisturbed, how):
    cfg = make_config(workspace=small_fs, disk={"reserve": "64KB", "low_free": "1MB", "high_free": "512KB",
                                                "flood_free": "128KB"})
    paths = RunPaths(cfg.run_dir)
    filler: list[Path] = []

    def other_program_fills_the_disk(step, row, model):
        if step == 10 and not filler:
            # Guard case: less than a checkpoint + reserve is left. ENOSPC case: a few KB, with the
            # guard off (another program outran it), so the write itself fails.
            filler.append(fill(small_fs, 300_000 if how == "guard-flood" else 20_000))

    with pytest.raises(DiskFull) as e:
        run_training(cfg, progress_bar=False, on_step_end=other_program_fills_the_disk,
                     guard=None if how == "guard-flood" else False)
    assert "disk full" in str(e.value).lower() or "no space" in str(e.value).lower() or "flood" in str(e.value).lower()

    # Nothing corrupt, nothing half-written, the state says why it stopped.
    store = CheckpointStore(paths.checkpoints)
    assert [i.step for i in store.list()] == [8]
    assert all(store.verify(i)[0] for i in store.list())
    assert not [p for p in paths.checkpoints.iterdir() if ".tmp-" in p.name]
    state = orjson.loads(paths.state.read_bytes())
    assert state["state"] == RunState.PAUSED_DISK_FULL.value

    # Space comes back; the run resumes and ends exactly where an undisturbed one does.
    filler[0].unlink()
    result = run_training(cfg, progress_bar=False)
    assert result.resumed_from == 8 and result.state is RunState.COMPLETED
    assert sha(paths.adapters / "adapters.safetensors") == undisturbed
    shutil.rmtree(paths.root)
