"""farense's trainer beside `mlx_lm lora` on the same model, data and settings, on whatever backend
MLX runs on (CUDA through `mlx[cuda13]`, Metal, or the CPU): tokens/s, checkpoint cost, and a
SIGKILL + resume of a real `farense train` process.

    python bench/bench_cuda.py --shape demo            # the tiny demo model (seconds, any machine)
    python bench/bench_cuda.py --shape 7b --steps 20   # Mistral-7B's shape, random 4-bit weights
    python bench/bench_cuda.py --model DIR             # any mlx-lm model directory
    python bench/bench_cuda.py --shape 7b --breakdown 4x512,4x2048   # farense's step in one process, by variant

The 7B-shaped model is built from its config with random weights, quantized to 4 bits layer by
layer (nn.quantize on lazily initialised layers, each evaluated on its own), so no full-precision
copy of the 7B weights ever exists, on the host or on the device; it borrows the demo tokenizer
(its ids are all below the 32768-row embedding). Settings follow the seed's QLoRA runs: LoRA rank 6,
scale 20, dropout 0.08 on q/k/v/o of the last 16 layers, Adam, gradient checkpointing. The loss is
on every token (no prompt mask), so tokens/s counts what is computed, as mlx-lm reports it.

Phases: (1) farense in this process through run_training, checkpointing every --checkpoint-every
steps; (2) `farense train` SIGKILLed mid-step after a checkpoint, then resumed, and its adapters
compared with (1)'s; (3) `python -m mlx_lm lora` with the same settings, and the cost of mlx-lm's
checkpoint (its adapters written twice, as it does at every save). Prints a table and the ratios,
and writes them as JSON and Markdown (--out). Nothing is asserted: timings belong here.

Model FLOPs utilisation (MFU): the FLOPs one optimizer step needs, counted from the model's shape
(`step_flops`), times steps per second (tokens/s by wall interval / tokens per step), over the
device's dense bf16 peak: 989 TFLOP/s for an H100 SXM and an H200 (NVIDIA's datasheets, without
sparsity; `--peak-tflops` for other devices; none is assumed on the CPU). With T tokens in the step
(the real ones, no padding), B sequences of s = T / B tokens, L layers of which the last Lt carry
LoRA (rank r on the `keys`), a layer's frozen projections P (q, k, v, o, gate, up, down; in -> out),
vocabulary V, hidden d, H query heads of size h:

    lin  = sum over P of 2 * in * out                 per token, one layer's frozen matmuls
    lora = sum over keys of 2 * r * (in + out)        per token, one layer's LoRA (A then B)
    att  = 4 * H * h * s * (s + 1) / 2                per sequence and layer: QK^T and PV, causal
                                                      (the positions the mask keeps, not the full s x s)
    head = 2 * d * V                                  per token
    forward   = T * (L * (lin + lora) + head) + B * L * att        every layer, frozen ones included
    recompute = Lt * (T * (lin + lora) + B * att)                  gradient checkpointing: mlx-lm and
                                                                   farense checkpoint every block, and the
                                                                   backward re-runs the trained ones
    backward  = Lt * (T * (lin + 2 * lora) + 2 * B * att) + T * head - T * qkv_in
        input gradients through the trained blocks and the head (one matmul per frozen projection),
        both gradients of each LoRA matrix (input and weight), attention's backward (twice its
        forward); qkv_in: the first trained block's q/k/v input gradient, which feeds nothing
        trainable, so it is not computed. The frozen blocks below the first LoRA block have no backward.
    step = forward + recompute + backward;  MFU = step * steps/s / peak

Element-wise work (norms, RoPE, SiLU, softmax, the loss) is not counted, as is usual. "MFU without
recompute" leaves the recompute term out (the strict model-FLOPs convention; the recompute is work
the device does, so the first figure is the one quoted). For the 7B shape at batch 4 x 512 this is
about 28.8 GFLOP per token, 21.7 without the recompute.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

# Mistral-7B-v0.3's shape (mlx-community/Mistral-7B-Instruct-v0.3-4bit is this, 4-bit, group 64).
SHAPES: dict[str, dict[str, Any]] = {
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768, "rope_theta": 1_000_000.0,
           "max_position_embeddings": 32768},
    # The same code path at a size a laptop CPU trains in seconds (to test the builder anywhere).
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "rope_theta": 10000.0,
              "max_position_embeddings": 4096},
}
QUANT = {"group_size": 64, "bits": 4}
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
# Dense bf16 peak (TFLOP/s, no sparsity) by a name in the device's description: NVIDIA's datasheets (SXM).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0}


def layer_projections(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A llama/Mistral block's linear layers as (in, out) features, from an mlx-lm config.json."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads") or heads
    return {"self_attn.q_proj": (d, heads * hd), "self_attn.k_proj": (d, kv * hd), "self_attn.v_proj": (d, kv * hd),
            "self_attn.o_proj": (heads * hd, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f),
            "mlp.down_proj": (f, d)}


def step_flops(cfg: dict[str, Any], tokens: float, batch: int, trained_layers: int, rank: int,
               keys: list[str], grad_checkpoint: bool = True) -> dict[str, float]:
    """FLOPs of one optimizer step (the formula in the module docstring), by part, and their sum."""
    proj = layer_projections(cfg)
    layers, lt = cfg["num_hidden_layers"], trained_layers
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    s = tokens / batch
    lin = sum(2 * i * o for i, o in proj.values())
    lora = sum(2 * rank * (proj[k][0] + proj[k][1]) for k in keys)
    att = 4 * heads * hd * s * (s + 1) / 2
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    qkv_in = sum(2 * proj[k][0] * (proj[k][1] + (rank if k in keys else 0))
                 for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    forward = tokens * (layers * (lin + lora) + head) + batch * layers * att
    recompute = lt * (tokens * (lin + lora) + batch * att) if grad_checkpoint else 0.0
    backward = lt * (tokens * (lin + 2 * lora) + 2 * batch * att) + tokens * head - (tokens * qkv_in if lt else 0)
    return {"forward": forward, "recompute": recompute, "backward": backward,
            "step": forward + recompute + backward, "per_token": (forward + recompute + backward) / tokens,
            "per_token_without_recompute": (forward + backward) / tokens}


def peak_tflops(device: str, override: float | None) -> float | None:
    """The device's dense bf16 peak: --peak-tflops, else by name (H100, H200); None on the CPU or unknown."""
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)


def add_mfu(figures: dict[str, Any], flops: dict[str, float], peak: float | None) -> dict[str, Any]:
    """MFU (and without the recompute) of a tool's figures, from its tokens/s by wall interval."""
    rate = figures.get("tokens_per_s_wall_interval")
    if peak and rate:
        figures["tflops_per_s"] = rate * flops["per_token"] / 1e12
        figures["mfu_percent"] = 100 * figures["tflops_per_s"] / peak
        figures["mfu_percent_without_recompute"] = 100 * rate * flops["per_token_without_recompute"] / 1e12 / peak
    return figures


# --------------------------------------------------------------------------- the model and the data


