"""Evaluation: a real evaluation of briefly trained adapters on the demo model, and its parts."""

from __future__ import annotations

import csv
import io
import math
import struct
from pathlib import Path

import orjson
import pytest

from farense.config import load_config
from farense.errors import DataError, FarenseError
from farense.release.evaluation import (
    EvaluationSummary,
    evaluate_run,
    load_test_examples,
    prompt_and_reference,
    report_fingerprint,
    summary_csv_bytes,
)
from farense.release.textmetrics import token_scores
from farense.run.plots import plot_f1_distribution, plot_loss_curves

REPO = Path(__file__).resolve().parent.parent
N_EXAMPLES = 4


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def demo_config(workspace: Path, demo_dir: Path, **sections):
    """V2 + demo overlay on the session's demo build, with a short schedule and short answers."""
    base = {
        "model": {"path": str(demo_dir / "model")},
        "data": {"dir": str(demo_dir / "data")},
        "training": {"iters": 20, "warmup_steps": 2, "max_seq_length": 128, "batch_size": 2, "grad_accumulation": 1,
                     "learning_rate": 1e-3},
        "validation": {"every_steps": 10, "batches": 2},
        "checkpoint": {"every_steps": 10},
        "evaluation": {"max_new_tokens": 6, "batch_size": 2},
    }
    for sec, values in sections.items():
        base[sec] = {**base.get(sec, {}), **values}
    return load_config("v2", overlays=["tiny"], workspace=workspace, config_dir=REPO / "configs").with_overrides(**base)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, demo_dir):
    """One briefly trained demo run (farense's trainer, 20 steps), evaluated on the first test examples."""
    from farense.train.runner import run_training

    ws = tmp_path_factory.mktemp("eval-ws")
    cfg = demo_config(ws, demo_dir)
    result = run_training(cfg, new_run=True, progress_bar=False, log=lambda _m: None)
    assert result.state.finished
    run = Path(result.run_dir)
    summary = evaluate_run(run, max_examples=N_EXAMPLES)
    return cfg, run, summary


# --------------------------------------------------------------------------- the real evaluation


def test_real_evaluation_writes_report_csv_and_plots(evaluated):
    cfg, run, s = evaluated
    assert isinstance(s, EvaluationSummary)
    ev = run / "evaluation"
    assert s.report_path == ev / "evaluation_report.json" and s.summary_csv == ev / "evaluation_summary.csv"
    assert [p.name for p in s.plots] == ["loss_curves.png", "f1_distribution.png"]
    for p in s.plots:
        assert png_size(p) == (1000, 600)
    report = orjson.loads(s.report_path.read_bytes())
    assert report["format"] == "farense.evaluation/1"
    assert report["fingerprint"] == report_fingerprint(report) == s.fingerprint
    assert report["config_fingerprint"] == cfg.fingerprint == s.config_fingerprint
    assert report["generation"] == {"sampler": "greedy", "max_new_tokens": 6, "batch_size": 2}
    training = orjson.loads((run / "training_summary.json").read_bytes())
    assert report["training"]["best_step"] == training["best_step"] in (10, 20)
    assert len(report["rows"]) == N_EXAMPLES == s.examples
    test_lines = (Path(cfg.data_dir) / "test.jsonl").read_bytes().splitlines()
    for i, row in enumerate(report["rows"]):
        example = orjson.loads(test_lines[i])
        assert row["index"] == i
        assert row["prompt"] == example["messages"][-2]["content"]
        assert row["reference"] == example["messages"][-1]["content"]
        assert isinstance(row["generated"], str) and 0 < row["generated_tokens"] <= 6
        assert {k: row[k] for k in ("precision", "recall", "f1", "exact_match")} == token_scores(
            row["generated"], row["reference"]).to_dict()
        assert row["loss"] > 0
    summ = report["summary"]
    assert summ["f1"] == pytest.approx(sum(r["f1"] for r in report["rows"]) / N_EXAMPLES)
    assert summ["test_perplexity"] == pytest.approx(math.exp(summ["test_loss"]))
    csv_rows = list(csv.DictReader(io.StringIO(s.summary_csv.read_text())))
    assert len(csv_rows) == 1 and csv_rows[0]["run_name"] == cfg.run_name
    assert float(csv_rows[0]["f1"]) == pytest.approx(s.f1)
    assert csv_rows[0]["report_fingerprint"] == s.fingerprint


def test_test_loss_is_mlx_lm_loss_over_the_test_examples(evaluated):
    from mlx_lm.tuner.trainer import evaluate

    from farense.release.evaluation import load_model
    from farense.train.data import make_datasets

    cfg, run, s = evaluated
    model, tokenizer = load_model(cfg, run / "adapters")
    _, examples = load_test_examples(cfg, N_EXAMPLES)
    ds = make_datasets(cfg, tokenizer, {"test": examples}, splits=("test",))["test"]
    # N_EXAMPLES is a multiple of the batch size, so mlx-lm's evaluate drops no example either.
    expected = evaluate(model, ds, 2, -1, max_seq_length=cfg.training.max_seq_length)
    assert s.test_loss == pytest.approx(expected, rel=1e-5)


