"""The frozen-prefix cache (farense.train.prefix_cache, issue 23) against the uncached step, side by side
in one process on the demo model (SmolLM2-135M-Instruct, LoRA on the overlay's last blocks (8 of 30 when its results were measured, 16 now), every linear
layer; V1 + the demo overlay: 4 examples x 2 micro-steps = 8 examples an optimizer step, fp32 on the CPU).

    nice -n 10 python bench/bench_prefix_cache.py [--rounds 3] [--steps 3] [--demo DIR]

1. ms per optimizer step, the compiled step as farense's loop builds it (farense.train.loop.make_step),
   uncached against cached, in alternating rounds over the same batches; the one-time cache fill (the
   prefix over every training batch) timed apart and amortised over the demo's 45 steps.
2. Where a step's time goes (uncompiled, an mx.eval barrier after each part, one micro-batch of 4):
   forward of the frozen prefix; forward + backward of the LoRA blocks; final norm + head + loss
   forward + backward; assembling the cached batch; the optimizer update.

Without the demo model (no package index for `farense demo init`), a random llama of the demo's
shape (hidden 576, 30 layers, 9 / 3 heads, intermediate 1536, vocab 49152) on random tokens of the
demo's lengths. Prints medians and ratios; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farense.model.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # before mlx is imported, as farense's command does

DEMO_STEPS = 45  # V1's optimizer steps in the demo: 2 epochs of 22 batches of 8


def real_setup(demo: Path, ws: Path):
    from farense.config import load_config
    from farense.train.data import validate_data
    from farense.train.setup import set_up

    cfg = load_config("v1", overlays=["demo"], workspace=ws).with_overrides(
        model={"path": str(demo / "model")}, data={"dir": str(demo / "data")})
    _, loaded = validate_data(cfg)
    return cfg, set_up(cfg, loaded, lambda line: print("  " + line))


def random_setup(ws: Path):
    """The demo's shape with random weights and random tokens (the fallback)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import llama

    from farense.train.batching import batch_groups
    from farense.config import load_config
    from farense.train.setup import Setup, attach_adapters, build_optimizer, plan_total_steps

    cfg = load_config("v1", overlays=["demo"], workspace=ws)
    args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                           num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                           tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 49152, int(n)).tolist(), 30) for n in rng.integers(60, 140, 180)]
    attach_adapters(model, cfg)
    groups = batch_groups([len(d[0]) for d in data], cfg.training.batch_size)
    total = plan_total_steps(cfg, len(groups))
    opt = build_optimizer(cfg, total)
    opt.init(model.trainable_parameters())
    return cfg, Setup(model, opt, data, data[:18], groups, groups[:4], total)


# CPU seconds of this process (every thread) beside wall seconds: on a shared machine the wall
# clock also counts the time other processes held the cores, CPU time much less so.
CPU: dict[str, list[float]] = {}


def timed(fn: Callable[[], Any], cpu_key: str | None = None) -> float:
    import mlx.core as mx

    t0, c0 = time.perf_counter(), time.process_time()
    mx.eval(fn())
    if cpu_key:
        CPU.setdefault(cpu_key, []).append(time.process_time() - c0)
    return time.perf_counter() - t0


