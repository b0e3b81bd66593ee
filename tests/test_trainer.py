"""The trainer on the real demo model: outputs, retention, early stopping, NaN, fingerprints, mlx-lm loading."""

from __future__ import annotations

import math

import orjson
import pytest

from farense.codes import RunState
from farense.config import EarlyStoppingConfig
from farense.errors import FingerprintMismatch, NumericalError, Preempted
from farense.overfitting import (
    EarlyStoppingState,
    GapStatus,
    classify_gap,
    observe_validation,
)
from farense.run.checkpoint import CheckpointStore
from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics
from farense.signals import PreemptionFlag
from farense.train.runner import run_training

pytestmark = pytest.mark.timeout(300)


def test_a_run_writes_the_seed_files_and_mlx_lm_loads_its_adapters(make_config):
    cfg = make_config()
    result = run_training(cfg, progress_bar=False)
    paths = RunPaths(cfg.run_dir)

    assert result.state is RunState.COMPLETED and result.step == result.total_steps == 24
    rows = read_metrics(paths.metrics_jsonl)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {"train_loss", "learning_rate", "tokens_per_second", "peak_memory_gb"} <= set(rows[0])
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [4, 8, 12, 16, 20, 24]
    assert all(r["gap_status"] in {s.value for s in GapStatus} for r in val_rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5, "loss should visibly fall on the demo data"
    # Warm-up: the learning rate climbs over the first 3 steps, then decays (cosine).
    lrs = [r["learning_rate"] for r in rows]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[-1] < lrs[3]

    summary = orjson.loads(paths.summary.read_bytes())
    assert summary["fingerprint"] == cfg.fingerprint and summary["state"] == "completed"
    assert summary["best_step"] == result.best_step and summary["best_val_loss"] == min(r["val_loss"] for r in val_rows)
    assert orjson.loads(paths.metrics_json.read_bytes())["history"] == rows
    assert paths.metrics_csv.read_text().splitlines()[0].startswith("step,epoch,train_loss,val_loss")
    assert orjson.loads((paths.adapters / "best.json").read_bytes())["step"] == result.best_step

    # The best adapters load as they are in mlx-lm and generate text.
    from mlx_lm import generate, load

    model, tokenizer = load(cfg.model_path, adapter_path=str(paths.adapters))
    text = generate(model, tokenizer, prompt="Onde joga o Farense?", max_tokens=5)
    assert isinstance(text, str)

    # Retention: exactly the last K checkpoints plus the best checkpoint remain.
    steps = [i.step for i in CheckpointStore(paths.checkpoints).list()]
    expected = {16, 24} | {summary["best_checkpoint_step"]}
    assert set(steps) == expected


def test_how_far_the_device_runs_ahead_changes_no_bit_of_the_result(make_config):
    """Issue 14: the loop queues steps ahead of its bookkeeping; 0 (read every step before the next),
    1 and 3 steps ahead give byte-identical adapters, checkpoints and metrics losses."""
    results = {}
    for ahead in (0, 1, 3):
        cfg = make_config(name=f"ahead-{ahead}")
        run_training(cfg, progress_bar=False, steps_ahead=ahead)
        paths = RunPaths(cfg.run_dir)
        store = CheckpointStore(paths.checkpoints)
        results[ahead] = ((paths.adapters / "adapters.safetensors").read_bytes(),
                          (store.latest_verified().path / "optimizer.safetensors").read_bytes(),
                          [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)])
    assert results[0] == results[1] == results[3]
    assert [step for step, _, _ in results[3][2]] == list(range(1, 25))


def test_phase_times_add_up_to_the_run_and_name_its_fixed_costs(make_config):
    """Issue 14.3: training_summary.json books the run's wall time per phase (the bench's table)."""
    import time

    cfg = make_config()
    started = time.monotonic()
    run_training(cfg, progress_bar=False)
    took = time.monotonic() - started
    summary = orjson.loads(RunPaths(cfg.run_dir).summary.read_bytes())
    phases = summary["phase_seconds"]
    for name in ("checks_and_resume_choice", "model_load", "data_adapters_optimizer", "first_step_with_compile",
                 "steps", "validation", "checkpoints", "finish_metrics_files", "finish_plot"):
        assert phases[name] >= 0, name
    assert phases["steps"] > 0 and phases["validation"] > 0 and phases["checkpoints"] > 0
    booked = sum(v for k, v in phases.items() if k != "process_start_to_training")
    assert 0.8 * took <= booked <= took + 0.05, (booked, took)
    assert abs(summary["training_started_at"] - time.time()) < took + 60


