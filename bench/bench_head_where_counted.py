"""The head only where the loss counts (issue 23, item 2), on the demo model, in one process.

    nice -n 10 python bench/bench_head_where_counted.py [--groups 6] [--rounds 3]

V1 + the demo overlay (mask_prompt on, LoRA on the overlay's last blocks: 8 of 30 when its results were measured, 16 now, 4 examples a micro-batch,
fp32 on the CPU), training.prefix_cache off in set_up so each variant builds its own cache:

1. Exactness: for `--groups` training batches spread from short to long, with LoRA dropout live,
   the loss and every LoRA gradient of (a) the loop's uncached loss (farense.train.losses) on the whole model, (b) the cached
   loss with the whole head, (c) the cached loss with the head on the rows whose loss counts
   (farense.train.prefix_cache.counted_rows); printed as the largest difference (0.0: equal to the last bit).
2. Time: ms per micro-step (value_and_grad, evaluated) for the three, in alternating rounds over the
   same batches, medians; the caches filled before timing. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farense.model.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # before mlx is imported, as farense's command does


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=REPO / ".farense" / "demo")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-check", action="store_true", help="time only")
    a = ap.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from farense.config import load_config
    from farense.train.losses import training_loss
    from farense.train import prefix_cache as pc
    from farense.train.batching import make_batch
    from farense.train.data import validate_data
    from farense.train.setup import set_up

    ws = Path(tempfile.mkdtemp())
    cfg = load_config("v1", overlays=["demo"], workspace=ws).with_overrides(
        model={"path": str(a.demo / "model")}, data={"dir": str(a.demo / "data")},
        training={"prefix_cache": "off"}, lora={"dropout": 0.05})  # dropout live, as V2's
    _, loaded = validate_data(cfg)
    s = set_up(cfg, loaded, lambda line: print("  " + line))
    model, msl = s.model, cfg.training.max_seq_length
    step = max(len(s.train_groups) // a.groups, 1)
    groups = s.train_groups[::step][: a.groups]
    whole = pc.PrefixCache(model, s.train_set, msl)
    cut = pc.PrefixCache(model, s.train_set, msl, head_only_where_counted=True)
    loss = pc.make_cached_loss(whole.first)
    default_loss = training_loss("cpu")  # the loop's uncached loss on the CPU (exp once, as the cached one)
    vg = {"uncached": nn.value_and_grad(model, default_loss), "cached": nn.value_and_grad(model, loss),
          "cached, head where counted": nn.value_and_grad(model, loss)}
    batches = []
    for g in groups:
        tokens, lengths = make_batch(s.train_set, g, msl)
        batches.append({"uncached": (tokens, lengths), "cached": (whole.batch(g, tokens), lengths),
                        "cached, head where counted": (cut.batch(g, tokens), lengths)})
    model.train()
    worst = {k: 0.0 for k in vg}
    for k, b in enumerate([] if a.skip_check else batches):
        ref = None
        for name in vg:
            mx.random.seed(1000 + k)
            (lv, _), grads = vg[name](model, *b[name])
            flat = [lv] + [v for _, v in tree_flatten(grads)]
            mx.eval(flat)
            if ref is None:
                ref = flat
            else:
                worst[name] = max(worst[name], *(mx.abs(x - y).max().item() for x, y in zip(ref, flat)))
    print(f"widths {[b['uncached'][0].shape[1] for b in batches]}; head rows kept "
          f"{[int(b['cached, head where counted'][0][3].sum().item()) for b in batches]}")
    print(f"head positions skipped {cut.head_positions_skipped} of {cut.positions}")
    for name in list(vg)[1:]:
        print(f"max |loss or LoRA gradient diff| against uncached, {name}: {worst[name]}", flush=True)

    times: dict[str, list[float]] = {k: [] for k in vg}
    for r in range(a.rounds):
        order = list(vg) if r % 2 == 0 else list(reversed(vg))
        for name in order:
            for k, b in enumerate(batches):
                mx.random.seed(1000 + k)
                t0 = time.perf_counter()
                (lv, _), grads = vg[name](model, *b[name])
                mx.eval(lv, grads)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["uncached"])
    print("| ms per micro-step (4 examples, value_and_grad, median) | value | uncached / this |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {base / m:.2f} |")


if __name__ == "__main__":
    main()