def build_random_model(out: Path, shape: dict[str, Any], tokenizer_from: Path, seed: int = 0) -> Path:
    """A Mistral-architecture mlx-lm model directory with random 4-bit weights (idempotent)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.utils import save_model

    marker = out / ".bench-built.json"
    want = {"shape": shape, "quantization": QUANT, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "bfloat16", **shape}
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)  # lazy: no weight exists until evaluated
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=QUANT["group_size"], bits=QUANT["bits"])
    # One layer at a time: its full-precision weights exist only while it is quantized.
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    save_model(out, model)
    (out / "config.json").write_text(json.dumps({**config, "quantization": QUANT, "quantization_config": QUANT},
                                                indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, out / name)
    del model
    gc.collect()
    mx.clear_cache()
    marker.write_text(json.dumps(want))
    print(f"built {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def make_data(out: Path, demo_data: Path, model_dir: Path, seq_len: int, n_train: int, n_valid: int) -> Path:
    """Chat JSONL whose examples are about seq_len tokens: the demo Q&A pairs as one long conversation each."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    pairs = []
    for line in (demo_data / "train.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        pairs.append([m for m in msgs if m["role"] != "system"])
    system = [m for m in json.loads((demo_data / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
              if m["role"] == "system"]
    out.mkdir(parents=True, exist_ok=True)
    k = 0

    def example() -> dict[str, Any]:
        nonlocal k
        msgs = list(system)
        while True:
            nxt = msgs + pairs[k % len(pairs)]
            k += 1
            ids = tok.apply_chat_template(nxt, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids  # transformers 5: a dict
            if len(ids) > seq_len and len(msgs) > len(system):
                k -= 1
                return {"messages": msgs}
            msgs = nxt

    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example(), ensure_ascii=False) + "\n")
    return out


# --------------------------------------------------------------------------- farense


def farense_config(ws: Path, model: Path, data: Path, a: argparse.Namespace, num_layers: int,
                   compute: str = "auto", run_name: str = "bench") -> Any:
    from farense.config import load_config

    return load_config("v2", workspace=ws).with_overrides(
        model={"path": str(model), "quantize_bits": 0, "compute": compute},
        data={"dir": str(data)},
        lora={"rank": 6, "scale": 20.0, "dropout": 0.08, "num_layers": num_layers, "keys": LORA_KEYS,
              "matmul_dtype": a.lora_dtype},
        training={"iters": a.steps, "epochs": 0, "batch_size": a.batch_size, "grad_accumulation": 1,
                  "learning_rate": 1e-5, "schedule": "constant", "warmup_steps": 0, "max_seq_length": a.seq_len,
                  "grad_checkpoint": not a.no_grad_checkpoint, "mask_prompt": False, "seed": 42,
                  "align_tokens": a.align_tokens},
        validation={"every_steps": a.steps, "batches": 1},  # once, at the end (mlx-lm: first and last)
        early_stopping={"patience": 0},
        checkpoint={"every_steps": a.checkpoint_every, "keep_last": 2},
        disk={"low_used_percent": 99.0, "high_used_percent": 99.5, "flood_used_percent": 99.9,
              "low_free": "2GB", "high_free": "1GB", "flood_free": "500MB", "reserve": "100MB"},
        output={"runs_dir": str(ws / "runs"), "run_name": run_name},
    )


def median_interval_rate(times: list[float], tokens: list[float], skip: int) -> float | None:
    """Tokens per second from wall-clock intervals between consecutive steps (everything a step costs
    in the loop: the tool's own bookkeeping included), median over the steps after `skip`."""
    rates = [tok / (t1 - t0) for t0, t1, tok in zip(times[skip:], times[skip + 1:], tokens[skip + 1:]) if t1 > t0]
    return statistics.median(rates) if rates else None


def run_farense_cli(cfg: Any, timeout: float, steps_ahead: int | None = None,
                    profile: Path | None = None) -> dict[str, Any]:
    """`farense train` in its own process (as a person runs it): metrics, phases, wall time, peak memory.
    `steps_ahead`: FARENSE_STEPS_AHEAD for it (None: farense's default); `profile`: run it under
    cProfile, its stats written there."""
    from farense.config import config_to_toml
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics

    ws = Path(cfg.workspace)
    ws.mkdir(parents=True, exist_ok=True)
    f = ws / f"{cfg.run_name}.toml"
    f.write_text(config_to_toml(cfg))
    paths = RunPaths(cfg.run_dir)
    shutil.rmtree(paths.root, ignore_errors=True)
    argv = [sys.executable, *(["-m", "cProfile", "-o", str(profile)] if profile else []),
            "-m", "farense",
            "--workspace", str(ws), "train", str(f), "--no-progress", "--new-run"]
    t0 = time.perf_counter()
    epoch0 = time.time()
    log_lines: list[str] = []
    env = {**ENV, **({"FARENSE_STEPS_AHEAD": str(steps_ahead)} if steps_ahead is not None else {})}
    p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        log_lines.append(f"{time.perf_counter() - t0:8.3f} {line}")
        if time.perf_counter() - t0 > timeout:
            p.kill()
    p.wait()
    wall = time.perf_counter() - t0
    (ws / f"{cfg.run_name}.log").write_text("".join(log_lines))
    if p.returncode != 0:
        raise SystemExit(f"farense train failed (exit {p.returncode}): see {ws / (cfg.run_name + '.log')}")
    rows = read_metrics(paths.metrics_jsonl)
    summary = json.loads(paths.summary.read_text())
    compute = next((ln.split("compute:", 1)[1].strip() for ln in log_lines if " compute: " in ln), "")
    # What lora.matmul_dtype and training.align_tokens chose, as the log says it (one line each)
    lora_matmuls = next((ln.split("LoRA matmuls:", 1)[1].strip() for ln in log_lines if "LoRA matmuls:" in ln), "")
    alignment = next((ln.split("batch alignment:", 1)[1].strip() for ln in log_lines if "batch alignment:" in ln), "")
    phases = dict(summary.get("phase_seconds", {}))
    if summary.get("training_started_at"):  # measured from here: from the moment the process was started
        phases["process_start_to_training"] = summary["training_started_at"] - epoch0
    ckpt = [r["checkpoint_seconds"] for r in rows if "checkpoint_seconds" in r]
    return {"wall_s": wall, "rows": rows, "phases": phases, "compute": compute, "lora_matmuls": lora_matmuls,
            "alignment": alignment,
            "peak_memory_gb": max(r.get("peak_memory_gb", 0) for r in rows), "checkpoint_s": ckpt,
            "adapters_path": str(paths.adapters), "adapters": (paths.adapters / "adapters.safetensors").read_bytes(),
            "val_loss": summary.get("final_val_loss"), "train_losses": [r["train_loss"] for r in rows]}


def farense_figures(fr: dict[str, Any], skip: int) -> dict[str, Any]:
    rows = fr["rows"]
    steady = [r for r in rows[skip:] if r.get("tokens_per_second")]
    return {
        "tokens_per_s_median_step": statistics.median(r["tokens_per_second"] for r in steady),
        "tokens_per_s_wall_interval": median_interval_rate([r["timestamp"] for r in rows],
                                                           [r["tokens"] for r in rows], skip),
        "peak_memory_gb": fr["peak_memory_gb"], "wall_s": fr["wall_s"], "phases": fr["phases"],
        "compute": fr["compute"], "lora_matmuls": fr["lora_matmuls"], "alignment": fr["alignment"],
        "final_train_loss": rows[-1]["train_loss"], "val_loss": fr["val_loss"],
        "checkpoint_s_mean": statistics.mean(fr["checkpoint_s"]) if fr["checkpoint_s"] else None,
        "tokens_per_step": statistics.median(r["tokens"] for r in rows),
    }


def run_farense_in_process(cfg: Any) -> dict[str, Any]:
    import mlx.core as mx

    from farense.run.checkpoint import CheckpointStore
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics
    from farense.train.runner import run_training

    t0 = time.perf_counter()
    res = run_training(cfg, new_run=True, progress_bar=False, log=lambda m: print(f"  farense: {m}", file=sys.stderr))
    wall = time.perf_counter() - t0
    paths = RunPaths(cfg.run_dir)
    rows = read_metrics(paths.metrics_jsonl)
    ckpt = [r["checkpoint_seconds"] for r in rows if "checkpoint_seconds" in r]
    latest = CheckpointStore(paths.checkpoints).list()[-1]
    gc.collect()
    mx.clear_cache()
    return {"state": res.state.value, "wall_s": wall, "rows": rows, "checkpoint_s": ckpt,
            "checkpoint_bytes": latest.size_bytes, "checkpoint_files": list(latest.files),
            "adapters": (paths.adapters / "adapters.safetensors").read_bytes(),
            "final_checkpoint_adapters": (latest.path / "adapters.safetensors").read_bytes(),
            "peak_memory_gb": max(r.get("peak_memory_gb", 0) for r in rows)}


def kill_and_resume(cfg: Any, kill_at: int, timeout: float) -> dict[str, Any]:
    """A real `farense train`, SIGKILLed inside step `kill_at`, then started again until it completes."""
    from farense.config import config_to_toml
    from farense.run.layout import RunPaths
    from farense.run.runstate import read_run_state

    ws = Path(cfg.workspace)
    ws.mkdir(parents=True, exist_ok=True)
    f = ws / "bench.toml"
    f.write_text(config_to_toml(cfg))
    paths = RunPaths(cfg.run_dir)
    shutil.rmtree(paths.root, ignore_errors=True)
    argv = [sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(f), "--no-progress"]
    marker = ws / "fault.txt"
    marker.unlink(missing_ok=True)
    with open(ws / "killed.log", "wb") as log:
        p = subprocess.Popen(argv, env={**ENV, "FARENSE_FAULT": f"step:{kill_at}", "FARENSE_FAULT_MARKER": str(marker)},
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while not marker.exists():
            if p.poll() is not None or time.monotonic() > end:
                p.kill()
                raise SystemExit(f"the run to kill ended before step {kill_at}: see {ws / 'killed.log'}")
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
    t0 = time.perf_counter()
    first_step = None
    with open(ws / "resumed.log", "wb") as log:
        p = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None:
            st = read_run_state(paths.state) or {}
            if first_step is None and st.get("pid") == p.pid and st.get("resumed_from") is not None \
                    and st.get("step", 0) > st["resumed_from"]:
                first_step = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                p.kill()
                raise SystemExit(f"the resumed run did not finish in {timeout:.0f} s: see {ws / 'resumed.log'}")
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    st = read_run_state(paths.state) or {}
    if p.returncode != 0:
        raise SystemExit(f"the resumed run failed (exit {p.returncode}): see {ws / 'resumed.log'}")
    return {"exit_code": p.returncode, "state": st.get("state"), "resumed_from": st.get("resumed_from"),
            "start_to_first_resumed_step_s": first_step, "resume_wall_s": wall,
            "adapters": (paths.adapters / "adapters.safetensors").read_bytes()}


# --------------------------------------------------------------------------- mlx-lm


_MLX_LM_REPORT = re.compile(r"^\s*(\d+)\s+([\d.]+|nan|inf) [\u25bc\u25b2]\s+([\d,]+)\s+[\d.]+k")
_MLX_LM_VAL = re.compile(r"^\s*(\d+)\s+val\s+([\d.]+|nan|inf)\s+([\d.]+)s")
# mlx_lm lora's own main, with its peak memory printed at exit (it reports none per step).
_MLX_LM_MAIN = ("import atexit, os, sys; "
                "os.environ.get('BENCH_SAME_BLAS') and __import__('farense.model.blas').model.blas.ensure_fast_blas(); "
                "import mlx.core as mx; "
                "atexit.register(lambda: print('BENCH-PEAK-MEMORY', mx.get_peak_memory(), flush=True)); "
                "from mlx_lm.lora import main; sys.argv = ['mlx_lm.lora', *sys.argv[1:]]; "
                "__import__('cProfile').run('main()', os.environ['BENCH_PROFILE']) "
                "if os.environ.get('BENCH_PROFILE') else main()")


def run_mlx_lm(cfg: Any, ws: Path, steps: int, timeout: float, same_blas: bool = False,
               profile: Path | None = None) -> dict[str, Any]:
    """`mlx_lm lora` (its own main) with the same settings (YAML config: LoRA keys have no flag);
    every output line is timestamped on arrival, which gives its phases. `same_blas`: MLX's CPU
    backend gets the BLAS farense loads (farense.model.blas, before mlx is imported), so that on the CPU
    the two trainers are compared, not two matmul libraries."""
    import yaml

    t = cfg.training
    ws.mkdir(parents=True, exist_ok=True)
    adapters = ws / "adapters"
    shutil.rmtree(adapters, ignore_errors=True)
    conf = {
        "model": cfg.model_path, "data": str(cfg.data_dir), "train": True, "fine_tune_type": "lora",
        "num_layers": cfg.lora.num_layers, "batch_size": t.batch_size, "iters": steps,
        "grad_accumulation_steps": 1, "learning_rate": t.learning_rate, "max_seq_length": t.max_seq_length,
        "grad_checkpoint": t.grad_checkpoint, "mask_prompt": t.mask_prompt, "optimizer": "adam",
        "steps_per_report": 1, "steps_per_eval": steps, "val_batches": 1, "save_every": cfg.checkpoint.every_steps,
        "adapter_path": str(adapters), "seed": t.seed,
        "lora_parameters": {"rank": cfg.lora.rank, "scale": cfg.lora.scale, "dropout": cfg.lora.dropout,
                            "keys": list(cfg.lora.keys)},
    }
    (ws / "lora.yaml").write_text(yaml.safe_dump(conf))
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    reports: list[tuple[float, int, float, float]] = []  # (arrival, iteration, loss, tokens/s)
    vals: list[tuple[float, float, float]] = []  # (arrival, loss, seconds)
    peak = None
    log_lines: list[str] = []
    p = subprocess.Popen([sys.executable, "-c", _MLX_LM_MAIN, "--config", str(ws / "lora.yaml")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**ENV, "COLUMNS": "200", **({"BENCH_SAME_BLAS": "1"} if same_blas else {}),
                              **({"BENCH_PROFILE": str(profile)} if profile else {})})
    assert p.stdout is not None
    for line in p.stdout:
        now = time.perf_counter() - t0
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # mlx-lm's console colours, even into a pipe
        log_lines.append(f"{now:8.3f} {line}")
        for key in ("Loading pretrained model", "Loading datasets", "Training"):
            if line.strip().startswith(key) and key not in marks:
                marks[key] = now
        m = _MLX_LM_REPORT.match(line)
        if m:
            reports.append((now, int(m.group(1)), float(m.group(2)), float(m.group(3).replace(",", ""))))
        v = _MLX_LM_VAL.match(line)
        if v:
            vals.append((now, float(v.group(2)), float(v.group(3))))
        if line.startswith("BENCH-PEAK-MEMORY"):
            peak = int(line.split()[1]) / 1e9
        if now > timeout:
            p.kill()
    p.wait()
    wall = time.perf_counter() - t0
    (ws / "mlx_lm.log").write_text("".join(log_lines))
    if p.returncode != 0 or not reports:
        raise SystemExit(f"mlx_lm lora failed (exit {p.returncode}, {len(reports)} reports): see {ws / 'mlx_lm.log'}")
    val_first = vals[0][2] if vals else 0.0
    val_last = vals[-1][2] if len(vals) > 1 else 0.0
    first, last = reports[0][0], reports[-1][0]
    phases = {
        "process_start_to_training": marks.get("Loading pretrained model", 0.0),
        "model_load": marks.get("Loading datasets", 0.0) - marks.get("Loading pretrained model", 0.0),
        "data_adapters_optimizer": marks.get("Training", 0.0) - marks.get("Loading datasets", 0.0),
        "validation": val_first + val_last,  # mlx-lm validates before step 1 and before the last step
        "first_step_with_compile": first - marks.get("Training", 0.0) - val_first,
        "steps": last - first - val_last,
        "finish_and_exit": wall - last,
    }
    return {"wall_s": wall, "start_to_first_step_s": first, "rates": [r[3] for r in reports],
            "losses": [r[2] for r in reports], "times": [r[0] for r in reports], "val_loss": vals[-1][1] if vals else None,
            "phases": phases, "peak_memory_gb": peak, **mlx_lm_checkpoint_cost(adapters)}


def mlx_lm_figures(mr: dict[str, Any], skip: int, tokens_per_step: float) -> dict[str, Any]:
    steady = mr["rates"][skip:] or mr["rates"]
    return {"tokens_per_s_median_step": statistics.median(steady),
            "tokens_per_s_wall_interval": median_interval_rate(mr["times"], [tokens_per_step] * len(mr["times"]), skip),
            "peak_memory_gb": mr["peak_memory_gb"], "wall_s": mr["wall_s"], "phases": mr["phases"],
            "final_train_loss": mr["losses"][-1], "val_loss": mr["val_loss"],
            "checkpoint_s": mr["checkpoint_s"], "checkpoint_bytes": mr["checkpoint_bytes"]}


def mlx_lm_checkpoint_cost(adapters: Path, repeats: int = 5) -> dict[str, Any]:
    """mlx-lm's checkpoint is its adapters written twice (adapters.safetensors and NNNNNNN_adapters.safetensors),
    with no optimizer state, no checksum and no fsync: time exactly that, on its own adapters."""
    import mlx.core as mx

    weights = mx.load(str(adapters / "adapters.safetensors"))
    mx.eval(weights)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        mx.save_safetensors(str(adapters / f"bench-{i}-a.safetensors"), weights)
        mx.save_safetensors(str(adapters / f"bench-{i}-b.safetensors"), weights)
        times.append(time.perf_counter() - t0)
    return {"checkpoint_s": statistics.median(times),
            "checkpoint_bytes": (adapters / "adapters.safetensors").stat().st_size}


# --------------------------------------------------------------------------- the report


def device_description() -> str:
    import mlx.core as mx

    backend = "cpu"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        backend = "cuda"
    elif getattr(mx, "metal", None) is not None and mx.metal.is_available():
        backend = "metal"
    name = platform.processor() or platform.machine()
    if backend == "cuda" and shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        name = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else name
    elif backend == "metal":
        name = mx.device_info().get("device_name", name)
    return f"{backend}: {name}; mlx {mx.__version__}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


# --------------------------------------------------------------------------- where the step's time goes


BREAKDOWN_VARIANTS = [
    # name, gradient checkpointing, LoRA matmuls in bf16, LoRA dropout, what is timed
    ("checkpointing, LoRA fp32 (lora.matmul_dtype = float32)", True, False, True, "step"),
    ("no checkpointing", False, False, True, "step"),
    ("LoRA in bf16 (farense's auto on a GPU)", True, True, True, "step"),
    ("LoRA in bf16, no checkpointing", False, True, True, "step"),
    ("no LoRA dropout (diagnostic)", True, False, False, "step"),
    ("forward only (loss, no gradients)", True, False, True, "forward"),
]


def _median_time(fn: Any, warm: int, n: int) -> float:
    import mlx.core as mx

    for _ in range(warm):
        mx.eval(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rates(cfg: dict[str, Any], tokens: int, reps: int = 10) -> dict[str, dict[str, float]]:
    """MLX's bf16 matmul on the step's frozen shapes at `tokens` rows: forward x @ W.T and the input
    gradient g @ W (the two a frozen projection costs), each timed as `reps` queued products."""
    import mlx.core as mx

    shapes = {**layer_projections(cfg), "head": (cfg["hidden_size"], cfg["vocab_size"]),
              "q+k+v fused": (cfg["hidden_size"], sum(layer_projections(cfg)[k][1] for k in LORA_KEYS[:3])),
              "gate+up fused": (cfg["hidden_size"], 2 * cfg["intermediate_size"])}
    out: dict[str, dict[str, float]] = {}
    for name, (i, o) in shapes.items():
        x = (mx.random.normal((tokens, i)) * 0.5).astype(mx.bfloat16)
        w = (mx.random.normal((o, i)) * 0.02).astype(mx.bfloat16)
        g = (mx.random.normal((tokens, o)) * 0.5).astype(mx.bfloat16)
        mx.eval(x, w, g)
        res = {}
        for kind, a, b in (("forward", x, w.T), ("input_grad", g, w)):
            dt = _median_time(lambda a=a, b=b: [a @ b for _ in range(reps)], 1, 3) / reps
            res[f"{kind}_ms"] = dt * 1e3
            res[f"{kind}_tflops"] = 2 * tokens * i * o / dt / 1e12
        out[name] = res
    mx.clear_cache()
    return out


def matmul_floor_ms(rates: dict[str, dict[str, float]], cfg: dict[str, Any], trained: int, gc_on: bool) -> float:
    """The step's frozen matmuls alone at MLX's measured rates (no LoRA, attention or element-wise work)."""
    proj = layer_projections(cfg)
    fwd = sum(rates[k]["forward_ms"] for k in proj)
    bwd = sum(rates[k]["input_grad_ms"] for k in proj)
    qkv = sum(rates[k]["input_grad_ms"] for k in LORA_KEYS[:3])
    return (cfg["num_hidden_layers"] * fwd + (trained * fwd if gc_on else 0) + trained * bwd - qkv
            + rates["head"]["forward_ms"] + rates["head"]["input_grad_ms"])


def breakdown(a: argparse.Namespace, model: Path, data: Path, model_cfg: dict[str, Any], device: str,
              peak: float | None) -> int:
    """farense's own step (its model set-up, adapters, checkpointing switch, optimizer and compiled step) on
    synthetic batches, in this process, under the variants above; and MLX's matmul rate on the step's shapes."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.trainer import default_loss

    from farense.train.loop import make_step
    from farense.train.setup import (
        attach_adapters,
        build_optimizer,
        load_base_model,
        set_grad_checkpoint,
        set_lora_matmul_dtype,
    )

    sizes = [tuple(int(v) for v in sz.split("x")) for sz in a.breakdown.split(",")]
    layers = min(16, model_cfg["num_hidden_layers"])
    biggest = max(sizes, key=lambda bs: bs[0] * bs[1])
    a.batch_size, a.seq_len = biggest  # the compute choice plans for the largest step
    cfg = farense_config(a.work / "breakdown", model, data, a, layers)
    t0 = time.perf_counter()
    m, _ = load_base_model(cfg, log=lambda msg: print(f"  farense: {msg}", file=sys.stderr))
    attach_adapters(m, cfg)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    layer_type = type(m.layers[0])
    results: dict[str, Any] = {"device": device, "sizes": [], "peak_bf16_tflops": peak}
    for batch, seq in sizes:
        tokens = batch * seq
        mx.random.seed(0)
        x = mx.random.randint(3, model_cfg["vocab_size"], (batch, seq + 1))
        lengths = mx.array([[0, seq]] * batch)
        rates = matmul_rates(model_cfg, tokens)
        entry: dict[str, Any] = {"batch": batch, "seq_len": seq, "tokens": tokens, "matmul": rates, "variants": {}}
        for name, gc_on, bf16, dropout, what in BREAKDOWN_VARIANTS:
            set_grad_checkpoint(layer_type, gc_on)
            set_lora_matmul_dtype(m, "bfloat16" if bf16 else "float32")  # lora.matmul_dtype's two values
            for mod in m.modules():
                if isinstance(mod, LoRALinear):
                    mod.dropout._p_1 = 1 - 0.08 if dropout else 1.0
            mx.reset_peak_memory()
            try:
                if what == "step":
                    opt = build_optimizer(cfg, 1000)
                    opt.init(m.trainable_parameters())
                    step, arrays = make_step(m, opt, 1, default_loss)
                    dt = _median_time(lambda f=step, st=arrays, b=x, ln=lengths: (f(b, ln, None, True), st), 2, 6)
                else:
                    fwd = mx.compile(lambda b, ln: default_loss(m, b, ln)[0], inputs=[m.state, mx.random.state],
                                     outputs=[mx.random.state])
                    dt = _median_time(lambda f=fwd, b=x, ln=lengths: f(b, ln), 2, 6)
            except Exception as e:  # noqa: BLE001 -- one variant failing (memory) should not lose the others
                entry["variants"][name] = {"error": repr(e)[:300]}
                print(f"{batch}x{seq} {name}: {e!r}", file=sys.stderr)
                continue
            flops = step_flops(model_cfg, tokens, batch, layers, 6, LORA_KEYS, gc_on)
            v = {"step_ms": dt * 1e3, "tokens_per_s": tokens / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                 "gradient_checkpointing": gc_on, "lora_bf16": bf16, "dropout": dropout, "timed": what}
            if what == "step":
                floor = matmul_floor_ms(rates, model_cfg, layers, gc_on)
                v.update(gflop_per_token=flops["per_token"] / 1e9, matmul_floor_ms=floor,
                         tflops_per_s=tokens / dt * flops["per_token"] / 1e12)
                if peak:
                    v.update(mfu_percent=100 * v["tflops_per_s"] / peak,
                             mfu_percent_without_recompute=100 * tokens / dt * flops["per_token_without_recompute"]
                             / 1e12 / peak)
            else:
                v["forward_gflop_per_token"] = flops["forward"] / tokens / 1e9
                v["forward_tflops_per_s"] = flops["forward"] / dt / 1e12
            entry["variants"][name] = v
            print(f"{batch}x{seq} {name}: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tokens/s"
                  + (f", MFU {v['mfu_percent']:.1f}%" if "mfu_percent" in v else ""), file=sys.stderr, flush=True)
        set_grad_checkpoint(layer_type, True)
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.dropout._p_1 = 1 - 0.08
        results["sizes"].append(entry)
        gc.collect()
        mx.clear_cache()
        publish(results, render_breakdown(results), a.out)  # as it goes: a call stopped mid-way keeps the rest
    return 0


def render_breakdown(r: dict[str, Any]) -> str:
    lines = [f"device: {r['device']}", ("farense's compiled step on synthetic batches (every position a target), "
                                        "in one process; median of 6 steps after 2 warm-up steps, each step "
                                        "evaluated before the next")]
    for e in r["sizes"]:
        lines += ["", f"### {e['batch']} x {e['seq_len']} tokens ({e['tokens']:,} a step)", "",
                  ("| variant | ms/step | tokens/s | GFLOP/token | TFLOP/s | MFU | MFU w/o recompute | "
                   "matmul floor (ms) | peak GB |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in e["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | failed: {v['error'][:80]} | | | | | | | |")
            elif v["timed"] == "forward":
                lines.append(f"| {name} | {v['step_ms']:.1f} | {v['tokens_per_s']:,.0f} | "
                             f"{v['forward_gflop_per_token']:.2f} | {v['forward_tflops_per_s']:.1f} | "
                             f"({100 * v['forward_tflops_per_s'] / (r['peak_bf16_tflops'] or 1):.1f}%) | | | "
                             f"{v['peak_memory_gb']:.1f} |")
            else:
                lines.append(f"| {name} | {v['step_ms']:.1f} | {v['tokens_per_s']:,.0f} | {v['gflop_per_token']:.2f} | "
                             f"{v['tflops_per_s']:.1f} | {v.get('mfu_percent', 0):.1f}% | "
                             f"{v.get('mfu_percent_without_recompute', 0):.1f}% | {v['matmul_floor_ms']:.1f} | "
                             f"{v['peak_memory_gb']:.1f} |")
        lines += ["", f"MLX bf16 matmul at {e['tokens']:,} rows (TFLOP/s; ms):", "",
                  "| weight (in -> out) | x @ W.T | g @ W |", "|---|---:|---:|"]
        for name, v in e["matmul"].items():
            lines.append(f"| {name} | {v['forward_tflops']:.0f} ({v['forward_ms']:.2f}) | "
                         f"{v['input_grad_tflops']:.0f} ({v['input_grad_ms']:.2f}) |")
    return "\n".join(lines)


PHASES = [("process_start_to_training", "start-up (interpreter, imports, CLI) to training"),
          ("checks_and_resume_choice", "input checks, importing mlx and mlx-lm, run lock, checkpoint scan"),
          ("model_load", "model load (+ dequantize)"),
          ("data_adapters_optimizer", "data, adapters, optimizer"),
          ("first_step_with_compile", "first step (compilation)"),
          ("steps", "the other steps"),
          ("validation", "validation"),
          ("checkpoints", "checkpoints"),
          ("finish_metrics_files", "finish: metrics JSON/CSV"),
          ("finish_plot", "finish: loss-curve plot"),
          ("finish_and_exit", "finish and exit (after the last step's report)")]


def align_value(text: str) -> int | str:
    """--align-tokens: "auto" or a number of tokens (farense's config validates the value)."""
    return text if text == "auto" else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["demo", *SHAPES], default="demo",
                    help="demo: the tiny demo model; 7b: Mistral-7B's shape, random 4-bit; small: the same, tiny")
    ap.add_argument("--model", type=Path, help="Use this mlx-lm model directory instead of building one.")
    ap.add_argument("--steps", type=int, help="Optimizer steps per run (default: 200 demo/small, 20 7b).")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, help="Tokens per example (default: 128 demo/small, 512 7b).")
    ap.add_argument("--checkpoint-every", type=int, help="Checkpoint cadence in steps (default: steps // 3).")
    ap.add_argument("--rounds", type=int, default=2,
                    help="Rounds of every run; the first warms caches (kernels, bytecode, page cache), the "
                         "order alternates, the table reports the last round (default 2).")
    ap.add_argument("--computes", help="farense's model.compute values to run, comma-separated "
                                       "(default: quantized,dequantized for a quantized model, else auto).")
    ap.add_argument("--steps-ahead", help="FARENSE_STEPS_AHEAD values to run farense with, comma-separated "
                                          "(default: farense's own default only).")
    ap.add_argument("--profile", action="store_true",
                    help="After the rounds, run each tool once more under cProfile and print where its host time "
                         "goes (the top functions by own time; with --out, the stats files too).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/farense-bench"), help="Models, data and runs go here.")
    ap.add_argument("--out", type=Path, help="Write results.json and results.md into this directory.")
    ap.add_argument("--resume", action="store_true", help="Also SIGKILL a `farense train` mid-step and resume it.")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--mlx-lm-own-blas", action="store_true",
                    help="On the CPU, run mlx_lm with the BLAS its mlx wheel brings (default: farense's, so that "
                         "the trainers are compared, not the matmul libraries).")
    ap.add_argument("--timeout", type=float, default=900, help="Seconds any one run may take.")
    ap.add_argument("--prepare-only", action="store_true", help="Build the model and the data, then stop.")
    ap.add_argument("--no-grad-checkpoint", action="store_true",
                    help="Train without gradient checkpointing (both tools; default: with, as the seed's runs).")
    ap.add_argument("--peak-tflops", type=float,
                    help="The device's dense bf16 peak for MFU (default: 989 for an H100 or H200; none on the CPU).")
    ap.add_argument("--no-generate", action="store_true",
                    help="Skip `mlx_lm generate` with the trained adapters on the quantized model (saves seconds).")
    ap.add_argument("--lora-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="farense's lora.matmul_dtype (default auto: bf16 with a bf16 base on a GPU, fp32 on the CPU; "
                         "adapters and Adam stay fp32 either way).")
    ap.add_argument("--lora-bf16", dest="lora_dtype", action="store_const", const="bfloat16",
                    help="The same as --lora-dtype bfloat16.")
    ap.add_argument("--align-tokens", type=align_value, default="auto", metavar="auto|N",
                    help="farense's training.align_tokens: the model's input padded to a multiple of N tokens, the "
                         "same targets counted (0: off; default auto: 128 on a CUDA GPU, off elsewhere).")
    ap.add_argument("--align-batches", dest="align_tokens", type=align_value, metavar="N",
                    help="The same as --align-tokens N.")
    ap.add_argument("--breakdown", metavar="BxS,...",
                    help="Instead of the tools' runs: in this process, farense's compiled step on synthetic batches "
                         "of these sizes (e.g. 4x512,4x2048), timed under variants (checkpointing off, LoRA in "
                         "bf16, no dropout, forward only), beside MLX's bf16 matmul rate on the step's shapes; "
                         "writes breakdown.json/.md into --out.")
    a = ap.parse_args()
    big = a.shape == "7b"
    a.steps = a.steps or (20 if big else 200)
    a.seq_len = a.seq_len or (512 if big else 128)
    a.checkpoint_every = a.checkpoint_every or max(a.steps // 3, 1)
    a.work.mkdir(parents=True, exist_ok=True)

    from farense.model.demo import build_demo

    demo = build_demo(a.work / "demo")
    demo_model, demo_data = Path(demo.model), Path(demo.data)
    if a.model:
        model, label = a.model.resolve(), a.model.name
    elif a.shape == "demo":
        model, label = demo_model, "demo (Mistral architecture, 4 layers, hidden 128, fp32)"
    else:
        model = build_random_model(a.work / f"model-{a.shape}", SHAPES[a.shape], demo_model)
        label = (f"{a.shape}-shaped Mistral, random weights, {QUANT['bits']}-bit (group {QUANT['group_size']}), "
                 f"{SHAPES[a.shape]['num_hidden_layers']} layers, hidden {SHAPES[a.shape]['hidden_size']}")
    model_cfg = json.loads((model / "config.json").read_text())
    n_layers = model_cfg["num_hidden_layers"]
    quantized = "quantization" in model_cfg
    computes = a.computes.split(",") if a.computes else (["quantized", "dequantized"] if quantized else ["auto"])
    data = make_data(a.work / f"data-{a.seq_len}", demo_data, model, a.seq_len,
                     n_train=max(a.steps * a.batch_size, 8 * a.batch_size), n_valid=2 * a.batch_size)
    device = device_description()
    same_blas = device.startswith("cpu") and not a.mlx_lm_own_blas
    peak = peak_tflops(device, a.peak_tflops)
    if a.prepare_only:
        print(f"prepared {model} and {data} on {device}", file=sys.stderr)
        return 0
    if a.breakdown:
        return breakdown(a, model, data, model_cfg, device, peak)
    print(f"device: {device}\nmodel: {label}\n{a.steps} steps, batch {a.batch_size}, ~{a.seq_len} tokens/example, "
          f"LoRA rank 6 on q/k/v/o of {min(16, n_layers)} layers, checkpoint every {a.checkpoint_every}"
          f"{'' if not a.no_grad_checkpoint else ', no gradient checkpointing'}", file=sys.stderr)

    skip = max(2, a.steps // 10)
    layers = min(16, n_layers)
    aheads: list[int | None] = [int(v) for v in a.steps_ahead.split(",")] if a.steps_ahead else [None]
    cfgs: dict[str, Any] = {}
    ahead_of: dict[str, int | None] = {}
    for c in computes:
        for n in aheads:
            name = " ".join(["farense", *([c] if len(computes) > 1 else []),
                             *([f"{n} ahead"] if len(aheads) > 1 else [])])
            cfgs[name] = farense_config(a.work / "farense", model, data, a, layers, compute=c,
                                        run_name=f"bench-{c}" + (f"-ahead{n}" if n is not None else ""))
            ahead_of[name] = n
    tools = [*cfgs, *([] if a.skip_mlx_lm else ["mlx_lm lora"])]
    rounds: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for r in range(a.rounds):
        this: dict[str, Any] = {}
        for tool in (tools if r % 2 == 0 else tools[::-1]):
            print(f"round {r + 1}: {tool}", file=sys.stderr, flush=True)
            if tool == "mlx_lm lora":
                mr = run_mlx_lm(next(iter(cfgs.values())), a.work / "mlx_lm", a.steps, a.timeout, same_blas)
            else:
                raw[tool] = run_farense_cli(cfgs[tool], a.timeout, ahead_of[tool])
                this[tool] = farense_figures(raw[tool], skip)
        tokens_per_step = next(iter(this.values()))["tokens_per_step"] if this else a.batch_size * a.seq_len
        if "mlx_lm lora" in tools:  # its wall intervals count the same tokens per step as farense's (same data)
            this["mlx_lm lora"] = mlx_lm_figures(mr, skip, tokens_per_step)
        flops = step_flops(model_cfg, tokens_per_step, a.batch_size, layers, 6, LORA_KEYS, not a.no_grad_checkpoint)
        rounds.append({t: add_mfu(this[t], flops, peak) for t in tools})
    last = rounds[-1]
    results: dict[str, Any] = {
        "device": device, "model": label, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "checkpoint_every": a.checkpoint_every, "warmup_steps_excluded": skip, "rounds": rounds,
        "mlx_lm_blas": ("farense's (farense.model.blas loaded before mlx)" if same_blas else
                        "its mlx wheel's" if device.startswith("cpu") else None),
        "cold_wall_s": {k: v["wall_s"] for k, v in rounds[0].items()},
        "grad_checkpoint": not a.no_grad_checkpoint, "peak_bf16_tflops": peak, "flops_per_step": flops,
        "env": {k: os.environ[k] for k in ("MLX_PTX_CACHE_DIR", "FARENSE_ALLOW_TORCH") if k in os.environ},
        "lora_matmul_dtype": a.lora_dtype, "align_tokens": a.align_tokens,
    }
    if len(computes) > 1 and "farense quantized" in raw and "farense dequantized" in raw:
        q, d = raw["farense quantized"]["train_losses"], raw["farense dequantized"]["train_losses"]
        diffs = [abs(x - y) for x, y in zip(q, d)]
        results["drift"] = {"max_abs_train_loss_diff": max(diffs), "final_abs_train_loss_diff": diffs[-1],
                            "max_rel_train_loss_diff": max(dd / abs(x) for dd, x in zip(diffs, q)),
                            "val_loss_quantized": raw["farense quantized"]["val_loss"],
                            "val_loss_dequantized": raw["farense dequantized"]["val_loss"]}
    if quantized and not a.no_generate:
        best = raw.get("farense dequantized") or next(iter(raw.values()))
        results["adapters_on_quantized_base"] = generate_with_adapters(model, Path(best["adapters_path"]), a.timeout)
    if a.resume:
        c = computes[-1]
        kill_at = min(a.checkpoint_every + max(a.checkpoint_every // 2, 1), a.steps)
        kr = kill_and_resume(farense_config(a.work / "farense-kill", model, data, a, layers, compute=c,
                                            run_name=f"bench-{c}"), kill_at, a.timeout)
        results["resume"] = {k: v for k, v in kr.items() if k != "adapters"}
        ref = raw[[k for k in cfgs][-1]]["adapters"]
        results["resume"].update(killed_in_step=kill_at, adapters_identical_to_uninterrupted=kr["adapters"] == ref)
    publish(results, render(results), a.out)
    if a.profile:
        profile_tools(tools, cfgs, ahead_of, a, same_blas)
    return 0


def profile_tools(tools: list[str], cfgs: dict[str, Any], ahead_of: dict[str, int | None], a: argparse.Namespace,
                  same_blas: bool) -> None:
    """Each tool once more under cProfile (slower; not timed): the functions with the most own time.
    MLX's calls show under the Python function that makes them (its bindings are not C functions to
    the profiler), which is what tells host work per step apart from waiting for the device."""
    import io
    import pstats

    out = a.out or a.work
    out.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        prof = out / f"profile-{tool.replace(' ', '-')}.prof"
        if tool == "mlx_lm lora":
            run_mlx_lm(next(iter(cfgs.values())), a.work / "mlx_lm", a.steps, a.timeout, same_blas, profile=prof)
        else:
            run_farense_cli(cfgs[tool], a.timeout, ahead_of[tool], profile=prof)
        text = io.StringIO()
        pstats.Stats(str(prof), stream=text).sort_stats("tottime").print_stats(25)
        (out / f"profile-{tool.replace(' ', '-')}.txt").write_text(text.getvalue())
        print(f"\n=== {tool}: top 25 by own time ({a.steps} steps) ===")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


def publish(results: dict[str, Any], report: str, out: Path | None) -> None:
    """Print the report; with --out, write results.json and results.md there."""
    print(report)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(report + "\n")


def generate_with_adapters(model: Path, adapters: Path, timeout: float) -> dict[str, Any]:
    """The adapters trained (dequantized or not) on the model as stored (4-bit): mlx_lm generate loads them."""
    p = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--adapter-path",
                        str(adapters), "--prompt", "Olá", "--max-tokens", "8"],
                       capture_output=True, text=True, env=ENV, timeout=timeout)
    return {"exit_code": p.returncode, "tail": (p.stdout + p.stderr)[-400:]}


def rounds_table(rounds: list[dict[str, Any]], tools: list[str], key: str = "tokens_per_s_wall_interval",
                 title: str = "Tokens/s by wall interval", fmt: str = ",.0f") -> list[str]:
    """`key` (default tokens/s by wall interval) in every round, and each tool's median over the warm
    rounds (2..N): one process can run 25% off another of the same tool on a shared host, so no single
    round decides. The ratio columns are each tool's figure over mlx_lm's."""
    if len(rounds) < 2:
        return []
    others = [t for t in tools if t != "mlx_lm lora"]
    ref = "mlx_lm lora" in tools
    lines = ["", f"{title}, round by round (order alternates; round 1 warms up):", "",
             f"| round | {' | '.join(tools)} |" + ("".join(f" {t} / mlx_lm |" for t in others) if ref else ""),
             "|---|" + "---:|" * (len(tools) + (len(others) if ref else 0))]

    def line(label: str, vals: dict[str, float]) -> str:
        cells = [format(vals[t], fmt) for t in tools]
        if ref:
            cells += [f"{vals[t] / vals['mlx_lm lora']:.3f}" for t in others]
        return f"| {label} | " + " | ".join(cells) + " |"

    for n, rd in enumerate(rounds, 1):
        lines.append(line(str(n), {t: rd[t][key] for t in tools}))
    warm = rounds[1:]
    lines.append(line(f"median, rounds 2-{len(rounds)}", {t: statistics.median(rd[t][key] for rd in warm) for t in tools}))
    return lines


def mfu_lines(r: dict[str, Any]) -> list[str]:
    """Each tool's MFU at its median tokens/s over the warm rounds, and the FLOPs it is counted from."""
    f, peak = r.get("flops_per_step"), r.get("peak_bf16_tflops")
    if not f:
        return []
    gc = "with" if r.get("grad_checkpoint", True) else "without"
    lines = ["", (f"Model FLOPs per token: {f['per_token'] / 1e9:.3f} GFLOP ({f['per_token_without_recompute'] / 1e9:.3f} "
                  f"without the recompute; {gc} gradient checkpointing; formula in bench/bench_cuda.py's docstring).")]
    if not peak:
        return lines + ["MFU: no peak known for this device (--peak-tflops)."]
    warm = r["rounds"][1:] or r["rounds"]
    lines.append(f"MFU against {peak:.0f} TFLOP/s (dense bf16 peak), at each tool's median tokens/s by wall interval "
                 f"over rounds {'2' if len(r['rounds']) > 1 else '1'}-{len(r['rounds'])}:")
    for t in r["rounds"][-1]:
        rate = statistics.median(rd[t]["tokens_per_s_wall_interval"] for rd in warm)
        lines.append(f"- {t}: {rate:,.0f} tokens/s = {rate * f['per_token'] / 1e12:,.1f} TFLOP/s, MFU "
                     f"{100 * rate * f['per_token'] / 1e12 / peak:.1f}% ({100 * rate * f['per_token_without_recompute'] / 1e12 / peak:.1f}% "
                     "without the recompute)")
    return lines


def render(r: dict[str, Any]) -> str:
    last = r["rounds"][-1]
    tools = list(last)
    ref = last.get("mlx_lm lora")
    head = f"| | {' | '.join(tools)} |" + (" " + " | ".join(f"{t} / mlx_lm" for t in tools if t != "mlx_lm lora") + " |"
                                          if ref else "")
    sep = "|---|" + "---:|" * (len(tools) + (len(tools) - 1 if ref else 0))
    lines = [f"device: {r['device']}", f"model: {r['model']}",
             f"{r['steps']} optimizer steps, batch {r['batch_size']}, ~{r['seq_len']} tokens per example, "
             f"first {r['warmup_steps_excluded']} steps (compilation) excluded; round {len(r['rounds'])} of "
             f"{len(r['rounds'])} (the first warms kernels, bytecode and page cache; the order alternates)",
             "", head, sep]

    def row(name: str, key: str, fmt: str, ratio: bool = True) -> None:
        vals = [last[t].get(key) for t in tools]
        cells = [format(v, fmt) if isinstance(v, (int, float)) else "-" for v in vals]
        if ref:
            m = ref.get(key)
            cells += [(f"{v / m:.3f}" if ratio and isinstance(v, (int, float)) and m else "-")
                      for t, v in zip(tools, vals) if t != "mlx_lm lora"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("tokens/s, median step (each tool's own step timer)", "tokens_per_s_median_step", ",.0f")
    row("tokens/s, median wall interval between steps (all per-step work)", "tokens_per_s_wall_interval", ",.0f")
    row("peak memory (GB)", "peak_memory_gb", ".2f", ratio=True)
    row("final train loss", "final_train_loss", ".4f", ratio=False)
    row("validation loss", "val_loss", ".4f", ratio=False)
    row("TFLOP/s (model FLOPs, by wall interval)", "tflops_per_s", ",.1f")
    row("MFU, % of the dense bf16 peak", "mfu_percent", ".1f")
    row("MFU without the recompute, %", "mfu_percent_without_recompute", ".1f")
    row("process wall time, warm (s)", "wall_s", ".1f")
    cold = r.get("cold_wall_s", {})
    lines.append("| process wall time, round 1 (s) | " + " | ".join(f"{cold.get(t, 0):.1f}" for t in tools) + " |"
                 + (" - |" * (len(tools) - 1) if ref else ""))
    lines += rounds_table(r["rounds"], tools)
    lines += rounds_table(r["rounds"], tools, "wall_s", "Whole-process wall time (s)", ".2f")
    lines += mfu_lines(r)
    computes = [f"{t}: {last[t]['compute']}" for t in tools if last[t].get("compute")]
    if computes:
        lines += ["", "; ".join(computes)]
    for key, label in (("lora_matmuls", "LoRA matmuls"), ("alignment", "batch alignment")):
        chosen = [f"{t}: {last[t][key]}" for t in tools if last[t].get(key)]
        if chosen:
            lines.append(f"{label}: " + "; ".join(chosen))
    if r.get("mlx_lm_blas"):
        lines.append(f"mlx_lm lora: MLX's CPU matmuls through {r['mlx_lm_blas']} BLAS.")
    if "drift" in r:
        d = r["drift"]
        lines.append(f"loss drift, quantized vs dequantized compute over {r['steps']} steps: max |train loss "
                     f"difference| {d['max_abs_train_loss_diff']:.2e} ({100 * d['max_rel_train_loss_diff']:.3f}%), "
                     f"at the last step {d['final_abs_train_loss_diff']:.2e}; validation loss "
                     f"{d['val_loss_quantized']:.5f} vs {d['val_loss_dequantized']:.5f}.")
    if "adapters_on_quantized_base" in r:
        g = r["adapters_on_quantized_base"]
        lines.append(f"`mlx_lm generate --adapter-path` with these adapters on the 4-bit model as stored: "
                     f"{'ok' if g['exit_code'] == 0 else 'FAILED (exit %d)' % g['exit_code']}.")
    lines += ["", "Wall time per phase (s), same round:", "",
              f"| phase | {' | '.join(tools)} |", "|---|" + "---:|" * len(tools)]
    for key, name in PHASES:
        vals = [last[t]["phases"].get(key) for t in tools]
        if key == "finish_and_exit":
            vals = [v if v is not None else last[t]["wall_s"] - sum(x for k, x in last[t]["phases"].items())
                    for t, v in zip(tools, vals)]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" if v is not None else "-" for v in vals) + " |")
    lines.append("| process wall time | " + " | ".join(f"{last[t]['wall_s']:.2f}" for t in tools) + " |")
    res = r.get("resume")
    if res:
        lines.append(f"\nkill + resume: SIGKILL inside step {res['killed_in_step']}; the next process resumed from "
                     f"step {res['resumed_from']} and reached its first new step "
                     f"{res['start_to_first_resumed_step_s']:.1f} s after starting; final state {res['state']}; "
                     f"adapters byte-identical to the uninterrupted run: "
                     f"{'yes' if res['adapters_identical_to_uninterrupted'] else 'no'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
