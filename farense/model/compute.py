"""Owns the base model's compute: quantized as stored (QLoRA) or dequantized once at load.

Why: the 4-bit matmul is slow on MLX's CPU backend (no BLAS) and about 3.6x slower than bf16 on
GPUs once a step has real work (below that the host is the bottleneck and the 4-bit base is the
faster one), while the dequantized weights are the very values the quantized matmul multiplies by.
The adapters train against the same base either way and stay valid for the 4-bit model on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The training's own memory (activations, adapters, optimizer state, MLX's cache) on top of the
# dequantized base, as a share of the base: generous, because running out mid-run costs a night.
TRAINING_OVERHEAD = 0.5
# Never plan to use more than this share of the device's memory.
MEMORY_HEADROOM = 0.8
# A step's activations and the rest beyond the weights, in bytes per token of the step, per unit of
# hidden size, per layer: measured on the 7B shape on an H200 (batch 4 x 512 tokens, gradient
# checkpointing, LoRA on 16 layers): 11.9 GB beside the 14.5 GB dequantized base (peak 26.4 GB),
# i.e. ~44 bytes; rounded up. TRAINING_OVERHEAD alone (7.3 GB there) would have planned too little.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 48
# On a GPU, below this much work per step (6 x base parameters x tokens: forward and backward FLOPs)
# the dequantized base is slower, not faster: the device is idle either way and the host queues a
# cuBLAS matmul per layer where the 4-bit one is a single kernel. One H100, LoRA on every layer,
# quantized vs dequantized in one process (bench/bench_compute_crossover.py): 0.77-0.90x at every
# size up to 3.1e12 (1B params x 512 tokens), 2.2-3.6x from 6.2e12 (2B x 512) up; the 7B shape at
# batch 4 x 512 is 8.9e13 (3.4x).
DEQUANTIZE_MIN_STEP_FLOPS = 5e12


def step_flops(base_parameters: int, tokens_per_step: int) -> float:
    """A training step's matmul work: forward and backward over the base, 6 FLOPs per parameter per token."""
    return 6.0 * base_parameters * tokens_per_step


def activation_bytes(tokens_per_step: int, hidden_size: int, num_layers: int) -> int:
    """The memory a training step needs beyond the weights (activations, gradients, temporaries)."""
    return ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER * tokens_per_step * hidden_size * num_layers


@dataclass(frozen=True)
class ComputeChoice:
    """What the base computes in, and why (said in the run's log and the preflight)."""

    dequantize: bool
    dtype: str | None  # cast floating weights to this dtype; None keeps them as loaded
    reason: str

    def describe(self) -> str:
        what = "dequantized" if self.dequantize else "as stored"
        return f"compute: base {what}" + (f", {self.dtype}" if self.dtype else "") + f" ({self.reason})"


def choose_compute(requested: str, *, device: str, quantized_base: bool, stored_dtype: str | None,
                   dequantized_bytes: int | None, memory_bytes: int | None,
                   step_bytes: int | None = None, work_flops: float | None = None) -> ComputeChoice:
    """Decide the base's compute from the config's `model.compute`, the device and its memory.

    `device` is "cpu" or "gpu"; `dequantized_bytes` is the base's size once dequantized to the
    dtype it would compute in, `memory_bytes` what the device can hold (None: unknown), and
    `step_bytes` what a training step needs beside the weights (activation_bytes), and
    `work_flops` a step's matmul work (step_flops), when known.
    """
    on_cpu = device == "cpu"
    # On the CPU only fp32 matmuls reach BLAS; bf16/fp16 and 4-bit ones run on slow reference loops.
    cpu_dtype = "float32" if on_cpu and stored_dtype != "float32" else None
    if not quantized_base:
        why = "fp32: only fp32 matmuls use BLAS on the CPU" if cpu_dtype else "the base is not quantized"
        return ComputeChoice(False, cpu_dtype, why)
    if requested == "quantized":
        return ComputeChoice(False, None, "model.compute = 'quantized' (QLoRA)")
    if requested == "dequantized":
        return ComputeChoice(True, "float32" if on_cpu else None, "model.compute = 'dequantized'")
    if not on_cpu and work_flops is not None and work_flops < DEQUANTIZE_MIN_STEP_FLOPS:
        return ComputeChoice(False, None, f"auto: a step is ~{work_flops:.1e} FLOPs, below the "
                                          f"{DEQUANTIZE_MIN_STEP_FLOPS:.0e} where a dequantized base starts to "
                                          "pay on a GPU (QLoRA on the 4-bit base)")
    needed = None if dequantized_bytes is None else \
        dequantized_bytes + max(dequantized_bytes * TRAINING_OVERHEAD, step_bytes or 0)
    fits = needed is not None and memory_bytes is not None and needed <= memory_bytes * MEMORY_HEADROOM
    need = "unknown" if needed is None else f"{needed / 1e9:.1f} GB"
    have = "unknown" if memory_bytes is None else f"{memory_bytes * MEMORY_HEADROOM / 1e9:.1f} GB"
    if fits:
        why = ("auto: the CPU's 4-bit matmul is slow, fp32 goes through BLAS" if on_cpu
               else "auto: the dequantized base is faster than the 4-bit matmul")
        return ComputeChoice(True, "float32" if on_cpu else None, f"{why}; needs ~{need} of {have} usable")
    return ComputeChoice(False, None, f"auto: a dequantized base would need ~{need}, more than the {have} usable "
                                      "(QLoRA on the 4-bit base)")


