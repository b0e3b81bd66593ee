"""The real demo model on the CPU, side by side in one run: farense against `mlx_lm lora` on the same
imported SmolLM2-135M-Instruct, the same data and settings (V2 + the demo overlay; V2's micro-batch
of 2 without accumulation by default, since the reference BLAS takes minutes per demo step), each with
farense's fast BLAS (OpenBLAS through the shim) and with MLX's bundled reference BLAS.

    .venv/bin/python bench/bench_real_model.py [--steps 8] [--skip 2]

Rows:
  farense                      the 4-bit base dequantized once to fp32 (model.compute = auto on the CPU)
  mlx_lm lora, 4-bit dir       mlx-lm on the imported directory as it is (4-bit quantized matmuls)
  mlx_lm lora, fp32 dir        mlx-lm on a float32 import of the same GGUF (what farense computes with)

Tokens/s is the median step after `--skip` warm-up steps (mlx-lm: its per-report figure). Prints a
table and the ratios; nothing is asserted (timings belong here, not in tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_trainer import ENV, run_farense, run_mlx_lm  # noqa: E402

from farense.config import load_config  # noqa: E402
from farense.model.gguf import import_gguf  # noqa: E402
from farense.model.smollm2 import build_smollm2_demo, fetch_gguf  # noqa: E402


def bench_config(ws: Path, demo: Path, steps: int, batch: int, accumulation: int):
    cfg = load_config("v2", overlays=["demo"], workspace=ws)
    return cfg.with_overrides(
        model={"path": str(demo / "model")}, data={"dir": str(demo / "data")},
        training={"epochs": 0, "iters": steps, "warmup_steps": 0, "schedule": "constant", "batch_size": batch,
                  "grad_accumulation": accumulation},
        validation={"every_steps": steps, "batches": 1}, checkpoint={"every_steps": steps},
        early_stopping={"patience": 0},
    )


def lora_yaml(cfg, path: Path) -> tuple[str, ...]:
    """mlx-lm's config file for the LoRA parameters its command line cannot set (rank, dropout, keys)."""
    keys = ", ".join(f'"{k}"' for k in cfg.lora.keys)
    path.write_text(f"lora_parameters:\n  rank: {cfg.lora.rank}\n  scale: {cfg.lora.scale}\n"
                    f"  dropout: {cfg.lora.dropout}\n  keys: [{keys}]\n")
    return ("-c", str(path))


def median_after(values: list[float], skip: int) -> float:
    rest = values[skip:]
    return statistics.median(rest) if rest else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    # V2's micro-batch without accumulation by default: the reference BLAS takes minutes per demo step.
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accumulation", type=int, default=1)
    ap.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="farense-bench-real-"))
    cache = Path(os.environ.get("FARENSE_TEST_CACHE") or Path.home() / ".cache" / "farense-tests")
    demo = build_smollm2_demo(work / ".farense" / "demo", cache=cache).root
    fp32 = work / "model-fp32"
    if not fp32.exists():
        import_gguf(fetch_gguf(cache), fp32, dequantize=True, dtype="float32")

    results: dict[tuple[str, str], float] = {}
    for blas in ("fast", "reference"):
        env = {**ENV, "FARENSE_BLAS": "auto" if blas == "fast" else "reference"}
        ws = work / blas
        cfg = bench_config(ws / "farense", demo, args.steps, args.batch_size, args.grad_accumulation)
        _, rows = run_farense(cfg, ws / "farense", env=env)
        results[("farense", blas)] = median_after([r["tokens_per_second"] for r in rows], args.skip)
        extra = lora_yaml(cfg, ws / "lora.yaml")
        accum = cfg.training.grad_accumulation  # mlx-lm reports per micro-batch
        for label, model in (("mlx_lm lora, 4-bit dir", str(demo / "model")), ("mlx_lm lora, fp32 dir", str(fp32))):
            _, rates, _ = run_mlx_lm(cfg, ws / label.replace(" ", "_").replace(",", ""), args.steps, model=model,
                                     env=env, extra=extra)
            results[(label, blas)] = median_after(rates, args.skip * accum)
        print(f"done: {blas} BLAS", file=sys.stderr, flush=True)

    t = cfg.training
    print(f"SmolLM2-135M-Instruct, V2 + demo overlay, with (LoRA r{cfg.lora.rank} on {cfg.lora.num_layers} layers, batch "
          f"{t.batch_size} x accumulation {t.grad_accumulation}), {args.steps} steps, median after {args.skip}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'tokens/s':28}{'fast BLAS':>12}{'reference BLAS':>16}{'fast / ref':>12}")
    for label in ("farense", "mlx_lm lora, 4-bit dir", "mlx_lm lora, fp32 dir"):
        fast, ref = results[(label, "fast")], results[(label, "reference")]
        print(f"{label:28}{fast:12.0f}{ref:16.0f}{fast / ref:12.2f}")
    for other in ("mlx_lm lora, 4-bit dir", "mlx_lm lora, fp32 dir"):
        print(f"farense / {other} (fast BLAS): {results[('farense', 'fast')] / results[(other, 'fast')]:.2f}")


if __name__ == "__main__":
    main()
