"""Trainer benchmarks, measured side by side in one run on the demo model (CPU here):

1. throughput: farense's trainer vs `mlx_lm lora` on the same model, data and settings;
2. checkpoint cost: time spent in full (fsynced, checksummed) checkpoints at the default
   cadence (every 200 optimizer steps) as a share of wall time, and per checkpoint;
3. resume: from process start to the first resumed step, beside `mlx_lm lora`'s cold start to its
   first step.

    .venv/bin/python bench/bench_trainer.py [--iters 240] [--demo-dir DIR]

Prints a table and the ratios; nothing is asserted (timings belong here, not in tests).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from farense.config import config_to_toml, load_config  # noqa: E402
from farense.model.demo import build_demo  # noqa: E402
from farense.model.gguf import resolve_model_dir  # noqa: E402
from farense.run.layout import RunPaths  # noqa: E402
from farense.run.metrics import read_metrics  # noqa: E402
from farense.run.runstate import read_run_state  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def farense_config(ws: Path, demo: Path, iters: int, every: int):
    cfg = load_config("v2", overlays=["tiny"], workspace=ws)
    return cfg.with_overrides(
        model={"path": str(demo / "model")}, data={"dir": str(demo / "data")},
        training={"iters": iters, "warmup_steps": 0, "schedule": "constant", "max_seq_length": 256},
        validation={"every_steps": iters, "batches": 1},
        checkpoint={"every_steps": every},
    )


def run_farense(cfg, ws: Path, env: dict | None = None) -> tuple[float, list[dict]]:
    ws.mkdir(parents=True, exist_ok=True)
    f = ws / "cfg.toml"
    f.write_text(config_to_toml(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(f), "--no-progress"],
                   check=True, env=env or ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, read_metrics(RunPaths(cfg.run_dir).metrics_jsonl)


# `python -m mlx_lm lora`, but with farense's fast BLAS loaded first (or not, as FARENSE_BLAS says), so
# both tools multiply with the same library.
MLX_LM_LORA = ("import runpy, sys; from farense.model.blas import ensure_fast_blas; ensure_fast_blas(); "
               "sys.argv = ['mlx_lm.lora', *sys.argv[1:]]; runpy.run_module('mlx_lm.lora', run_name='__main__')")


def run_mlx_lm(cfg, ws: Path, iters: int, *, model: str | None = None, env: dict | None = None,
               extra: tuple[str, ...] = ()) -> tuple[float, list[float], float | None]:
    """mlx_lm lora with the same settings; returns wall time, its reported tokens/s, time to first step."""
    t = cfg.training
    cmd = [sys.executable, "-c", MLX_LM_LORA, "--model", model or resolve_model_dir(cfg), "--data", str(cfg.data_dir),
           "--train",
           "--fine-tune-type", cfg.lora.type, "--num-layers", str(cfg.lora.num_layers),
           "--batch-size", str(t.batch_size), "--grad-accumulation-steps", str(t.grad_accumulation),
           "--iters", str(iters * t.grad_accumulation),  # mlx-lm counts micro-batches
           "--learning-rate", str(t.learning_rate), "--max-seq-length", str(t.max_seq_length),
           "--steps-per-report", "1", "--steps-per-eval", str(10**9), "--val-batches", "1",
           "--save-every", str(10**9), "--adapter-path", str(ws / "mlx_lm_adapters"), "--seed", str(t.seed)]
    if t.mask_prompt:
        cmd.append("--mask-prompt")
    cmd += list(extra)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or ENV, text=True, cwd=REPO)
    first = None
    rates = []
    for line in proc.stdout:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # mlx-lm's console colours even into a pipe
        m = re.match(r"\s*(\d+)\s+[\d.]+ [\u25bc\u25b2]\s+([\d,]+)\s+[\d.]+k", line)
        if m:
            if first is None:
                first = time.perf_counter() - t0
            rates.append(float(m.group(2).replace(",", "")))
    proc.wait()
    if proc.returncode:
        raise SystemExit("mlx_lm lora failed")
    return time.perf_counter() - t0, rates, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=400, help="optimizer steps per run")
    ap.add_argument("--demo-dir", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="farense-bench-"))
    demo = args.demo_dir or tmp / "demo"
    build_demo(demo)

    # 1 + 2: farense with checkpoints at the default cadence (200 steps).
    ws = tmp / "farense"
    cfg = farense_config(ws, demo, args.iters, 200)
    wall, rows = run_farense(cfg, ws)
    skip = 10  # the first steps include compilation, as in mlx-lm's first report
    toks = sum(r["tokens"] for r in rows[skip:])
    secs = sum(r["tokens"] / r["tokens_per_second"] for r in rows[skip:] if r.get("tokens_per_second"))
    farense_tps = toks / secs
    ckpt = [r["checkpoint_seconds"] for r in rows if "checkpoint_seconds" in r]
    loop_time = rows[-1]["elapsed_seconds"] + sum(ckpt)

    # mlx-lm on the same settings.
    mwall, rates, mfirst = run_mlx_lm(cfg, tmp / "mlx_lm", args.iters)
    mskip = skip * cfg.training.grad_accumulation  # mlx-lm reports per micro-batch
    mlx_tps = sorted(rates[mskip:])[len(rates[mskip:]) // 2] if len(rates) > mskip else float("nan")
    farense_median = sorted(r["tokens_per_second"] for r in rows[skip:])[len(rows[skip:]) // 2]

    # 3: resume: kill-free, start a process on a run that has a checkpoint and time the first step.
    ws2 = tmp / "resume"
    cfg2 = farense_config(ws2, demo, 40, 20)
    f2 = ws2 / "cfg.toml"
    ws2.mkdir(parents=True, exist_ok=True)
    f2.write_text(config_to_toml(cfg2))
    env = {**ENV, "FARENSE_FAULT": "step:25", "FARENSE_FAULT_MARKER": str(ws2 / "m")}
    p = subprocess.Popen([sys.executable, "-m", "farense", "--workspace", str(ws2), "train", str(f2), "--no-progress"],
                         env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (ws2 / "m").exists():
        time.sleep(0.05)
    p.kill()
    p.wait()
    state_file = RunPaths(cfg2.run_dir).state
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "farense", "--workspace", str(ws2), "train", str(f2), "--no-progress"],
                         env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_first = None
    while p.poll() is None and resume_first is None:
        st = read_run_state(state_file) or {}
        if st.get("pid") == p.pid and st.get("step", 0) > 20:
            resume_first = time.perf_counter() - t0
        time.sleep(0.02)
    p.wait()

    print(f"demo model, {args.iters} optimizer steps (batch {cfg.training.batch_size} x accumulation "
          f"{cfg.training.grad_accumulation}), {os.cpu_count()} CPU cores")
    print(f"{'':38}{'farense':>12}{'mlx_lm lora':>14}")
    print(f"{'tokens/s (median step, after warm-up)':38}{farense_median:12.0f}{mlx_tps:14.0f}")
    print(f"{'tokens/s (farense: total tokens/time)':38}{farense_tps:12.0f}{'':>14}")
    print(f"{'process wall time (s)':38}{wall:12.1f}{mwall:14.1f}")
    print(f"{'start to first step (s)':38}{resume_first or float('nan'):12.2f}{mfirst or float('nan'):14.2f}"
          "   (farense: resuming from a checkpoint; mlx_lm: cold start)")
    print(f"throughput ratio farense / mlx_lm lora: {farense_median / mlx_tps:.3f}")
    print(f"checkpoints at the default cadence: {len(ckpt)} x {sum(ckpt) / max(len(ckpt), 1) * 1000:.1f} ms = "
          f"{100 * sum(ckpt) / loop_time:.2f}% of training-loop time")


if __name__ == "__main__":
    main()