def main() -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    from farense.train.batching import make_batch, position_of, train_batches
    from farense.train import prefix_cache as pc
    from farense.train.loop import make_step
    from farense.train.progress import step_seed

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per mode per round")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each part in the breakdown")
    ap.add_argument("--demo", type=Path, default=REPO / ".farense" / "demo",
                    help="a demo built by `farense demo init` (default: the repository's .farense/demo)")
    args = ap.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="farense-bench-prefix-"))
    if (args.demo / "model" / "config.json").exists():
        print(f"model: the real demo model under {args.demo}")
        cfg, s = real_setup(args.demo, ws)
    else:
        print("model: random llama of the demo's shape (no demo model found)")
        cfg, s = random_setup(ws)
    t = cfg.training
    model, first, n_layers = s.model, pc.first_adapted_block(s.model), len(s.model.layers)
    print(f"LoRA from block {first} of {n_layers} ({pc.supported(model) or 'supported'}); "
          f"{t.batch_size} examples x {t.grad_accumulation} micro-steps an optimizer step; "
          f"{len(s.train_groups)} batches; mlx {mx.__version__}, device {mx.default_device()}")

    cache = pc.PrefixCache(model, s.train_set, t.max_seq_length, first)
    cached_loss = pc.make_cached_loss(first)
    # The same batches for both modes: the first epoch's order from the start.
    kw = dict(seed=t.seed, start=position_of(0, len(s.train_groups)), max_seq_length=t.max_seq_length)

    # The fill batch by batch: on a shared machine one slow stretch would swamp a single total.
    fill_batches = [timed(lambda g=g: cache.fill([g]), "fill") for g in s.train_groups]
    fill_total = sum(fill_batches)
    fill = statistics.median(fill_batches) * len(fill_batches)
    print(f"cache fill: {fill_total:.1f} s for {len(cache)} examples in {len(fill_batches)} batches (median batch "
          f"{statistics.median(fill_batches):.2f} s, so {fill:.1f} s at the median, the figure used below); "
          f"{cache.nbytes / 1e6:.1f} MB held (estimate {cache.estimate([i for g in s.train_groups for i in g]) / 1e6:.1f} MB)")

    steps = {"uncached": make_step(model, s.optimizer, t.grad_accumulation, default_loss),
             "cached": make_step(model, s.optimizer, t.grad_accumulation, cached_loss)}
    iters = {"uncached": train_batches(s.train_set, s.train_groups, **kw),
             "cached": pc.cached_train_batches(cache, s.train_groups, **kw)}
    tokens_per_step: list[int] = []

    def run(mode: str, n: int, counter: list[int]) -> list[float]:
        step_fn, state = steps[mode]
        out = []
        for _ in range(n):
            counter[0] += 1
            t0, c0 = time.perf_counter(), time.process_time()
            mx.random.seed(step_seed(t.seed, counter[0]))
            grad, ntok = None, 0
            for k in range(t.grad_accumulation):
                _, (batch, lengths) = next(iters[mode])
                lvalue, toks, grad = step_fn(batch, lengths, grad, k == t.grad_accumulation - 1)
                mx.async_eval(state, lvalue, toks, grad)
                ntok += int(toks.item())
            mx.eval(state)
            out.append(time.perf_counter() - t0)
            if counter[0] > 1:
                CPU.setdefault(mode, []).append(time.process_time() - c0)
            if mode == "uncached":
                tokens_per_step.append(ntok)
        return out

    model.train()
    counters = {m: [0] for m in steps}
    for m in steps:  # warm-up: compile both
        run(m, 1, counters[m])
    per_round: dict[str, list[float]] = {m: [] for m in steps}
    every: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(args.rounds):
        order = ["uncached", "cached"] if r % 2 == 0 else ["cached", "uncached"]
        for m in order:
            times = run(m, args.steps, counters[m])
            every[m] += times
            per_round[m].append(statistics.median(times))
        print(f"round {r + 1} ({' then '.join(order)}): " + ", ".join(
            f"{m} {per_round[m][-1] * 1e3:.0f} ms" for m in steps))

    med = {m: statistics.median(every[m]) for m in steps}
    with_fill = med["cached"] + fill / DEMO_STEPS
    print("\n| ms per optimizer step (8 examples), median | value | uncached / this |\n|---|---:|---:|")
    print(f"| uncached (default_loss) | {med['uncached'] * 1e3:.0f} | 1.00 |")
    print(f"| cached, fill excluded | {med['cached'] * 1e3:.0f} | {med['uncached'] / med['cached']:.2f} |")
    print(f"| cached, fill amortised over the demo's {DEMO_STEPS} steps | {with_fill * 1e3:.0f} | "
          f"{med['uncached'] / with_fill:.2f} |")
    print(f"per-round medians: uncached {[round(x * 1e3) for x in per_round['uncached']]}, "
          f"cached {[round(x * 1e3) for x in per_round['cached']]}; ratios "
          f"{[round(u / c, 2) for u, c in zip(per_round['uncached'], per_round['cached'])]}; "
          f"tokens (loss-counted) per step {statistics.median(tokens_per_step):.0f}")
    cpu = {m: statistics.median(CPU[m]) for m in steps}
    cpu_fill = statistics.median(CPU["fill"]) * len(fill_batches)
    print(f"CPU seconds per step (all threads), median: uncached {cpu['uncached']:.2f}, cached {cpu['cached']:.2f} "
          f"(ratio {cpu['uncached'] / cpu['cached']:.2f}); with the fill ({cpu_fill:.1f} CPU s) amortised over "
          f"{DEMO_STEPS} steps {cpu['cached'] + cpu_fill / DEMO_STEPS:.2f} "
          f"(ratio {cpu['uncached'] / (cpu['cached'] + cpu_fill / DEMO_STEPS):.2f})")

    # --- where a step's time goes: one micro-batch, uncompiled, a barrier after each part
    g = s.train_groups[len(s.train_groups) // 2]
    tokens, lengths = make_batch(s.train_set, g, t.max_seq_length)
    inner = model.model
    from mlx_lm.models.base import create_attention_mask

    hidden = cache.batch(g, tokens)[1]
    mask = create_attention_mask(hidden, None)

    def blocks_out() -> mx.array:
        h = hidden
        for layer in inner.layers[first:]:
            h = layer(h, mask, cache=None)
        return h

    h_out = mx.stop_gradient(blocks_out())
    mx.eval(h_out)
    targets = tokens[:, 1:]

    def head_loss(h: mx.array) -> mx.array:
        out = inner.norm(h)
        logits = inner.embed_tokens.as_linear(out) if model.args.tie_word_embeddings else model.lm_head(out)
        steps_ = mx.arange(1, targets.shape[1] + 1)
        m = mx.logical_and(steps_ >= lengths[:, 0:1], steps_ <= lengths[:, 1:])
        return (nn.losses.cross_entropy(logits, targets) * m).astype(mx.float32).sum() / m.sum()

    _, cot = mx.value_and_grad(head_loss)(h_out)
    mx.eval(cot)
    blocks_vg = nn.value_and_grad(model, lambda: (blocks_out() * cot).sum())
    plain_vg = nn.value_and_grad(model, default_loss)
    cached_vg = nn.value_and_grad(model, cached_loss)
    _, grads = cached_vg(model, (tokens, hidden), lengths)
    mx.eval(grads)
    params_before = model.trainable_parameters()
    state_before = s.optimizer.state

    def update() -> Any:
        s.optimizer.update(model, grads)
        return model.trainable_parameters(), s.optimizer.state

    parts: dict[str, Callable[[], Any]] = {
        "prefix forward (blocks 0..first-1, embedding)": lambda: pc.prefix_hidden(model, tokens[:, :-1], first),
        "LoRA blocks forward + backward": lambda: blocks_vg(),
        "norm + head + loss forward + backward": lambda: mx.value_and_grad(head_loss)(h_out),
        "cached batch assembly (hit)": lambda: cache.batch(g, tokens),
        "optimizer update (Adam)": update,
        "whole micro-step, uncached (value_and_grad)": lambda: plain_vg(model, tokens, lengths),
        "whole micro-step, cached (value_and_grad)": lambda: cached_vg(model, (tokens, hidden), lengths),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for rep in range(args.repeats + 1):
        names = list(parts) if rep % 2 == 0 else list(reversed(parts))
        for k in names:
            mx.random.seed(0)
            dt = timed(parts[k], "part:" + k if rep else None)
            if rep:  # the first pass warms up
                times[k].append(dt)
    model.update(params_before)
    s.optimizer.state = state_before
    print(f"\nbreakdown, one micro-batch of {tokens.shape[0]} x {tokens.shape[1]} tokens, uncompiled, "
          f"median of {args.repeats}:\n| part | wall ms | CPU ms |\n|---|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v) * 1e3:.1f} | {statistics.median(CPU['part:' + k]) * 1e3:.1f} |")
    p = {k: statistics.median(v) for k, v in times.items()}
    names = list(p)
    parts_sum = p[names[0]] + p[names[1]] + p[names[2]]
    print(f"prefix share of the uncached micro-step's forward+backward (sum of the three parts): "
          f"{p[names[0]] / parts_sum:.0%}; sum of parts {parts_sum * 1e3:.0f} ms against the whole "
          f"uncached {p[names[5]] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
