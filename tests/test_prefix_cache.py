"""The frozen prefix cache (farense.train.prefix_cache) against the uncached path, on the tiny demo model
with LoRA on its last 2 of 4 blocks.

Tolerance: none. On the CPU in fp32 the cached path runs the same operations on the same arrays in
the same order (the prefix is computed on the very padded batch the uncached step sees; the padded
positions differ, zeros against pad-token states, but under the causal mask and the loss mask they
reach nothing real), so logits at real positions, losses, gradients and trained adapters are
expected equal to the last bit, which is what resume's byte-identical adapters need. A difference
of even one ulp would mean an operation or its order changed, so the tests assert equality and
print the largest difference seen.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

from farense.train.batching import eval_batches, make_batch, position_of, train_batches
from farense.train.data import validate_data
from farense.train import prefix_cache as pc
from farense.train.setup import set_up

LORA = {"num_layers": 2, "dropout": 0.1,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]}
TRAINING = {"batch_size": 4, "grad_accumulation": 2, "max_seq_length": 128}


@pytest.fixture
def build(make_config):
    def make(lora: dict[str, Any] | None = None, **training: Any):
        cfg = make_config(lora={**LORA, **(lora or {})}, training={**TRAINING, **training})
        _, loaded = validate_data(cfg)
        return cfg, set_up(cfg, loaded, lambda line: None)

    return make


def _max_diff(a, b) -> float:
    import mlx.core as mx

    return mx.abs(a - b).max().item()


def _tree_diffs(a, b) -> list[float]:
    from mlx.utils import tree_flatten

    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    return [_max_diff(x, y) for (_, x), (_, y) in zip(fa, fb)]


def test_logits_and_loss_equal_uncached(build):
    import mlx.core as mx
    from farense.train.losses import training_loss

    default_loss = training_loss("cpu")  # the loop's uncached loss on the CPU

    cfg, s = build()
    model = s.model
    assert pc.supported(model) is None
    assert pc.first_adapted_block(model) == 2
    cache = pc.PrefixCache(model, s.train_set, cfg.training.max_seq_length)
    loss = pc.make_cached_loss(cache.first)
    model.eval()
    worst_logit = worst_loss = 0.0
    # Every 5th group and the last (groups are sorted by length): padded widths from the shortest to the
    # longest, in a fifth of the time of all 45 (each group: four uncompiled forwards, a read per example).
    groups = s.train_groups[::5] + s.train_groups[-1:]
    for g in groups:
        tokens, lengths = make_batch(s.train_set, g, cfg.training.max_seq_length)
        batch = cache.batch(g, tokens)
        plain, cached = model(tokens[:, :-1]), pc.suffix_forward(model, batch[1])
        assert plain.shape == cached.shape
        for j in range(len(g)):  # real positions; padded ones differ (zeros in, not pad-token states)
            n = pc.stored_positions(int(lengths[j, 1].item()), cfg.training.max_seq_length)
            worst_logit = max(worst_logit, _max_diff(plain[j, :n], cached[j, :n]))
        (l1, t1), (l2, t2) = default_loss(model, tokens, lengths), loss(model, batch, lengths)
        worst_loss = max(worst_loss, abs(l1.item() - l2.item()))
        assert t1.item() == t2.item()
        assert mx.array_equal(l1, l2)
    # The validation set through its own cache, in validation's order.
    vcache = pc.PrefixCache(model, s.valid_set, cfg.training.max_seq_length)
    plain_batches = eval_batches(s.valid_set, s.valid_groups, cfg.training.max_seq_length)
    for (tokens, lengths), (batch, lengths2) in zip(plain_batches, pc.cached_eval_batches(
            vcache, s.valid_groups, cfg.training.max_seq_length)):
        assert mx.array_equal(default_loss(model, tokens, lengths)[0], loss(model, batch, lengths2)[0])
    print(f"max |logit diff| {worst_logit}, max |loss diff| {worst_loss}")
    assert worst_logit == 0.0 and worst_loss == 0.0


@pytest.mark.parametrize("head_only", [False, True], ids=["whole-head", "head-where-counted"])
def test_lora_gradients_equal_uncached_with_dropout(build, head_only):
    import mlx.core as mx
    import mlx.nn as nn
    from farense.train.losses import training_loss

    default_loss = training_loss("cpu")  # the loop's uncached loss on the CPU

    cfg, s = build()
    model = s.model
    model.train()  # dropout 0.1 inside the LoRA layers is live
    cache = pc.PrefixCache(model, s.train_set, cfg.training.max_seq_length, head_only_where_counted=head_only)
    plain_vg = nn.value_and_grad(model, default_loss)
    cached_vg = nn.value_and_grad(model, pc.make_cached_loss(cache.first))
    worst, skipped = 0.0, 0
    for k, g in enumerate(s.train_groups[::8]):  # short to long
        tokens, lengths = make_batch(s.train_set, g, cfg.training.max_seq_length)
        mx.random.seed(100 + k)
        (l1, _), g1 = plain_vg(model, tokens, lengths)
        mx.random.seed(100 + k)
        batch = cache.batch(g, tokens)
        skipped += batch[1].shape[0] * batch[1].shape[1] - int(batch[3].sum().item()) if head_only else 0
        (l2, _), g2 = cached_vg(model, batch, lengths)
        diffs = _tree_diffs(g1, g2)
        assert len(diffs) == 2 * 2 * len(LORA["keys"])  # lora_a and lora_b of each adapted layer
        worst = max(worst, *diffs, abs(l1.item() - l2.item()))
    print(f"max |grad or loss diff| with dropout {worst}; head positions skipped {skipped}")
    assert worst == 0.0
    assert skipped > 0 or not head_only  # mask_prompt (V2's): the prompts' positions never reach the head


def _train(cfg, s, cached: bool, steps: int, head_only: bool = False) -> list[float]:
    """`steps` optimizer steps the way TrainingLoop._launch queues them (compiled step, RNG reseeded
    per step, grad_accumulation micro-steps)."""
    import mlx.core as mx
    from farense.train.losses import training_loss

    default_loss = training_loss("cpu")  # the loop's uncached loss on the CPU

    from farense.train.loop import make_step
    from farense.train.progress import step_seed

    t = cfg.training
    kw = dict(seed=t.seed, start=position_of(0, len(s.train_groups)), max_seq_length=t.max_seq_length)
    if cached:
        cache = pc.PrefixCache(s.model, s.train_set, t.max_seq_length, head_only_where_counted=head_only)
        loss, batches = pc.make_cached_loss(cache.first), pc.cached_train_batches(cache, s.train_groups, **kw)
    else:
        loss, batches = default_loss, train_batches(s.train_set, s.train_groups, **kw)
    step_fn, state = make_step(s.model, s.optimizer, t.grad_accumulation, loss)
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


@pytest.mark.parametrize("head_only", [False, True], ids=["whole-head", "head-where-counted"])
def test_optimizer_steps_with_dropout_give_the_same_adapters(build, head_only):
    steps = 4
    cfg, plain = build(warmup_steps=0)
    _, cached = build(warmup_steps=0)
    assert cfg.lora.dropout > 0 and cfg.training.mask_prompt
    assert max(_tree_diffs(plain.model.trainable_parameters(), cached.model.trainable_parameters())) == 0.0
    l1, l2 = _train(cfg, plain, False, steps), _train(cfg, cached, True, steps, head_only)
    params = _tree_diffs(plain.model.trainable_parameters(), cached.model.trainable_parameters())
    adam = _tree_diffs(plain.optimizer.state, cached.optimizer.state)
    print(f"losses {l1}; max |param diff| {max(params)}, max |optimizer state diff| {max(adam)}")
    assert l1 == l2
    assert max(params) == 0.0 and max(adam) == 0.0
    assert l1[0] != l1[-1]  # it trained


def test_size_estimate_matches_bytes_held(build):
    import mlx.core as mx

    cfg, s = build()
    msl = cfg.training.max_seq_length
    cache = pc.PrefixCache(s.model, s.train_set, msl)
    lengths = [len(s.train_set[i][0]) for i in range(len(s.train_set))]
    members = sorted(i for g in s.train_groups for i in g)  # the ragged tail of batch_groups is never trained
    expected = pc.estimate_bytes([lengths[i] for i in members], msl, s.model.args.hidden_size, 4)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    cache.fill(s.train_groups)
    gc.collect()
    held = mx.get_active_memory() - before
    assert len(cache) == len(members)
    assert cache.nbytes == expected == cache.estimate(members)
    # Each entry is its own buffer of its real positions: the padded batch it came from is freed. MLX's
    # buffer cache may serve a request with a freed buffer up to 2 pages larger (here: the prefix's own
    # intermediates), so what the allocator counts exceeds the payload by at most that per entry.
    slack = held - expected
    print(f"estimate {expected} bytes, entries {cache.nbytes}, active memory grew by {held} "
          f"(+{slack}, {slack / len(cache):.0f} bytes an entry)")
    assert 0 <= slack <= len(cache) * 2 * 4096


def test_auto_rule(build):
    cfg, s = build()
    lengths = [len(s.train_set[i][0]) for i in range(len(s.train_set))]
    msl = cfg.training.max_seq_length
    size = pc.estimate_bytes(lengths, msl, s.model.args.hidden_size, 4)
    on = pc.choose_prefix_cache(s.model, "auto", lengths=lengths, max_seq_length=msl, budget_bytes=None)
    assert on.use and on.first == 2 and on.cache_bytes == size, on.describe()
    over = pc.choose_prefix_cache(s.model, "auto", lengths=lengths, max_seq_length=msl, budget_bytes=size - 1)
    assert not over.use and "budget" in over.reason
    small = pc.choose_prefix_cache(s.model, "auto", lengths=lengths, max_seq_length=msl, budget_bytes=None,
                                   min_share=0.75)
    assert not small.use and "pays" in small.reason
    assert not pc.choose_prefix_cache(s.model, "off", lengths=lengths, max_seq_length=msl, budget_bytes=None).use
    _, every = build(lora={"num_layers": -1})
    refused = pc.choose_prefix_cache(every.model, "on", lengths=lengths, max_seq_length=msl, budget_bytes=None)
    assert not refused.use and "no frozen prefix" in refused.reason


# ---------------------------------------------------------------------------------------------
# Wired into the trainer (training.prefix_cache): whole runs, resume included


def _finished_run(cfg, **kw) -> dict[str, Any]:
    """Train `cfg` to its end; the bytes and losses an exact run must reproduce."""
    from farense.run.checkpoint import CheckpointStore
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics
    from farense.train.runner import run_training

    import mlx.core as mx
    import numpy as np

    run_training(cfg, progress_bar=False, **kw)
    paths = RunPaths(cfg.run_dir)
    latest = CheckpointStore(paths.checkpoints).latest_verified()
    # The optimizer state by value: a resumed run writes the same arrays in another order in the file,
    # cache or not (the adapters' bytes are what resume promises).
    optimizer = {k: np.array(v).tobytes() for k, v in mx.load(str(latest.path / "optimizer.safetensors")).items()}
    return {"step": latest.step,
            "adapters": (paths.adapters / "adapters.safetensors").read_bytes(),
            "checkpoint": (latest.path / "adapters.safetensors").read_bytes(),
            "optimizer": optimizer,
            "metrics": [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)]}


# 12 steps of 2 micro-batches, validation and checkpoints every 4.
SHORTER = {"training": {"iters": 12}, "validation": {"every_steps": 4}, "checkpoint": {"every_steps": 4}}


def _config(make_config, name: str, prefix_cache: str):
    return make_config(name=name, lora=LORA, training={**SHORTER["training"], "prefix_cache": prefix_cache},
                       validation=SHORTER["validation"], checkpoint=SHORTER["checkpoint"])


def test_a_cached_run_equals_an_uncached_one_and_an_interrupted_cached_run_resumes_exactly(make_config):
    """training.prefix_cache through run_training (tiny model, LoRA with dropout on the last 2 of 4
    blocks, 12 steps of 2 micro-batches, validation and checkpoints every 4): the cached run's best
    adapters, final checkpoint, optimizer state and every train and validation loss equal the uncached
    run's to the bit; a cached run stopped after step 7 (the preemption path: checkpoint, exit) and
    resumed in a fresh set-up, whose cache refills from nothing, ends with the same bytes."""
    from farense.errors import Preempted
    from farense.signals import PreemptionFlag
    from farense.train.runner import run_training

    plain = _finished_run(_config(make_config, "plain", "off"))
    lines: list[str] = []
    cached = _finished_run(_config(make_config, "cached", "auto"), log=lines.append)
    assert any(line.startswith("prefix cache: on (blocks 0-1 of 4 frozen") for line in lines), lines
    assert any(line.startswith("prefix cache: training:") and "skipped in" in line for line in lines), lines
    assert plain["step"] == 12 and len(plain["metrics"]) == 12
    assert cached == plain

    cfg = _config(make_config, "resumed", "on")
    flag = PreemptionFlag()

    def preempt(step, row, model):
        if step == 7:
            flag.request()

    with pytest.raises(Preempted, match="after step 7;"):
        run_training(cfg, progress_bar=False, preemption=flag, on_step_end=preempt)
    resumed = _finished_run(cfg)
    assert resumed == cached


def test_prefix_cache_is_validated_and_not_fingerprinted(make_config):
    from farense.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training.prefix_cache: expected one of auto, on, off, got 'yes'"):
        make_config(training={"prefix_cache": "yes"})
    assert (make_config(training={"prefix_cache": "on"}).fingerprint
            == make_config(training={"prefix_cache": "off"}).fingerprint)
