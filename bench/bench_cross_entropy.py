"""The demo's output head and loss on the CPU, side by side in one process (issue 23: where a step goes).

    python bench/bench_cross_entropy.py [--rows 264] [--repeats 8]

SmolLM2-135M's shape: a tied 49152 x 576 head over `--rows` positions (one micro-batch of 4 demo
examples whose head starts at the first answer: ~264 positions; the answers alone: ~160), forward
and backward of the compiled loss, in alternating order, median and minimum of `--repeats`:

1. the head's matmul alone (sum of the logits);
2. + MLX's cross-entropy (nn.losses.cross_entropy: logsumexp, whose backward computes exp again);
3. + the cross-entropy with exp once (farense.train.losses.cross_entropy_exp_once);
4. 3 on the counted rows only (`--counted` of the rows, default 0.6: the answers under mask_prompt).

MLX's x86-64 wheels compute exp one float at a time, so the cross-entropy over 49152 words costs
more than the head's matmul; prints the ratios. Random weights; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farense.model.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # before mlx is imported, as farense's command does


def main() -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from farense.train.losses import cross_entropy_exp_once

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=264)
    ap.add_argument("--counted", type=float, default=0.6, help="share of the rows whose loss counts")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    vocab, dim = 49152, 576
    weight = mx.random.normal((vocab, dim)) * 0.02
    counted = max(1, int(args.rows * args.counted))
    hidden = {"all": mx.random.normal((args.rows, dim)), "counted": mx.random.normal((counted, dim))}
    targets = {k: mx.random.randint(0, vocab, (v.shape[0],)) for k, v in hidden.items()}
    mx.eval(weight, *hidden.values(), *targets.values())

    def variant(loss, rows):
        fn = mx.compile(mx.value_and_grad(lambda h: loss(h @ weight.T, targets[rows]).sum()))
        return fn, hidden[rows]

    variants = {
        "head matmul only": variant(lambda logits, _t: logits, "all"),
        "head + MLX cross_entropy": variant(nn.losses.cross_entropy, "all"),
        "head + cross_entropy_exp_once": variant(cross_entropy_exp_once, "all"),
        f"head + exp once, counted rows ({counted})": variant(cross_entropy_exp_once, "counted"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn, h in variants.values():
        mx.eval(fn(h))  # compile
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            fn, h = variants[name]
            t0 = time.perf_counter()
            mx.eval(fn(h))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["head + MLX cross_entropy"])
    print(f"mlx {mx.__version__}, {args.rows} positions x {vocab} words x {dim}, forward + backward, "
          f"{args.repeats} repeats in alternating order\n")
    print("| variant | median ms | min ms | MLX cross_entropy / this |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {base / med:.2f} |")


if __name__ == "__main__":
    main()
