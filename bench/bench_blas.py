"""MLX CPU fp32 matmul with farense's fast BLAS against MLX's bundled reference BLAS, side by side in one run.

Each measurement runs in its own fresh interpreter (a BLAS is chosen before mlx is imported), the
two kinds alternating round by round; each figure is the best of the rounds. numpy's own OpenBLAS
is measured beside them for reference.

    .venv/bin/python bench/bench_blas.py [--sizes 256 512 1024 2048] [--rounds 3]

Prints a table and the ratios; nothing is asserted (timings belong here, not in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# column -> environment of its processes. OpenBLAS runs one thread per core by default; on a busy
# machine its threads wait for each other, so a single-threaded column shows that case.
MODES = {
    "reference": {"FARENSE_BLAS": "reference"},
    "fast, 1 thread": {"FARENSE_BLAS": "auto", "OPENBLAS_NUM_THREADS": "1"},
    "fast": {"FARENSE_BLAS": "auto"},
}
MIN_SECONDS = 0.5  # per size: repeat the product until this long has passed (at least once)


def best_seconds(matmul, warm) -> float:
    """The fastest of repeated calls, after one call on small operands to warm up the backend."""
    warm()
    best, spent = float("inf"), 0.0
    while spent < MIN_SECONDS:
        t0 = time.perf_counter()
        matmul()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def worker(sizes: list[int]) -> dict:
    """In a fresh interpreter: choose the BLAS as farense does, then time MLX's and numpy's fp32 products."""
    from farense.model.blas import ensure_fast_blas

    info = ensure_fast_blas()
    import mlx.core as mx
    import numpy as np

    mlx_gflops, numpy_gflops = {}, {}
    small = mx.ones((64, 64), dtype=mx.float32)
    for n in sizes:
        a, b = mx.random.normal((n, n), dtype=mx.float32), mx.random.normal((n, n), dtype=mx.float32)
        mx.eval(a, b)
        s = best_seconds(lambda: mx.eval(a @ b), lambda: mx.eval(small @ small))
        mlx_gflops[n] = 2 * n**3 / s / 1e9
        x, y = np.array(a), np.array(b)
        s = best_seconds(lambda: x @ y, lambda: x[:64, :64] @ y[:64, :64])
        numpy_gflops[n] = 2 * n**3 / s / 1e9
    return {"describe": info.describe(), "mlx": mlx_gflops, "numpy": numpy_gflops}


def measure(mode: str, sizes: list[int]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARENSE_BLAS") and k != "OPENBLAS_NUM_THREADS"}
    env.update(MODES[mode])
    out = subprocess.run([sys.executable, __file__, "--worker", "--sizes", *map(str, sizes)], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    doc = json.loads(out.splitlines()[-1])
    return {**doc, "mlx": {int(k): v for k, v in doc["mlx"].items()}, "numpy": {int(k): v for k, v in doc["numpy"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.sizes)))
        return

    best: dict[str, dict] = {}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        order = list(MODES)[r % len(MODES):] + list(MODES)[:r % len(MODES)]  # each column goes first in turn
        for mode in order:
            got = measure(mode, args.sizes)
            keep = best.setdefault(mode, {"describe": got["describe"], "mlx": {}, "numpy": {}})
            for kind in ("mlx", "numpy"):
                for n, v in got[kind].items():
                    keep[kind][n] = max(v, keep[kind].get(n, 0.0))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} before and "
          f"{os.getloadavg()[0]:.1f} after; {args.rounds} rounds, best of each")
    for mode in MODES:
        print(f"  {mode:>14}: {best[mode]['describe']}")
    print("\nMLX CPU fp32 matmul n x n, GFLOP/s (ratio: against the reference BLAS); numpy's own OpenBLAS beside")
    cols = list(MODES)
    print(f"{'n':>6} | " + " | ".join(f"{'MLX ' + c:>20}" for c in cols) + f" | {'ratios':>13} | {'numpy':>6}")
    for n in args.sizes:
        gflops = [best[c]["mlx"][n] for c in cols]
        ratios = " / ".join(f"{g / gflops[0]:.1f}x" for g in gflops[1:])
        numpy = max(best[m]["numpy"][n] for m in MODES)
        print(f"{n:>6} | " + " | ".join(f"{g:>20.1f}" for g in gflops) + f" | {ratios:>13} | {numpy:>6.1f}")


if __name__ == "__main__":
    main()
