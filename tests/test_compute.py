"""farense.model.compute: which dtype a (quantized) base computes in, and dequantizing it once at load."""

from __future__ import annotations

import pytest

from farense.config import load_config
from farense.model.compute import (
    ComputeChoice,
    apply_compute,
    choose_compute,
    dequantized_size,
    resolve_compute,
)

GB = 10**9


def choose(requested: str = "auto", **kw):
    args = dict(device="cpu", quantized_base=True, stored_dtype="float16", dequantized_bytes=1 * GB,
                memory_bytes=16 * GB)
    return choose_compute(requested, **{**args, **kw})


def test_auto_on_the_cpu_dequantizes_to_fp32_when_memory_allows():
    c = choose()
    assert c.dequantize and c.dtype == "float32" and "BLAS" in c.reason


def test_auto_keeps_the_4bit_base_when_the_dequantized_one_does_not_fit():
    c = choose(dequantized_bytes=14 * GB, memory_bytes=16 * GB)
    assert not c.dequantize and c.dtype is None and "21.0 GB" in c.reason and "12.8 GB" in c.reason


def test_auto_on_a_gpu_keeps_the_stored_dtype():
    c = choose(device="gpu", dequantized_bytes=15 * GB, memory_bytes=80 * GB)
    assert c.dequantize and c.dtype is None


def test_auto_plans_for_the_steps_activations_measured_on_the_7b_shape():
    from farense.model.compute import activation_bytes

    step = activation_bytes(4 * 512, 4096, 32)  # batch 4 x 512 tokens, Mistral-7B's hidden size and depth
    assert 11 * GB < step < 14 * GB  # measured on an H200: 26.4 GB peak beside a 14.5 GB base
    # An 80 GB card holds base + step with headroom; a 32 GB card would not (the old 1.5x rule said yes).
    assert choose(device="gpu", dequantized_bytes=int(14.5 * GB), memory_bytes=80 * GB, step_bytes=step).dequantize
    c = choose(device="gpu", dequantized_bytes=int(14.5 * GB), memory_bytes=32 * GB, step_bytes=step)
    assert not c.dequantize and "27.4 GB" in c.reason
    assert choose(device="gpu", dequantized_bytes=int(14.5 * GB), memory_bytes=32 * GB).dequantize


def test_auto_on_a_gpu_keeps_a_small_steps_base_quantized():
    """Measured on one H100: dequantizing loses (0.77-0.90x) up to 3.1e12 FLOPs per step, wins from 6.2e12."""
    from farense.model.compute import DEQUANTIZE_MIN_STEP_FLOPS, step_flops

    gpu = dict(device="gpu", dequantized_bytes=15 * GB, memory_bytes=80 * GB)
    seven_b = step_flops(7_250_000_000, 4 * 512)
    small = step_flops(4_500_000, 4 * 128)  # the bench's `small` shape
    assert small < DEQUANTIZE_MIN_STEP_FLOPS < seven_b
    assert choose(**gpu, work_flops=seven_b).dequantize
    c = choose(**gpu, work_flops=small)
    assert not c.dequantize and c.dtype is None and "1.4e+10 FLOPs" in c.reason
    assert choose(**gpu).dequantize, "work unknown: memory decides, as before"
    # The CPU dequantizes whatever the size (its 4-bit matmul has no fast path), and explicit modes win.
    assert choose(work_flops=small).dequantize
    assert choose("dequantized", **gpu, work_flops=small).dequantize
    assert not choose("quantized", **gpu, work_flops=seven_b).dequantize


def test_explicit_modes_are_obeyed_whatever_the_memory():
    assert not choose("quantized").dequantize
    assert choose("dequantized", dequantized_bytes=100 * GB).dequantize


def test_an_unquantized_base_is_cast_to_fp32_on_the_cpu_only():
    assert choose(quantized_base=False, stored_dtype="bfloat16") == ComputeChoice(
        False, "float32", "fp32: only fp32 matmuls use BLAS on the CPU")
    assert choose(quantized_base=False, stored_dtype="float32").dtype is None
    assert choose(quantized_base=False, device="gpu", stored_dtype="bfloat16").dtype is None


def test_model_compute_is_validated_and_not_fingerprinted(tmp_path, write_config):
    from farense.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.compute: expected one of auto, quantized, dequantized, got 'fast'"):
        load_config(str(write_config({"model": {"compute": "fast"}})))
    a = load_config(str(write_config({"model": {"compute": "quantized"}}, name="a")))
    b = load_config(str(write_config({"model": {"compute": "dequantized"}}, name="a")))
    assert a.fingerprint == b.fingerprint


def _tiny_quantized_llama():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128)
    model = llama.Model(args)
    nn.quantize(model, group_size=32, bits=4)
    return model


def test_dequantizing_keeps_the_values_the_quantized_matmul_uses():
    import mlx.core as mx
    import mlx.nn as nn

    model = _tiny_quantized_llama()
    tokens = mx.array([[1, 5, 9, 33, 7]])
    quantized_logits = model(tokens)
    choice = resolve_compute(model, "dequantized")
    assert choice.dequantize and choice.dtype == "float32"
    expected = dequantized_size(model, 4)
    model = apply_compute(model, choice)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    assert all(p.dtype == mx.float32 for _, p in params)
    assert sum(p.size * 4 for _, p in params) == expected
    assert mx.allclose(model(tokens), quantized_logits, atol=2e-3, rtol=2e-3).item()
