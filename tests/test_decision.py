"""Comparison and decision: every rule at, just below and just above its threshold.

`make_fake_run` builds a finished, evaluated run directory by hand (the trainer's and the
evaluator's file formats); test_promotion imports it.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

import farense
from farense.config import DecisionConfig, config_to_json, load_config
from farense.errors import FarenseError
from farense.release import decision as decision_mod
from farense.release.decision import (
    TOLERANCE,
    Decision,
    RunReport,
    compare,
    compare_and_decide,
    decide,
    load_report,
    read_decision,
    report_from_run,
    write_decision,
)
from farense.run.fsutil import sha256_file

CONFIG_DIR = Path(farense.__file__).resolve().parent.parent / "configs"
T = DecisionConfig(max_gap=0.15, min_f1=0.93, max_f1_drop=0.01)


def make_fake_run(
    workspace: Path,
    name: str,
    *,
    f1: float = 0.95,
    precision: float = 0.94,
    recall: float = 0.96,
    exact_match: float = 0.5,
    gap: float | None = 0.10,
    gap_status: str = "BOM",
    test_loss: float = 1.25,
    best_step: int = 120,
    final_step: int = 150,
    training_time: float = 3723.0,
    config: str = "v2",
    adapters: bytes | None = None,
) -> Path:
    """A finished, evaluated run: config.json, adapters, metrics, training summary, evaluation report."""
    cfg = load_config(config, workspace=workspace, config_dir=CONFIG_DIR).with_overrides(output={"run_name": name})
    run = cfg.run_dir
    (run / "adapters").mkdir(parents=True)
    (run / "evaluation").mkdir()
    (run / "config.json").write_bytes(config_to_json(cfg))
    (run / "adapters" / "adapters.safetensors").write_bytes(adapters or f"weights of {name}".encode() * 100)
    (run / "adapters" / "adapter_config.json").write_bytes(orjson.dumps({"num_layers": 2, "lora_parameters": {"rank": 4}}))
    rows = []
    for step in range(1, final_step + 1):
        row = {"step": step, "epoch": step / 100, "train_loss": 2.0 - step / 200, "learning_rate": 1e-4}
        if step % 30 == 0:
            row |= {"val_loss": 2.1 - step / 250, "gap": 0.1, "gap_status": "BOM"}
        rows.append(row)
    (run / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    summary = {
        "run_name": name, "config_name": cfg.name, "fingerprint": cfg.fingerprint, "state": "completed",
        "final_step": final_step, "total_steps": final_step, "best_step": best_step, "best_val_loss": 1.3,
        "train_loss_at_best": 1.2, "train_val_gap": gap, "gap_status": gap_status, "early_stopped": False,
        "early_stop_step": None, "training_time_seconds": training_time, "tokens_seen": 12345,
    }
    (run / "training_summary.json").write_bytes(orjson.dumps(summary))
    report = {
        "format": "farense.evaluation/1", "run_name": name, "config_name": cfg.name,
        "config_fingerprint": cfg.fingerprint, "created_at": "2025-01-01T00:00:00Z",
        "summary": {"examples": 10, "f1": f1, "precision": precision, "recall": recall, "exact_match": exact_match,
                    "test_loss": test_loss, "test_perplexity": math.exp(test_loss)},
        "training": {k: summary[k] for k in ("best_step", "final_step", "train_val_gap", "gap_status")},
        "adapters": {"path": str(run / "adapters"), "sha256": sha256_file(run / "adapters" / "adapters.safetensors")},
        "rows": [],
    }
    (run / "evaluation" / "evaluation_report.json").write_bytes(orjson.dumps(report))
    return run


@pytest.fixture
def base(tmp_path) -> RunReport:
    return report_from_run(make_fake_run(tmp_path, "cand"))


def _cand(base: RunReport, **kw) -> RunReport:
    return dataclasses.replace(base, **kw)


# --------------------------------------------------------------------------- rules at their thresholds


@pytest.mark.parametrize(
    "gap, passed",
    [
        (0.15, False),  # at the threshold: not below it
        (0.45 - 0.30, False),  # 0.15000000000000002: equal within tolerance
        (0.15 - 1e-6, True),  # just below
        (0.15 + 1e-6, False),  # just above
        (0.10, True),
        (-0.02, True),  # validation better than train
        (2.27, False),  # the seed's V1
        (None, False),
        (float("nan"), False),
    ],
)
def test_gap_below_max(base, gap, passed):
    d = decide(_cand(base, train_val_gap=gap), None, T)
    rule = d.rule("gap_below_max")
    assert rule.passed is passed
    assert rule.threshold == 0.15
    assert rule.inputs["train_val_gap"] is gap
    assert d.preferred is passed


@pytest.mark.parametrize(
    "f1, passed",
    [
        (0.93, True),  # at the threshold
        ((0.92 + 0.94) / 2, True),  # 0.9299999999999999: equal within tolerance
        (0.93 - 1e-6, False),  # just below
        (0.93 + 1e-6, True),  # just above
        (0.9602, True),  # the seed's V1
        (0.5, False),
    ],
)
def test_f1_at_least_min_and_ready_for_production(base, f1, passed):
    d = decide(_cand(base, f1=f1), None, T)
    assert d.rule("f1_at_least_min").passed is passed
    assert d.rule("ready_for_production").passed is passed
    assert d.ready is passed
    assert d.preferred is passed  # gap 0.10 passes, no incumbent passes
    assert d.rule("ready_for_production").kind == "readiness"


@pytest.mark.parametrize(
    "cand_f1, passed",
    [
        (0.94, True),  # exactly max_f1_drop below 0.95 (0.94 - 0.95 = -0.010000000000000009)
        (0.94 - 1e-6, False),  # just more than the allowed drop
        (0.94 + 1e-6, True),  # just less
        (0.95, True),
        (0.99, True),
    ],
)
def test_f1_not_meaningfully_below_incumbent(base, cand_f1, passed):
    incumbent = _cand(base, name="inc", f1=0.95)
    d = decide(_cand(base, f1=cand_f1), incumbent, T)
    rule = d.rule("f1_not_meaningfully_below_incumbent")
    assert rule.passed is passed
    assert rule.inputs["incumbent_f1"] == 0.95
    assert rule.inputs["delta"] == pytest.approx(cand_f1 - 0.95)
    assert d.preferred is passed
    assert d.ready  # 0.94 >= 0.93 in every case


def test_no_incumbent_passes_the_incumbent_rule(base):
    rule = decide(base, None, T).rule("f1_not_meaningfully_below_incumbent")
    assert rule.passed and "no incumbent" in rule.explanation


def test_preferred_needs_every_preference_rule_ready_only_f1(base):
    overfit = decide(_cand(base, train_val_gap=0.2, gap_status="MODERADO", f1=0.97), None, T)
    assert not overfit.preferred and overfit.ready and not overfit.promote
    assert [r.name for r in overfit.failed_rules] == ["gap_below_max"]
    assert "gap_below_max" in overfit.verdict and "gap 0.2000 >= 0.15" in overfit.verdict
    weak = decide(_cand(base, f1=0.90), None, T)
    assert not weak.preferred and not weak.ready
    assert {r.name for r in weak.failed_rules} == {"f1_at_least_min", "ready_for_production"}
    good = decide(base, None, T)
    assert good.promote and good.verdict == "cand is preferred and ready for production"


def test_thresholds_come_from_the_config(base):
    loose = DecisionConfig(max_gap=0.5, min_f1=0.5, max_f1_drop=0.2)
    d = decide(_cand(base, train_val_gap=0.3, f1=0.6), _cand(base, f1=0.75), loose)
    assert d.promote
    assert d.thresholds == {"max_gap": 0.5, "min_f1": 0.5, "max_f1_drop": 0.2}
    assert TOLERANCE == 1e-9


# --------------------------------------------------------------------------- decision.json


def test_decision_json_records_rules_inputs_and_fingerprints(tmp_path, monkeypatch):
    monkeypatch.setattr(decision_mod, "utc_now", lambda: datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc))
    v1 = make_fake_run(tmp_path, "v1", f1=0.9602, precision=0.9402, recall=0.9810, gap=2.27, gap_status="CRÍTICO",
                       config="v1")
    v2 = make_fake_run(tmp_path, "v2", f1=0.955, gap=0.12)
    d = decide(load_report(v2), load_report(v1), T)
    path = write_decision(d, v2 / "evaluation" / "decision.json")
    data = orjson.loads(path.read_bytes())
    assert data["format"] == "farense.decision/1"
    assert data["decided_at"] == "2025-03-04T05:06:07Z"
    assert data["preferred"] and data["ready"] and data["promote"]
    assert [r["name"] for r in data["rules"]] == [
        "gap_below_max", "f1_at_least_min", "f1_not_meaningfully_below_incumbent", "ready_for_production"]
    for r in data["rules"]:
        assert set(r) == {"name", "kind", "inputs", "threshold", "comparison", "passed", "explanation"}
    files = {(i["role"], i["kind"]): i for i in data["inputs"]}
    assert files[("candidate", "evaluation_report")]["sha256"] == sha256_file(v2 / "evaluation" / "evaluation_report.json")
    assert files[("candidate", "training_summary")]["sha256"] == sha256_file(v2 / "training_summary.json")
    assert files[("incumbent", "evaluation_report")]["sha256"] == sha256_file(v1 / "evaluation" / "evaluation_report.json")
    assert all(i["modified_at"].endswith("Z") for i in data["inputs"])
    back = read_decision(path)
    assert back.promote and back.rules == d.rules
    assert back.input_sha256("candidate", "evaluation_report") == files[("candidate", "evaluation_report")]["sha256"]


def test_read_decision_refuses_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_bytes(b'{"hello": 1}')
    with pytest.raises(FarenseError, match="not a farense decision"):
        read_decision(p)


def test_unevaluated_run_says_how_to_fix(tmp_path):
    run = make_fake_run(tmp_path, "raw")
    (run / "evaluation" / "evaluation_report.json").unlink()
    with pytest.raises(FarenseError, match="has not been evaluated.*farense evaluate"):
        report_from_run(run)


# --------------------------------------------------------------------------- comparison


def test_compare_side_by_side(tmp_path):
    v1 = load_report(make_fake_run(tmp_path, "v1", f1=0.9602, gap=2.27, gap_status="CRÍTICO", test_loss=1.5,
                                   final_step=300, best_step=300, training_time=7200.0, config="v1"))
    v2 = load_report(make_fake_run(tmp_path, "v2", f1=0.955, gap=0.12, test_loss=1.2, best_step=90, final_step=140))
    c = compare(v1, v2)
    assert c.row("f1").better == "a" and c.row("f1").delta == pytest.approx(0.955 - 0.9602)
    assert c.row("test_loss").better == "b"
    assert c.row("train_val_gap").better == "b"
    assert c.row("best_step").better is None and c.row("final_step").delta == -160
    keys = [r["key"] for r in c.to_json()["rows"]]
    for k in ("f1", "precision", "recall", "exact_match", "test_loss", "train_val_gap", "gap_status", "best_step",
              "final_step", "training_time_seconds"):
        assert k in keys
    md = c.to_markdown()
    assert md.startswith("## v1 vs v2")
    assert "| F1 | 0.9602 | 0.9550 | -0.0052 | v1 |" in md
    assert "| gap status | CRÍTICO | BOM | - |  |" in md
    assert "| training time | 2h00m00s |" in md


def test_compare_and_decide_writes_files_into_candidate_dir(tmp_path):
    v1 = make_fake_run(tmp_path, "v1", f1=0.9602, gap=2.27, config="v1")
    v2 = make_fake_run(tmp_path, "v2", f1=0.90, gap=0.12)
    out = compare_and_decide(load_report(v1), load_report(v2), T, out_dir=v2 / "evaluation")
    assert set(out.files) == {"comparison_json", "comparison_md", "decision"}
    assert not out.decision.preferred
    md = (v2 / "evaluation" / "comparison.md").read_text()
    assert "## Decision" in md and "FAIL" in md and "f1_not_meaningfully_below_incumbent" in md
    assert orjson.loads((v2 / "evaluation" / "comparison.json").read_bytes())["decision"]["preferred"] is False
    assert isinstance(read_decision(out.files["decision"]), Decision)
