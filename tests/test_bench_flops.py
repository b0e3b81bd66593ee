"""bench/bench_cuda.py's FLOP count for MFU (CPU only, no MLX): the formula's parts on the 7B shape,
checked against the numbers worked by hand from Mistral-7B's shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_cuda", Path(__file__).resolve().parent.parent / "bench" / "bench_cuda.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SEVEN_B = {**bench.SHAPES["7b"]}


def test_7b_step_flops_by_hand():
    d, f, v, L, lt, r = 4096, 14336, 32768, 32, 16, 6
    tokens, batch = 2048, 4
    s = tokens / batch
    lin = 2 * (d * d + 2 * d * 1024 + d * d + 3 * d * f)  # q, k, v (8 kv heads x 128), o, gate/up/down
    lora = 2 * r * ((d + d) + 2 * (d + 1024) + (d + d))
    att = 4 * 32 * 128 * s * (s + 1) / 2
    head = 2 * d * v
    qkv_in = 2 * d * (d + r) + 2 * 2 * d * (1024 + r)
    fwd = tokens * (L * (lin + lora) + head) + batch * L * att
    rec = lt * (tokens * (lin + lora) + batch * att)
    bwd = lt * (tokens * (lin + 2 * lora) + 2 * batch * att) + tokens * head - tokens * qkv_in
    got = bench.step_flops(SEVEN_B, tokens, batch, lt, r, bench.LORA_KEYS)
    assert got["forward"] == pytest.approx(fwd)
    assert got["recompute"] == pytest.approx(rec)
    assert got["backward"] == pytest.approx(bwd)
    assert got["per_token"] == pytest.approx((fwd + rec + bwd) / tokens)
    # the docstring's figures: about 28.8 GFLOP per token, 21.7 without the recompute
    assert got["per_token"] / 1e9 == pytest.approx(28.8, abs=0.05)
    assert got["per_token_without_recompute"] / 1e9 == pytest.approx(21.7, abs=0.05)
    # forward ~ 2 x the parameters the tokens pass through (7.25e9 less the 0.13e9 embedding), plus attention
    assert 14.0e9 < fwd / tokens < 14.6e9


def test_no_checkpointing_no_recompute_and_mfu():
    no_gc = bench.step_flops(SEVEN_B, 2048, 4, 16, 6, bench.LORA_KEYS, grad_checkpoint=False)
    assert no_gc["recompute"] == 0 and no_gc["per_token"] == no_gc["per_token_without_recompute"]
    fig = bench.add_mfu({"tokens_per_s_wall_interval": 10_000.0}, no_gc, 989.0)
    assert fig["mfu_percent"] == pytest.approx(100 * 10_000 * no_gc["per_token"] / 989e12)
    assert bench.peak_tflops("cuda: NVIDIA H200, 143771 MiB", None) == 989.0
    assert bench.peak_tflops("cpu: x86_64", None) is None
    assert "mfu_percent" not in bench.add_mfu({"tokens_per_s_wall_interval": 1.0}, no_gc, None)