def current_device() -> str:
    """"gpu" or "cpu": where MLX computes by default in this process."""
    import mlx.core as mx

    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def cuda_device() -> bool:
    """Whether MLX computes on a CUDA GPU in this process (not the CPU, not Metal)."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return current_device() == "gpu" and cuda is not None and bool(cuda.is_available())


def device_memory_bytes(device: str) -> int | None:
    """Memory the device can give the training: the GPU's recommended working set, else free RAM."""
    import mlx.core as mx
    import psutil

    if device == "gpu":
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if isinstance(info.get(key), int) and info[key] > 0:
                return int(info[key])
        return None
    return int(psutil.virtual_memory().available)


def quantized_layers(model: Any) -> list[Any]:
    """The model's quantized modules (linear and embedding layers loaded as 4- or 8-bit)."""
    import mlx.nn as nn

    return [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def dequantized_size(model: Any, dtype_bytes: int) -> int:
    """Bytes of the model's parameters once every quantized layer is dequantized, `dtype_bytes` each."""
    from mlx.utils import tree_flatten

    elements = sum(p.size for _, p in tree_flatten(model.parameters()))
    for m in quantized_layers(model):
        packed = [m.weight, m.scales] + ([m.biases] if getattr(m, "biases", None) is not None else [])
        elements += m.weight.shape[0] * m.weight.shape[-1] * (32 // m.bits) - sum(a.size for a in packed)
    return elements * dtype_bytes


def stored_float_dtype(model: Any) -> str | None:
    """The dtype of the model's floating weights as loaded (e.g. "bfloat16"), None if it has none."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return None


def resolve_compute(model: Any, requested: str, tokens_per_step: int | None = None) -> ComputeChoice:
    """The choice for this loaded model on this process's device (memory measured now); with
    `tokens_per_step` (batch x sequence length) the step's activations are planned for too."""
    device = current_device()
    stored = stored_float_dtype(model)
    quantized = bool(quantized_layers(model))
    dtype_bytes = 4 if device == "cpu" else 2
    parameters = dequantized_size(model, 1) if quantized else None
    return choose_compute(requested, device=device, quantized_base=quantized, stored_dtype=stored,
                          dequantized_bytes=parameters * dtype_bytes if parameters is not None else None,
                          memory_bytes=device_memory_bytes(device), step_bytes=_step_bytes(model, tokens_per_step),
                          work_flops=step_flops(parameters, tokens_per_step) if parameters and tokens_per_step else None)


def _step_bytes(model: Any, tokens_per_step: int | None) -> int | None:
    args = getattr(model, "args", None)
    hidden, layers = getattr(args, "hidden_size", None), len(getattr(model, "layers", []) or [])
    if not tokens_per_step or not isinstance(hidden, int) or not layers:
        return None
    return activation_bytes(tokens_per_step, hidden, layers)


def apply_compute(model: Any, choice: ComputeChoice) -> Any:
    """Dequantize and/or cast the base in place as chosen; returns the model (mlx-lm's way)."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    if choice.dequantize:
        model = dequantize_model(model)
    if choice.dtype:
        model.set_dtype(getattr(mx, choice.dtype))
    return model