def test_a_stop_with_several_steps_in_flight_is_served_after_the_last_queued_one(make_config):
    """Three steps ahead: a stop asked after step 13 lets the queued steps 14-16 finish; 16 is
    checkpointed (it is also a checkpoint step), nothing is lost, and resume continues from it."""
    cfg = make_config(checkpoint={"every_steps": 8, "keep_last": 3}, validation={"every_steps": 12})
    flag = PreemptionFlag()
    with pytest.raises(Preempted, match="after step 16;"):
        run_training(cfg, progress_bar=False, preemption=flag, steps_ahead=3,
                     on_step_end=lambda step, row, model: flag.request() if step == 13 else None)
    paths = RunPaths(cfg.run_dir)
    assert CheckpointStore(paths.checkpoints).latest_verified().step == 16
    result = run_training(cfg, progress_bar=False)
    assert result.resumed_from == 16 and result.state is RunState.COMPLETED
    assert [r["step"] for r in read_metrics(paths.metrics_jsonl)] == list(range(1, 25))


def test_steps_ahead_from_the_environment_is_a_small_whole_number():
    from farense.commands.train import _steps_ahead
    from farense.errors import ConfigError
    from farense.train.loop import default_steps_ahead

    # The defaults, as measured (README, "Benchmarks"): none on the CPU, one on a GPU, two with ranks.
    assert [default_steps_ahead(1, "cpu"), default_steps_ahead(2, "cpu")] == [0, 0]
    assert [default_steps_ahead(1, "gpu"), default_steps_ahead(2, "gpu")] == [1, 2]

    assert _steps_ahead({}) is None and _steps_ahead({"FARENSE_STEPS_AHEAD": " 2 "}) == 2
    for bad in ("-1", "two", "1.5", "65"):
        with pytest.raises(ConfigError, match="FARENSE_STEPS_AHEAD.*whole number of steps from 0 to 64"):
            _steps_ahead({"FARENSE_STEPS_AHEAD": bad})


def test_resuming_under_a_changed_training_config_is_refused_with_the_fields(make_config):
    cfg = make_config(checkpoint={"every_steps": 4})
    run_training(cfg.with_overrides(training={"iters": 8}), progress_bar=False)
    changed = cfg.with_overrides(training={"iters": 8, "learning_rate": 1e-3})
    with pytest.raises(FingerprintMismatch) as e:
        run_training(changed, progress_bar=False)
    msg = str(e.value)
    assert "training.learning_rate" in msg and "0.0002" in msg and "0.001" in msg and "--new-run" in msg
    # --new-run starts over.
    result = run_training(changed, new_run=True, progress_bar=False)
    assert result.resumed_from is None and result.state is RunState.COMPLETED