def test_generation_is_greedy_and_repeatable(evaluated):
    cfg, run, s = evaluated
    first = orjson.loads(s.report_path.read_bytes())["rows"]
    again = evaluate_run(run, config=cfg.with_overrides(evaluation={"batch_size": 1}), max_examples=2)
    rows = orjson.loads(again.report_path.read_bytes())["rows"]
    assert [r["generated"] for r in rows] == [r["generated"] for r in first[:2]]  # batch of 1 == batch of 2


def test_evaluate_command(evaluated, capsys):
    from farense.cli import main

    cfg, run, s = evaluated
    assert main(["evaluate", str(run), "--max-examples", "2", "--max-new-tokens", "3", "--json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert out["examples"] == 2 and out["run_name"] == cfg.run_name
    report = orjson.loads((run / "evaluation" / "evaluation_report.json").read_bytes())
    assert report["generation"]["max_new_tokens"] == 3


def test_evaluated_run_goes_through_decision_and_promotion(evaluated, tmp_path):
    """The evaluated run's files are what decide and promote read; the release's adapters load."""
    from mlx_lm import load

    from farense.release.decision import compare_and_decide, report_from_run
    from farense.release.promotion import current_release, promote

    cfg, run, _ = evaluated
    out = compare_and_decide(None, report_from_run(run), cfg.decision, out_dir=run / "evaluation")
    assert not out.decision.ready  # a 20-step demo model does not reach F1 0.93
    rel = promote(run, None, tmp_path / "production", force=True)
    assert current_release(tmp_path / "production").id == rel.id and rel.forced
    model, tokenizer = load(str(cfg.model_path), adapter_path=str(tmp_path / "production" / "current" / "adapters"))
    assert model is not None


# --------------------------------------------------------------------------- parts, without a model


def test_prompt_and_reference_formats(tmp_path, demo_dir):
    cfg = demo_config(tmp_path, demo_dir)
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                         {"role": "assistant", "content": "A."}]}
    ex = prompt_and_reference(chat, cfg, 3)
    assert ex.messages == chat["messages"][:2] and ex.reference == "A." and ex.question == "Q?" and ex.index == 3
    comp = prompt_and_reference({"prompt": "Q?", "completion": "A."}, cfg, 0)
    assert comp.messages == [{"role": "user", "content": "Q?"}] and comp.reference == "A."
    with pytest.raises(DataError, match="plain 'text' data has none"):
        prompt_and_reference({"text": "just text"}, cfg, 0)


def test_test_split_problems_name_file_and_line(tmp_path, demo_dir):
    data = tmp_path / "data"
    data.mkdir()
    cfg = demo_config(tmp_path, demo_dir, data={"dir": str(data)})
    with pytest.raises(DataError, match="test.jsonl: file not found"):
        load_test_examples(cfg)
    (data / "test.jsonl").write_text('{"messages": [{"role": "user", "content": "Q"}]}\n{oops\n')
    with pytest.raises(DataError) as e:
        load_test_examples(cfg)
    assert "test.jsonl:1: the last message must be the assistant's answer" in str(e.value)
    assert "test.jsonl:2: malformed JSON" in str(e.value)


def test_run_without_adapters_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FarenseError, match="has no best adapters.*train it first"):
        evaluate_run(tmp_path / "run")


def test_report_fingerprint_covers_the_content():
    report = {"summary": {"f1": 0.5}, "rows": [{"generated": "a"}]}
    fp = report_fingerprint(report)
    assert report_fingerprint({**report, "fingerprint": fp}) == fp  # its own key is left out
    assert report_fingerprint({**report, "rows": [{"generated": "b"}]}) != fp


def test_summary_csv_has_one_row_per_run():
    report = {"run_name": "v2", "config_name": "v2", "config_fingerprint": "abc", "created_at": "t",
              "fingerprint": "fp", "summary": {"examples": 2, "f1": 0.5, "test_loss": None}, "training": {"best_step": 10}}
    rows = list(csv.DictReader(io.StringIO(summary_csv_bytes(report).decode())))
    assert rows == [rows[0]] and rows[0]["f1"] == "0.5" and rows[0]["test_loss"] == "" and rows[0]["best_step"] == "10"


def test_plots_with_little_or_no_data(tmp_path):
    empty = plot_loss_curves([], None, tmp_path / "loss.png")
    assert png_size(empty) == (1000, 600)
    rows = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5, "val_loss": 1.7}]
    summary = {"run_name": "v2", "best_step": 2, "early_stopped": True, "early_stop_step": 2, "train_val_gap": 0.2,
               "gap_status": "MODERADO"}
    assert png_size(plot_loss_curves(rows, summary, tmp_path / "loss2.png")) == (1000, 600)
    assert png_size(plot_f1_distribution([], tmp_path / "f1.png")) == (1000, 600)
    assert png_size(plot_f1_distribution([{"f1": 1.0}, {"f1": 0.0}, {"f1": None}], tmp_path / "f1b.png",
                                         threshold=0.93)) == (1000, 600)
