"""Data-parallel training on two GPUs of one host through NCCL, measured and broken on purpose.

    python bench/bench_nccl.py --shape 7b --out DIR      # after bench_cuda.py --shape 7b --prepare-only

Every run is a real `farense train` process tree (the launcher, mlx.launch, one rank per GPU):

1. one GPU (`farense train`, no --hosts): the baseline, batch B;
2. two GPUs (`--hosts 127.0.0.1 -n 2 --backend nccl`), batch 2B (B per GPU, weak scaling) run to
   the end: the throughput, and the reference bytes for (4);
3. the same job, with rank 1 SIGKILLed inside a step after the first checkpoint: how long until
   the job stops, its exit code (75: resumable) and its --result-json;
4. the same command again: it resumes from the checkpoint; its adapters, final checkpoint and
   optimizer state must be byte-identical to (2)'s;
5. two GPUs at batch B (strong scaling: the same work per step as (1), split in two).

NCCL_NVLS_ENABLE=0 (NVLink multicast off) is set for every process here, and the launcher forwards
it to every rank. Prints a table; writes results.json and results.md with --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_cuda import (  # noqa: E402
    ENV,
    QUANT,
    SHAPES,
    build_random_model,
    device_description,
    farense_config,
    make_data,
    median_interval_rate,
    publish,
)

NCCL_ENV = {**ENV, "NCCL_NVLS_ENABLE": "0"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors_digest(path: Path) -> str:
    """The optimizer state's tensors (their bytes), independent of the file's key order."""
    import mlx.core as mx
    import numpy as np

    h = hashlib.sha256()
    for k, v in sorted(mx.load(str(path)).items()):
        h.update(k.encode())
        h.update(np.asarray(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v).tobytes())
    return h.hexdigest()


def write_config(cfg: Any) -> Path:
    from farense.config import config_to_toml

    ws = Path(cfg.workspace)
    ws.mkdir(parents=True, exist_ok=True)
    f = ws / f"{cfg.run_name}.toml"
    f.write_text(config_to_toml(cfg))
    return f


BACKEND = "nccl"


def train(cfg: Any, log: Path, *, gpus: int, port: int, rank_timeout: float, new_run: bool,
          env: dict[str, str] | None = None, kill_rank_at: int | None = None, timeout: float = 600) -> dict[str, Any]:
    """One `farense train` job; with kill_rank_at, rank 1 is SIGKILLed inside that step."""
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics

    f = write_config(cfg)
    ws = Path(cfg.workspace)
    argv = [sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(f), "--no-progress",
            "--result-json", str(ws / "result.json")]
    if new_run:
        argv.append("--new-run")
    run_env = {**NCCL_ENV, **(env or {})}
    if gpus > 1:
        argv += ["--hosts", "127.0.0.1", "-n", str(gpus), "--backend", BACKEND, "--port", str(port),
                 "--rank-timeout", str(rank_timeout)]
    else:
        run_env["CUDA_VISIBLE_DEVICES"] = "0"
    marker = ws / "fault.txt"
    marker.unlink(missing_ok=True)
    (ws / "result.json").unlink(missing_ok=True)
    if kill_rank_at is not None:
        run_env.update(FARENSE_FAULT=f"step:{kill_rank_at}", FARENSE_FAULT_RANK="1", FARENSE_FAULT_MARKER=str(marker))
    t0 = time.perf_counter()
    killed_at = None
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, env=run_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        while p.poll() is None:
            if kill_rank_at is not None and killed_at is None and marker.exists():
                pid = int(marker.read_text().split(":")[2])
                os.kill(pid, signal.SIGKILL)
                killed_at = time.perf_counter()
            if time.perf_counter() - t0 > timeout:
                p.kill()
                p.wait()
                raise SystemExit(f"the job did not end in {timeout:.0f} s: see {log}")
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    paths = RunPaths(cfg.run_dir)
    rows = read_metrics(paths.metrics_jsonl)
    try:
        result = json.loads((ws / "result.json").read_text())
    except (OSError, ValueError):
        result = {}
    out: dict[str, Any] = {"exit_code": p.returncode, "wall_s": wall, "result": result, "rows": len(rows)}
    if killed_at is not None:
        out["stopped_after_kill_s"] = wall - (killed_at - t0)
    if rows:
        skip = max(2, len(rows) // 10)
        steady = [r for r in rows[skip:] if r.get("tokens_per_second")]
        if steady:
            out["tokens_per_s_median_step"] = statistics.median(r["tokens_per_second"] for r in steady)
            out["tokens_per_s_wall_interval"] = median_interval_rate([r["timestamp"] for r in rows],
                                                                     [r["tokens"] for r in rows], skip)
            out["peak_memory_gb_rank0"] = max(r.get("peak_memory_gb", 0) for r in rows)
    if p.returncode == 0:
        last = paths.checkpoints / f"step-{cfg.training.iters:08d}"
        out["digests"] = {"adapters": sha(paths.adapters / "adapters.safetensors"),
                          "final_checkpoint_adapters": sha(last / "adapters.safetensors"),
                          "final_checkpoint_optimizer": tensors_digest(last / "optimizer.safetensors")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["demo", *SHAPES], default="7b")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4, help="Per GPU (weak scaling: 2 GPUs take twice the batch).")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--compute", default="auto")
    ap.add_argument("--rank-timeout", type=float, default=20.0)
    ap.add_argument("--skip-strong", action="store_true", help="No 2-GPU run at the 1-GPU batch.")
    ap.add_argument("--backend", default="nccl", help="nccl (GPUs); ring tries this script on a CPU")
    ap.add_argument("--steps-ahead", type=int, help="FARENSE_STEPS_AHEAD for every run (default: farense's).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farense-bench"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    global BACKEND
    BACKEND = a.backend
    if a.steps_ahead is not None:
        NCCL_ENV["FARENSE_STEPS_AHEAD"] = str(a.steps_ahead)

    from farense.model.demo import build_demo

    demo = build_demo(a.work / "demo")
    if a.shape == "demo":
        model, label = Path(demo.model), "demo (Mistral architecture, 4 layers, hidden 128, fp32)"
    else:
        model = build_random_model(a.work / f"model-{a.shape}", SHAPES[a.shape], Path(demo.model))
        label = (f"{a.shape}-shaped Mistral, random weights, {QUANT['bits']}-bit (group {QUANT['group_size']}), "
                 f"{SHAPES[a.shape]['num_hidden_layers']} layers, hidden {SHAPES[a.shape]['hidden_size']}")
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    data = make_data(a.work / f"data-{a.seq_len}-nccl", Path(demo.data), model, a.seq_len,
                     n_train=max(a.steps * 2 * a.batch_size, 16 * a.batch_size), n_valid=4 * a.batch_size)
    device = device_description()
    try:
        gpu_names = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu_names = "none (no nvidia-smi)"

    def cfg(ws: str, batch: int) -> Any:
        ns = argparse.Namespace(steps=a.steps, batch_size=batch, seq_len=a.seq_len, checkpoint_every=a.checkpoint_every)
        c = farense_config(a.work / ws, model, data, ns, min(16, n_layers), compute=a.compute, run_name="nccl")
        return c.with_overrides(validation={"every_steps": a.checkpoint_every, "batches": 1})

    port = 32423
    r: dict[str, Any] = {"device": device, "gpus": gpu_names, "model": label, "steps": a.steps,
                         "batch_per_gpu": a.batch_size, "seq_len": a.seq_len, "checkpoint_every": a.checkpoint_every,
                         "rank_timeout_s": a.rank_timeout, "backend": a.backend, "steps_ahead": a.steps_ahead}
    print("1 GPU ...", file=sys.stderr, flush=True)
    r["one_gpu"] = train(cfg("nccl-1", a.batch_size), a.work / "nccl-1.log", gpus=1, port=port,
                         rank_timeout=a.rank_timeout, new_run=True)
    print("2 GPUs, uninterrupted ...", file=sys.stderr, flush=True)
    r["two_gpus"] = train(cfg("nccl-2", 2 * a.batch_size), a.work / "nccl-2.log", gpus=2, port=port + 10,
                          rank_timeout=a.rank_timeout, new_run=True)
    kill_at = a.checkpoint_every + a.checkpoint_every // 2
    print(f"2 GPUs, rank 1 SIGKILLed in step {kill_at} ...", file=sys.stderr, flush=True)
    r["killed"] = train(cfg("nccl-kill", 2 * a.batch_size), a.work / "nccl-kill.log", gpus=2, port=port + 20,
                        rank_timeout=a.rank_timeout, new_run=True, kill_rank_at=kill_at)
    r["killed"]["killed_in_step"] = kill_at
    print("2 GPUs, resumed ...", file=sys.stderr, flush=True)
    r["resumed"] = train(cfg("nccl-kill", 2 * a.batch_size), a.work / "nccl-resume.log", gpus=2, port=port + 30,
                         rank_timeout=a.rank_timeout, new_run=False)
    if not a.skip_strong:
        print("2 GPUs, the 1-GPU batch ...", file=sys.stderr, flush=True)
        r["two_gpus_same_batch"] = train(cfg("nccl-2s", a.batch_size), a.work / "nccl-2s.log", gpus=2,
                                         port=port + 40, rank_timeout=a.rank_timeout, new_run=True)
    publish(r, render(r), a.out)
    if a.out:
        for name in ("nccl-2.log", "nccl-kill.log", "nccl-resume.log"):
            if (a.work / name).exists():
                (a.out / name).write_bytes((a.work / name).read_bytes()[-200_000:])
    return 0


def render(r: dict[str, Any]) -> str:
    one, two = r["one_gpu"], r["two_gpus"]
    k, res = r["killed"], r["resumed"]
    b = r["batch_per_gpu"]
    lines = [f"device: {r['device']}", "GPUs: " + "; ".join(r["gpus"].splitlines()), f"model: {r['model']}",
             f"{r['steps']} optimizer steps, ~{r['seq_len']} tokens per example, checkpoint and validation every "
             f"{r['checkpoint_every']}; {r.get('backend', 'nccl')} backend, NCCL_NVLS_ENABLE=0"
             + (f"; FARENSE_STEPS_AHEAD={r['steps_ahead']}" if r.get("steps_ahead") is not None else ""), "",
             "| | 1 GPU | 2 GPUs | 2 GPUs / 1 GPU |", "|---|---:|---:|---:|"]

    def rate(x: dict[str, Any], key: str) -> str:
        return f"{x[key]:,.0f}" if x.get(key) else "-"

    for key, name in (("tokens_per_s_median_step", "tokens/s, median step"),
                      ("tokens_per_s_wall_interval", "tokens/s, median wall interval between steps")):
        ratio = f"{two[key] / one[key]:.2f}" if two.get(key) and one.get(key) else "-"
        lines.append(f"| {name} (batch {b} per GPU) | {rate(one, key)} | {rate(two, key)} | {ratio} |")
    s = r.get("two_gpus_same_batch")
    if s:
        key = "tokens_per_s_median_step"
        ratio = f"{s[key] / one[key]:.2f}" if s.get(key) and one.get(key) else "-"
        lines.append(f"| tokens/s, median step (global batch {b}: {b // 2} per GPU) | {rate(one, key)} | "
                     f"{rate(s, key)} | {ratio} |")
    lines.append(f"| peak memory, rank 0 (GB) | {one.get('peak_memory_gb_rank0', 0):.2f} | "
                 f"{two.get('peak_memory_gb_rank0', 0):.2f} | - |")
    lines.append(f"| process wall time (s) | {one['wall_s']:.1f} | {two['wall_s']:.1f} | - |")
    same = res.get("digests") and two.get("digests") and res["digests"] == two["digests"]
    lines += ["",
              f"SIGKILL of rank 1 inside step {k['killed_in_step']}: the job stopped "
              f"{k.get('stopped_after_kill_s', float('nan')):.1f} s later (rank time-out {r['rank_timeout_s']:.0f} s), "
              f"exit {k['exit_code']}, state {k['result'].get('state')}, retryable {k['result'].get('retryable')}, "
              f"ranks {k['result'].get('ranks')}.",
              f"The same command again: exit {res['exit_code']}, resumed from step "
              f"{res['result'].get('resumed_from')}, state {res['result'].get('state')}; adapters, final checkpoint "
              f"adapters and optimizer state byte-identical to the uninterrupted 2-GPU run: {'yes' if same else 'NO'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
