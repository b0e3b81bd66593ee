"""`lora.matmul_dtype` and `training.align_tokens` (issue 23, item 3): the 7B step's two GPU switches, on the
CPU with the tiny demo model (LoRA with dropout on its last 2 of 4 blocks).

What is asserted. `auto` on the CPU changes nothing: mlx-lm's LoRA layer and mlx-lm's batch widths, so a
run is the same to the bit as one with both switches off. The bf16 LoRA matmuls (what `auto` picks on a
GPU with a bf16 base) really run in bf16 and train close to fp32, with the parameters and Adam's state
kept in fp32. Aligned batches count exactly the unaligned batches' targets: the loss, the token count
and the gradients are equal to the bit when nothing random runs (dropout 0, or validation); with LoRA
dropout the masks are drawn for the padded shape, so they are other draws. Bad values are one config
error naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from farense.train.batching import choose_align, make_batch, position_of, train_batches
from farense.train.data import validate_data
from farense.train.setup import choose_lora_dtype, set_up

LORA = {"num_layers": 2, "dropout": 0.1,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]}
# max_seq_length 64: about a third of the demo's training examples (44-76 tokens) are truncated, so the
# batches capped at max_seq_length (whose last target the aligned batch must not count) are met.
TRAINING = {"batch_size": 4, "grad_accumulation": 2, "max_seq_length": 64, "prefix_cache": "off"}


@pytest.fixture
def build(make_config):
    def make(lora: dict[str, Any] | None = None, **training: Any):
        cfg = make_config(lora={**LORA, **(lora or {})}, training={**TRAINING, **training})
        _, loaded = validate_data(cfg)
        lines: list[str] = []
        return cfg, set_up(cfg, loaded, lines.append), lines

    return make


def _flat(tree) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _max_diff(a, b) -> float:
    import mlx.core as mx

    fa, fb = _flat(a), _flat(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    return max(mx.abs(x - y).max().item() for (_, x), (_, y) in zip(fa, fb))


def _train(cfg, s, steps: int) -> list[float]:
    """`steps` optimizer steps as TrainingLoop._launch queues them (compiled step, RNG reseeded per step)."""
    import mlx.core as mx

    from farense.train.loop import make_step
    from farense.train.progress import step_seed

    t = cfg.training
    batches = train_batches(s.train_set, s.train_groups, seed=t.seed, start=position_of(0, len(s.train_groups)),
                            max_seq_length=t.max_seq_length, align=s.align_tokens)
    step_fn, state = make_step(s.model, s.optimizer, t.grad_accumulation, s.loss)
    s.model.train()
    losses = []
    for step in range(1, steps + 1):
        mx.random.seed(step_seed(t.seed, step))
        grad = None
        for k in range(t.grad_accumulation):
            _, (batch, lengths) = next(batches)
            lvalue, _, grad = step_fn(batch, lengths, grad, k == t.grad_accumulation - 1)
            mx.eval(state, lvalue, grad)
            losses.append(lvalue.item())
    return losses


def _lora_layers(model) -> list[Any]:
    from mlx_lm.tuner.lora import LoRALinear

    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


# ---------------------------------------------------------------------------------------------
# What `auto` chooses, and the log line that says it


def test_the_auto_rules():
    assert choose_lora_dtype("auto", device="cpu", base_dtype="float32").dtype == "float32"
    assert choose_lora_dtype("auto", device="cpu", base_dtype="bfloat16").dtype == "float32"
    gpu = choose_lora_dtype("auto", device="gpu", base_dtype="bfloat16")
    assert gpu.dtype == "bfloat16" and "auto: the base computes in bfloat16" in gpu.describe()
    assert choose_lora_dtype("auto", device="gpu", base_dtype="float32").dtype == "float32"
    assert choose_lora_dtype("auto", device="gpu", base_dtype="float16").dtype == "float32"
    assert choose_lora_dtype("auto", device="gpu", base_dtype="bfloat16", lora_type="dora").dtype == "float32"
    assert choose_lora_dtype("bfloat16", device="cpu", base_dtype="float32").dtype == "bfloat16"
    assert choose_lora_dtype("float32", device="gpu", base_dtype="bfloat16").dtype == "float32"
    cuda = choose_align("auto", cuda=True)
    assert cuda.tokens == 128 and cuda.describe().startswith("batch alignment: the model's input padded to a "
                                                              "multiple of 128 tokens")
    assert choose_align("auto", cuda=False).tokens == 0
    assert choose_align("auto", cuda=False).describe().startswith("batch alignment: off (auto:")
    assert choose_align(0, cuda=True).tokens == 0
    assert choose_align(48, cuda=False).tokens == 48


def test_auto_on_the_cpu_is_bit_identical_to_both_switches_off(build):
    """`auto` on the CPU: mlx-lm's own LoRA layer and unaligned batches; 4 optimizer steps with dropout give the
    same losses, adapters and Adam state as float32 / 0 to the bit."""
    from mlx_lm.tuner.lora import LoRALinear

    cfg, auto, lines = build()
    assert cfg.lora.matmul_dtype == "auto" and cfg.training.align_tokens == "auto"
    assert any(line.startswith("LoRA matmuls: float32 (auto: on the CPU") for line in lines), lines
    assert any(line.startswith("batch alignment: off (auto:") for line in lines), lines
    assert auto.align_tokens == 0
    assert {type(m) for m in _lora_layers(auto.model)} == {LoRALinear}
    cfg_off, off, lines_off = build(lora={"matmul_dtype": "float32"}, align_tokens=0)
    assert any(line.startswith("LoRA matmuls: float32 (lora.matmul_dtype = 'float32'") for line in lines_off)
    assert any(line == "batch alignment: off (training.align_tokens = 0)" for line in lines_off), lines_off
    l_auto, l_off = _train(cfg, auto, 4), _train(cfg_off, off, 4)
    assert l_auto == l_off
    assert _max_diff(auto.model.trainable_parameters(), off.model.trainable_parameters()) == 0.0
    assert _max_diff(auto.optimizer.state, off.optimizer.state) == 0.0
    assert l_auto[0] != l_auto[-1]  # it trained


# ---------------------------------------------------------------------------------------------
# lora.matmul_dtype = "bfloat16"


def test_bf16_lora_matmuls_train_close_to_float32_with_float32_parameters(build):
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    cfg, fp32, _ = build(lora={"matmul_dtype": "float32"})
    cfg16, bf16, lines = build(lora={"matmul_dtype": "bfloat16"})
    assert any(line.startswith("LoRA matmuls: bfloat16 (lora.matmul_dtype = 'bfloat16'") for line in lines), lines
    layers = _lora_layers(bf16.model)
    assert len(layers) == 2 * len(LORA["keys"])
    assert all(type(m).__name__ == "LoRALinear_bfloat16" and isinstance(m, LoRALinear) for m in layers)
    # The layer really multiplies in bf16: on the CPU's fp32 input its LoRA term differs from fp32's by
    # bf16 rounding, and its output keeps the input's dtype.
    m = layers[0]
    m.lora_b = mx.random.normal(m.lora_b.shape)  # (at init lora_b is 0 and the LoRA term with it)
    m.eval()
    x = mx.random.normal((2, 5, m.lora_a.shape[0]))
    y16 = m(x)
    y32 = LoRALinear.__call__(m, x)
    assert y16.dtype == mx.float32
    assert 0 < mx.abs(y16 - y32).max().item() < 0.05 * mx.abs(y32).max().item()
    m.lora_b = mx.zeros_like(m.lora_b)
    m.train()
    l32, l16 = _train(cfg, fp32, 4), _train(cfg16, bf16, 4)
    worst = max(abs(a - b) / abs(a) for a, b in zip(l32, l16))
    print(f"losses fp32 {l32}\nlosses bf16 {l16}\nmax relative difference {worst:.2e}")
    assert l16 != l32 and worst < 5e-3
    for _, p in _flat(bf16.model.trainable_parameters()) + _flat(bf16.optimizer.state):
        assert p.dtype in (mx.float32, mx.uint64, mx.int32, mx.uint32), p.dtype  # (the step counter)
    moved = _max_diff(fp32.model.trainable_parameters(), bf16.model.trainable_parameters())
    print(f"max |adapter difference| after 4 steps {moved:.2e}")
    assert moved < 1e-3


# ---------------------------------------------------------------------------------------------
# training.align_tokens


@pytest.mark.parametrize("align", [128, 48])
def test_aligned_batches_count_the_same_targets_and_give_the_same_loss_and_gradients(build, align):
    import mlx.core as mx
    import mlx.nn as nn

    cfg, s, _ = build(lora={"dropout": 0.0})
    msl = cfg.training.max_seq_length
    vg = nn.value_and_grad(s.model, s.loss)
    capped = 0
    # Every 4th group and the last (groups are sorted by length): widths from short to max_seq_length.
    for g in s.train_groups[::4] + s.train_groups[-1:]:
        plain, lengths = make_batch(s.train_set, g, msl)
        aligned, lengths_a = make_batch(s.train_set, g, msl, align)
        assert (aligned.shape[1] - 1) % align == 0 and aligned.shape[1] >= plain.shape[1]
        assert mx.array_equal(aligned[:, : plain.shape[1]], plain)
        assert mx.array_equal(lengths_a[:, 0], lengths[:, 0])
        capped += int((lengths_a[:, 1] != lengths[:, 1]).sum().item())  # length max_seq_length -> width - 1
        (l1, t1), g1 = vg(s.model, plain, lengths)
        (l2, t2), g2 = vg(s.model, aligned, lengths_a)
        assert t1.item() == t2.item()
        assert mx.array_equal(l1, l2), (l1.item(), l2.item())
        assert _max_diff(g1, g2) == 0.0
    assert capped > 0  # the truncated examples were among them


def test_an_aligned_run_equals_an_unaligned_one_without_dropout(make_config):
    """Through run_training (8 steps of 2 micro-batches, validation and checkpoints every 4, dropout 0):
    aligned to 128, with the prefix cache off and on, every train and validation loss and the adapters'
    bytes equal the unaligned run's; the log says what was chosen."""
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics
    from farense.train.runner import run_training

    def run(name: str, **training: Any) -> tuple[list, bytes, list[str]]:
        cfg = make_config(name=name, lora={**LORA, "dropout": 0.0},
                          training={**TRAINING, "iters": 8, **training},
                          validation={"every_steps": 4}, checkpoint={"every_steps": 4})
        lines: list[str] = []
        run_training(cfg, progress_bar=False, log=lines.append)
        paths = RunPaths(cfg.run_dir)
        rows = [(r["step"], r["train_loss"], r["tokens"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)]
        return rows, (paths.adapters / "adapters.safetensors").read_bytes(), lines

    plain, plain_bytes, _ = run("plain", align_tokens=0)
    aligned, aligned_bytes, lines = run("aligned", align_tokens=128)
    assert any(line == "batch alignment: the model's input padded to a multiple of 128 tokens, the same targets "
                       "counted (training.align_tokens = 128)" for line in lines), lines
    cached, cached_bytes, lines = run("aligned-cached", align_tokens=128, prefix_cache="on")
    assert any(line.startswith("prefix cache: on") for line in lines), lines
    assert len(plain) == 8 and sum(r[3] is not None for r in plain) == 2
    assert aligned == plain and cached == plain
    assert aligned_bytes == plain_bytes and cached_bytes == plain_bytes


# ---------------------------------------------------------------------------------------------
# The config


@pytest.fixture
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("FARENSE_WORKSPACE", str(tmp_path))


def _with(write_config, section: str, literal_lines: str) -> Path:
    path = write_config()
    path.write_text(path.read_text() + f"\n[{section}]\n{literal_lines}\n")
    return path


@pytest.mark.parametrize("section,lines,expected", [
    ("training", 'align_tokens = "yes"', "training.align_tokens: expected 'auto', 0 (off) or a positive number of "
                                         "tokens, got 'yes'"),
    ("training", "align_tokens = -128", "training.align_tokens: expected 'auto', 0 (off) or a positive number of "
                                        "tokens, got -128"),
    ("training", "align_tokens = 12.5", "training.align_tokens: expected 'auto' or an integer, got float 12.5"),
    ("training", "align_tokens = true", "training.align_tokens: expected 'auto' or an integer, got bool True"),
    ("lora", 'matmul_dtype = "float16"', "lora.matmul_dtype: expected one of auto, float32, bfloat16, got 'float16'"),
    ("lora", 'type = "dora"\nmatmul_dtype = "bfloat16"', "lora.matmul_dtype: 'bfloat16' applies to lora.type = "
                                                          "'lora' only"),
])
def test_a_bad_value_is_one_config_error_naming_the_file_and_the_key(capsys, _env, write_config, section, lines,
                                                                    expected):
    from farense.cli import main

    path = _with(write_config, section, lines)
    rc = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, err
    assert str(path) in err and expected in err, err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("section,lines", [("training", 'align_tokens = "auto"'), ("training", "align_tokens = 0"),
                                           ("training", "align_tokens = 128"), ("lora", 'matmul_dtype = "bfloat16"'),
                                           ("lora", 'matmul_dtype = "float32"')])
def test_the_good_values_pass(capsys, _env, write_config, section, lines):
    from farense.cli import main

    assert main(["config", "check", str(_with(write_config, section, lines))]) == 0, capsys.readouterr().err


def test_the_switches_are_not_fingerprinted(make_config):
    """How a step computes, like model.compute: a run may resume on another device, and configs written before
    these keys existed keep their fingerprint."""
    base = make_config()
    for sec, key, value in [("lora", "matmul_dtype", "bfloat16"), ("lora", "matmul_dtype", "float32"),
                            ("training", "align_tokens", 128), ("training", "align_tokens", 0)]:
        assert make_config(**{sec: {key: value}}).fingerprint == base.fingerprint