@pytest.mark.parametrize("ahead", [0, 1])
def test_a_nan_loss_stops_the_run_naming_the_step_and_leaves_no_bad_checkpoint(make_config, ahead):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    cfg = make_config(checkpoint={"every_steps": 4})

    def poison(step, row, model):
        if step == 10:  # a numerical blow-up: one adapter weight becomes NaN
            name, w = next((k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b"))
            model.update(tree_unflatten([(name, w + mx.array(float("nan")))]))

    # With the device one step ahead of the bookkeeping the hook runs while step 11 is already
    # queued, so the poisoned weight first shows in step 12's loss; with none, in step 11's.
    with pytest.raises(NumericalError, match=rf"step {11 + ahead}: the training loss is nan"):
        run_training(cfg, progress_bar=False, on_step_end=poison, steps_ahead=ahead)
    paths = RunPaths(cfg.run_dir)
    store = CheckpointStore(paths.checkpoints)
    assert [i.step for i in store.list()] == [4, 8]
    latest = store.latest_verified()
    assert latest.step == 8
    state = orjson.loads(latest.file("state.json").read_bytes())
    assert math.isfinite(state["progress"]["early_stopping"]["best_val_loss"])
    assert orjson.loads(paths.state.read_bytes())["state"] == "failed"
    # Resume restarts from the last good checkpoint and finishes.
    result = run_training(cfg, progress_bar=False)
    assert result.resumed_from == 8 and result.state is RunState.COMPLETED


@pytest.mark.parametrize("ahead", [0, 1])
def test_preemption_flag_checkpoints_the_current_step_and_resume_loses_nothing(make_config, ahead):
    cfg = make_config()
    flag = PreemptionFlag()

    def preempt(step, row, model):
        if step == 13:
            flag.request()

    # Requested after step 13 (as a signal handler would). With no step in flight, step 13 is
    # checkpointed and the run stops; with step 14 already queued, step 14 completes and is
    # checkpointed, then the run stops. No completed step is lost either way.
    stop = 13 + ahead
    with pytest.raises(Preempted, match=f"after step {stop};"):
        run_training(cfg, progress_bar=False, preemption=flag, on_step_end=preempt, steps_ahead=ahead)
    paths = RunPaths(cfg.run_dir)
    assert CheckpointStore(paths.checkpoints).latest_verified().step == stop
    assert [r["step"] for r in read_metrics(paths.metrics_jsonl)][-1] == stop
    assert orjson.loads(paths.state.read_bytes())["state"] == "preempted"
    result = run_training(cfg, progress_bar=False)
    assert result.resumed_from == stop
    assert [r["step"] for r in read_metrics(paths.metrics_jsonl)] == list(range(1, 25))


@pytest.mark.parametrize(
    "losses, patience, min_delta, stop_at",
    [
        ([3.0, 2.0, 1.9, 1.95, 1.92, 1.91], 3, 0.0, 6),   # best 1.9 at eval 3, then three evals without beating it
        ([3.0, 2.0, 1.9995, 1.9991, 1.9990], 3, 0.001, 5),  # gains under min_delta do not count (nor creep)
        ([3.0, 2.0, 1.9995, 1.9980, 1.5], 3, 0.001, None),  # 1.9980 beats the reference 2.0 by > 0.001
        ([3.0, 2.0, 1.0, 0.5, 0.25], 2, 0.001, None),       # always improving: never stops
        ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5], 0, 0.0, None),     # patience 0 disables early stopping
        ([1.0, 1.0, 1.0], 2, 0.0, 3),                       # equal is not an improvement
    ],
)
def test_early_stopping_stops_at_the_right_evaluation(losses, patience, min_delta, stop_at):
    cfg = EarlyStoppingConfig(patience=patience, min_delta=min_delta)
    state = EarlyStoppingState()
    stopped = None
    for i, loss in enumerate(losses, start=1):
        state, _ = observe_validation(state, i, loss, cfg)
        if state.stopped_at is not None:
            stopped = state.stopped_at
            break
    assert stopped == stop_at


def test_best_follows_the_lowest_loss_even_below_min_delta():
    cfg = EarlyStoppingConfig(patience=5, min_delta=0.1)
    s, best = observe_validation(EarlyStoppingState(), 1, 2.0, cfg)
    assert best
    s, best = observe_validation(s, 2, 1.95, cfg)  # better, but not by min_delta
    assert best and s.best_step == 2 and s.evaluations_without_improvement == 1


@pytest.mark.parametrize("gap, label", [(-0.3, "EXCELENTE"), (0.0499, "EXCELENTE"), (0.05, "BOM"), (0.1499, "BOM"),
                                        (0.15, "MODERADO"), (0.2999, "MODERADO"), (0.30, "CRÍTICO"), (2.27, "CRÍTICO")])
def test_gap_labels_follow_the_documented_thresholds(gap, label):
    from farense.config import OverfittingConfig

    assert classify_gap(gap, OverfittingConfig()).value == label


def _preempted_run(make_config, at: int):
    """A run preempted after step `at` (checkpoints every 4 steps and at `at`); its config and paths.

    The stop is requested after step at - 1 (not a checkpoint step), while step `at` is already
    queued: the run finishes that step, checkpoints it and stops."""
    cfg = make_config(checkpoint={"every_steps": 4, "keep_last": 3})
    flag = PreemptionFlag()
    with pytest.raises(Preempted, match=f"after step {at};"):
        run_training(cfg, progress_bar=False, preemption=flag, steps_ahead=1,
                     on_step_end=lambda step, row, model: flag.request() if step == at - 1 else None)
    return cfg, RunPaths(cfg.run_dir)


