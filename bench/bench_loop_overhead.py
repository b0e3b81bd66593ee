"""Where the host time of one optimizer step goes, in farense's real loop and beside bare loops over
the same compiled step, in one process on one model (the bench's shapes), so the figures compare.

    python bench/bench_loop_overhead.py --shape small --steps 400

On a GPU, a small model's step is bound by the host: Python and MLX queueing kernels. Then every
microsecond of bookkeeping per step shows in tokens/s, and overlapping it with the device (the
step-ahead loop) cannot hide it. This runs (1) `run_training` as `farense train` does, with each part
of a step timed from outside (farense's code is not changed: its methods and MLX's calls are wrapped
here), (2) the same compiled step in mlx-lm's loop pattern (evaluate and read every step, clear MLX's
cache as `mlx_lm lora` does by default) and (3) the bare step queued one ahead, no bookkeeping. Rows are
medians over the steps after the first tenth. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# part -> seconds spent in it per optimizer step (keyed by the number of steps completed so far)
TIMES: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
STEPS_DONE = [0]


def timed(name: str, fn: Callable, *, counts_step: bool = False) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name][STEPS_DONE[0]] += time.perf_counter() - t0
            if counts_step:
                STEPS_DONE[0] += 1
    return wrapper


def instrument() -> None:
    """Wrap the loop's parts and MLX's queueing calls with timers (this process only)."""
    import mlx.core as mx

    import farense.train.loop as loop

    mx.async_eval = timed("mx.async_eval", mx.async_eval)
    mx.random.seed = timed("mx.random.seed", mx.random.seed)
    loop.TrainingLoop._launch = timed("_launch (queue a step)", loop.TrainingLoop._launch)
    loop.TrainingLoop._complete = timed("_complete (read and book it)", loop.TrainingLoop._complete, counts_step=True)
    loop.TrainingLoop._validate_if_due = timed("_validate_if_due", loop.TrainingLoop._validate_if_due)
    init = loop.TrainingLoop.__init__

    def patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.step_fn = timed("compiled step call (trace lookup)", self.step_fn)
        batches = self.batches

        def timed_batches() -> Any:
            while True:
                t0 = time.perf_counter()
                item = next(batches)
                TIMES["next batch"][STEPS_DONE[0]] += time.perf_counter() - t0
                yield item
        self.batches = timed_batches()
        cb = self.callbacks
        if cb.on_row is not None:
            cb.on_row = timed("on_row (metrics, run state)", cb.on_row)
        self.checkpoints.between_steps = timed("between_steps (disk guard)", self.checkpoints.between_steps)
    loop.TrainingLoop.__init__ = patched_init


def bare_loops(cfg: Any, steps: int, skip: int) -> dict[str, float]:
    """The same compiled step over the same data: mlx-lm's pattern and one-ahead without bookkeeping."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss

    from farense.train.batching import DataPosition, train_batches
    from farense.train.data import validate_data
    from farense.train.loop import make_step
    from farense.train.setup import set_up

    out = {}
    for pattern in ("mlx-lm's loop (eval + read each step, clear cache)", "bare step, one ahead"):
        _, loaded = validate_data(cfg)
        setup = set_up(cfg, loaded, log=lambda m: None)
        step, state = make_step(setup.model, setup.optimizer, 1, default_loss)
        setup.model.train()
        batches = train_batches(setup.train_set, setup.train_groups, seed=1, start=DataPosition(0, 0),
                                max_seq_length=cfg.training.max_seq_length)
        marks, pending = [], None
        for _ in range(steps):
            _, (batch, lengths) = next(batches)
            lvalue, toks, _ = step(batch, lengths, None, True)
            if pattern.startswith("mlx-lm"):
                mx.eval(state, lvalue, toks)
                lvalue.item(), toks.item()
                mx.clear_cache()
            else:
                mx.async_eval(state, lvalue, toks)
                if pending is not None:
                    pending.item()
                pending = lvalue
            marks.append(time.perf_counter())
        intervals = [b - a for a, b in zip(marks[skip:], marks[skip + 1:])]
        out[pattern] = statistics.median(intervals)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=["small", "demo"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--compute", default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farense-bench"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import bench_cuda as bc

    from farense.model.demo import build_demo

    demo = build_demo(a.work / "demo")
    model = Path(demo.model) if a.shape == "demo" else bc.build_random_model(a.work / f"model-{a.shape}",
                                                                              bc.SHAPES[a.shape], Path(demo.model))
    ns = argparse.Namespace(steps=a.steps, batch_size=4, seq_len=128, checkpoint_every=a.steps)
    data = bc.make_data(a.work / "data-128", Path(demo.data), model, 128, n_train=max(a.steps * 4, 32), n_valid=8)
    cfg = bc.farense_config(a.work / "overhead", model, data, ns, 4, compute=a.compute, run_name="overhead")
    skip = max(a.steps // 10, 2)

    instrument()
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics
    from farense.train.runner import run_training

    run_training(cfg, new_run=True, progress_bar=False, log=lambda m: None)
    rows = read_metrics(RunPaths(cfg.run_dir).metrics_jsonl)
    stamps = [r["timestamp"] for r in rows]
    farense_step = statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))
    parts = {k: 1000 * statistics.median(v.get(n, 0.0) for n in range(skip, a.steps - 1)) for k, v in TIMES.items()}
    bare = bare_loops(cfg, a.steps, skip)

    lines = [f"device: {bc.device_description()}", f"model: {a.shape}, compute {a.compute}, {a.steps} steps, "
             f"batch 4 x ~128 tokens; medians after step {skip}", "",
             "| per optimizer step | ms |", "|---|---:|",
             f"| farense's loop: wall interval between steps | {1000 * farense_step:.2f} |"]
    lines += [f"| - {k} | {v:.3f} |" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    lines += [f"| {k}: wall interval | {1000 * v:.2f} |" for k, v in bare.items()]
    ref = bare["bare step, one ahead"]
    lines += ["", f"farense's loop / bare step: {farense_step / ref:.3f}; mlx-lm's pattern / bare step: "
                  f"{bare[next(iter(bare))] / ref:.3f}"]
    report = "\n".join(lines)
    print(report)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
