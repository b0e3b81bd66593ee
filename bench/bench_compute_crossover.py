"""Where dequantizing a 4-bit base stops paying: quantized vs dequantized compute, side by side in one
process, over base sizes from the bench's `small` shape up, on whatever device MLX runs on.

    python bench/bench_compute_crossover.py                  # the default ladder of shapes
    python bench/bench_compute_crossover.py --shapes 256x4,1024x8 --tokens 512,2048

A dequantized base trades the 4-bit matmul (slow on the device) for bf16 matmuls through cuBLAS
(fast on the device, but each one costs more host time to queue). On a large base the device is the
bottleneck and dequantizing wins (the 7B shape: 3.4x); on a tiny one the host is, and it can lose.
For each shape and step size this prints tokens/s of both, the host time per step (queueing the
compiled step: MLX building and launching its kernels) and the ratio, with the work per step
(6 x base parameters x tokens, the FLOPs of forward and backward) that farense.model.compute's auto rule
reads. Random weights, random tokens: nothing here depends on what is learned. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# hidden x layers; the other dimensions follow Mistral's proportions (intermediate 3.5x, head 128).
DEFAULT_SHAPES = "256x4,512x8,1024x8,1024x16,2048x16,4096x8"
DEFAULT_TOKENS = "512,2048"


def shape_config(hidden: int, layers: int) -> dict[str, Any]:
    head_dim = 64 if hidden < 1024 else 128
    heads = max(hidden // head_dim, 1)
    return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": int(hidden * 3.5) // 64 * 64,
            "num_attention_heads": heads, "num_key_value_heads": max(heads // 4, 1), "head_dim": head_dim,
            "vocab_size": 32768 if hidden >= 1024 else 2048, "rope_theta": 10000.0, "max_position_embeddings": 4096}


def build(hidden: int, layers: int, compute: str) -> tuple[Any, int]:
    """A random 4-bit Mistral-shaped model with LoRA (rank 6, q/k/v/o, all layers, as the bench)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from farense.model.compute import ComputeChoice, apply_compute, dequantized_size
    from farense.train.setup import set_grad_checkpoint

    mx.random.seed(0)
    cfg = {"model_type": "mistral", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **shape_config(hidden, layers)}
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    params = dequantized_size(model, 1)  # elements, the packed 4-bit weights counted one by one
    if compute == "dequantized":
        model = apply_compute(model, ComputeChoice(True, None, "bench"))
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 6, "scale": 20.0, "dropout": 0.08,
                                          "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj"]})
    set_grad_checkpoint(type(model.layers[0]), True)  # once per class: mlx-lm's would stack per shape
    return model, params


def measure(hidden: int, layers: int, compute: str, tokens: int, steps: int) -> dict[str, Any]:
    """Steady-state tokens/s of farense's compiled step (queued one ahead, as on a GPU), and host ms per step."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    from farense.train.loop import make_step

    model, params = build(hidden, layers, compute)
    optimizer = optim.Adam(learning_rate=1e-5)
    optimizer.init(model.trainable_parameters())
    step, state = make_step(model, optimizer, 1, default_loss)
    model.train()
    seq = 128 if tokens <= 512 else 512
    batch_size = max(tokens // seq, 1)
    vocab = shape_config(hidden, layers)["vocab_size"]
    batch = mx.random.randint(0, vocab, (batch_size, seq + 1)).astype(mx.int32)
    lengths = mx.array([[0, seq + 1]] * batch_size)
    mx.eval(batch, lengths)

    def queue() -> Any:
        lvalue, toks, _ = step(batch, lengths, None, True)
        mx.async_eval(state, lvalue, toks)
        return lvalue

    for _ in range(5):  # compile and warm
        queue().item()
    host, marks = [], []
    pending = queue()
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = queue()
        host.append(time.perf_counter() - t0)
        pending.item()
        marks.append(time.perf_counter())
        pending = nxt
    pending.item()
    wall = time.perf_counter() - t_start
    intervals = [b - a for a, b in zip(marks, marks[1:])]
    out = {"tokens_per_s": batch_size * seq / statistics.median(intervals), "tokens_per_s_mean": batch_size * seq * steps / wall,
           "host_ms": 1000 * statistics.median(host), "peak_gb": mx.get_peak_memory() / 1e9, "params": params,
           "step_flops": 6 * params * batch_size * seq}
    del model, optimizer, step, state
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="hidden x layers, comma-separated")
    ap.add_argument("--tokens", default=DEFAULT_TOKENS, help="tokens per step, comma-separated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, help="Write results.json and results.md here.")
    a = ap.parse_args()

    sys.path.insert(0, str(REPO / "bench"))
    from bench_cuda import device_description

    device = device_description()
    rows = []
    for n, spec in enumerate(a.shapes.split(",")):
        hidden, layers = (int(x) for x in spec.split("x"))
        for tokens in (int(t) for t in a.tokens.split(",")):
            order = ["quantized", "dequantized"] if n % 2 == 0 else ["dequantized", "quantized"]
            got = {c: measure(hidden, layers, c, tokens, a.steps) for c in order}
            q, d = got["quantized"], got["dequantized"]
            rows.append({"hidden": hidden, "layers": layers, "tokens": tokens, "params": q["params"],
                         "step_flops": q["step_flops"], "quantized": q, "dequantized": d,
                         "ratio": d["tokens_per_s"] / q["tokens_per_s"]})
            print(f"{spec} {tokens} tok: quantized {q['tokens_per_s']:,.0f} tok/s (host {q['host_ms']:.1f} ms) "
                  f"dequantized {d['tokens_per_s']:,.0f} (host {d['host_ms']:.1f} ms) ratio {rows[-1]['ratio']:.2f}",
                  file=sys.stderr, flush=True)
    lines = [f"device: {device}", f"{a.steps} steps each after 5 warm-up, one step queued ahead; "
             "order alternates per shape", "",
             "| hidden x layers | base params | tokens/step | step FLOPs (6PT) | quantized tok/s | dequantized tok/s "
             "| dequantized / quantized | host ms/step q / dq | peak GB q / dq |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q, d = r["quantized"], r["dequantized"]
        lines.append(f"| {r['hidden']} x {r['layers']} | {r['params'] / 1e6:,.1f}M | {r['tokens']} | {r['step_flops']:.1e} "
                     f"| {q['tokens_per_s']:,.0f} | {d['tokens_per_s']:,.0f} | {r['ratio']:.2f} "
                     f"| {q['host_ms']:.1f} / {d['host_ms']:.1f} | {q['peak_gb']:.2f} / {d['peak_gb']:.2f} |")
    report = "\n".join(lines)
    print(report)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
        (a.out / "results.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