def test_checkpoints_that_fail_verification_are_quarantined_and_never_silently_started_over(make_config):
    """Issue 13.6: every checkpoint damaged -> none deleted (moved to quarantine/ with the reason), a
    distinct exit code, the same refusal on the retry, and --new-run starts over explicitly."""
    from farense.codes import ExitCode
    from farense.errors import NoUsableCheckpoint

    cfg, paths = _preempted_run(make_config, 10)
    committed = sorted(p.name for p in paths.checkpoints.iterdir() if p.name.startswith("step-"))
    assert committed == ["step-00000004", "step-00000008", "step-00000010"]
    for name in committed:
        f = paths.checkpoints / name / "adapters.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    for attempt in range(2):  # the retry must not start over either
        with pytest.raises(NoUsableCheckpoint, match=r"(?s)no checkpoint of .* can be loaded.*--new-run") as e:
            run_training(cfg, progress_bar=False)
        assert e.value.exit_code == ExitCode.NO_USABLE_CHECKPOINT == 74 and not e.value.retryable
        assert orjson.loads(paths.state.read_bytes())["state"] == "failed"
    assert not [p for p in paths.checkpoints.iterdir() if p.name.startswith("step-")]
    assert sorted(p.name for p in paths.quarantine.iterdir()) == sorted(
        [*committed, *(n + ".reason.json" for n in committed)])
    reason = orjson.loads((paths.quarantine / "step-00000010.reason.json").read_bytes())
    assert "adapters.safetensors: size" in reason["reason"]
    result = run_training(cfg, progress_bar=False, new_run=True)
    assert result.resumed_from is None and result.state is RunState.COMPLETED
    assert not paths.quarantine.exists()


def test_a_checkpoint_whose_state_does_not_parse_is_quarantined_and_resume_uses_the_previous(make_config):
    """Issue 13.7: state.json that is not JSON (manifest re-hashed) makes the checkpoint invalid, not the config."""
    import hashlib

    cfg, paths = _preempted_run(make_config, 10)
    newest = paths.checkpoints / "step-00000010"
    bad = b"this is not json {"
    (newest / "state.json").write_bytes(bad)
    manifest = orjson.loads((newest / "MANIFEST.json").read_bytes())
    manifest["files"]["state.json"] = {"size": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
    (newest / "MANIFEST.json").write_bytes(orjson.dumps(manifest))
    logs: list[str] = []
    result = run_training(cfg, progress_bar=False, log=logs.append)
    assert result.resumed_from == 8 and result.state is RunState.COMPLETED
    assert "state.json cannot be read as JSON" in orjson.loads(
        (paths.quarantine / "step-00000010.reason.json").read_bytes())["reason"]
    assert any("moved unusable checkpoint" in line for line in logs)


def test_resume_skips_and_repairs_metrics_lines_that_are_not_rows(make_config):
    """Issue 13.7: '[1,2,3]', '{"step":"abc"}' and torn lines in metrics.jsonl never crash a resume."""
    cfg, paths = _preempted_run(make_config, 10)
    with paths.metrics_jsonl.open("ab") as f:
        f.write(b'[1,2,3]\n{"step":"abc"}\n{"step": 5, "train_loss": [1]}\n{"step": 10, "tra')
    logs: list[str] = []
    result = run_training(cfg, progress_bar=False, log=logs.append)
    assert result.resumed_from == 10 and result.state is RunState.COMPLETED
    for line in (11, 12, 13, 14):  # after the 10 rows of steps 1..10
        assert any(f"{paths.metrics_jsonl}:{line}: skipped" in m for m in logs), logs
    assert [r["step"] for r in read_metrics(paths.metrics_jsonl)] == list(range(1, 25))


def test_gradient_checkpointing_wraps_a_layer_class_once_and_can_be_switched_off():
    """mlx-lm's grad_checkpoint wraps the class again at each call: a second training in one process
    would recompute every layer twice. Ours wraps once; the switch decides per run."""
    import mlx.core as mx
    import mlx.nn as nn

    from farense.train.setup import set_grad_checkpoint

    forwards = []

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def __call__(self, x):
            forwards.append(1)
            return self.linear(x).sum()

    block = Block()
    x = mx.ones((2, 4))

    def forwards_per_gradient() -> int:
        forwards.clear()
        _, grads = nn.value_and_grad(block, lambda m, v: m(v))(block, x)
        mx.eval(grads)
        return len(forwards)

    plain = forwards_per_gradient()
    assert plain == 1
    set_grad_checkpoint(Block, True)
    once = forwards_per_gradient()
    assert once == 2, "checkpointing recomputes the forward once in the backward pass"
    set_grad_checkpoint(Block, True)
    set_grad_checkpoint(Block, True)
    assert forwards_per_gradient() == once, "a second and third set-up must not stack recomputations"
    set_grad_checkpoint(Block, False)
    assert forwards_per_gradient() == plain
    assert Block.__call__ is Block.__dict__["__call__"] and "_farense_plain_call" in Block.__dict__
