"""All-reduce time and bandwidth between the ranks of an NCCL job, beside the LoRA gradients' size.

    mlx.launch --hosts 127.0.0.1 -n 2 --backend nccl -- python bench/nccl_probe.py

(mlx.launch with -n gives rank i GPU i.) Rank 0 prints one line per size: the time of one all_sum,
warm, median of 20, and the algorithm bandwidth (bytes / time).
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx


def main() -> None:
    group = mx.distributed.init()
    for mb in (0.001, 1, 10, 100):
        x = mx.ones((int(mb * 1e6) // 4,), mx.float32)
        mx.eval(x)
        for _ in range(3):
            mx.eval(mx.distributed.all_sum(x))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x))
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        if group.rank() == 0:
            print(f"all_sum of {mb:g} MB over {group.size()} ranks: {dt * 1e3:.3f} ms, {mb / 1e3 / dt:.1f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
