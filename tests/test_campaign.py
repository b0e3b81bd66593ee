"""Campaigns: V1 then V2, each decided against the one before it, the winner promoted if ready.

The rules are exercised on decisions written as the pipeline writes them; the whole campaign runs
as `farense run A B` on the tiny model (Prefect's embedded API, real training and evaluation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect_harness import seeded_prefect_home

from farense.release.campaign import CampaignEntry, choose_winner, table_rows
from farense.release.decision import Decision, Rule, write_decision

REPO = Path(__file__).resolve().parent.parent


def _decision(tmp_path: Path, name: str, *, gap_ok: bool, f1: float, beats_predecessor: bool = True) -> str:
    rules = (
        Rule("gap_below_max", "preference", {}, 0.15, "train_val_gap < max_gap", gap_ok, "gap"),
        Rule("f1_at_least_min", "preference", {"f1": f1}, 0.93, "f1 >= min_f1", f1 >= 0.93, f"F1 {f1}"),
        Rule("f1_not_meaningfully_below_incumbent", "preference", {}, 0.01, "drop", beats_predecessor, "drop"),
        Rule("ready_for_production", "readiness", {"f1": f1}, 0.93, "f1 >= min_f1", f1 >= 0.93, f"F1 {f1}"),
    )
    d = Decision(candidate={"name": name}, incumbent=None, thresholds={}, rules=rules, inputs=(), decided_at="now")
    path = tmp_path / f"{name}-decision.json"
    write_decision(d, path)
    return str(path)


def _entries(tmp_path: Path, *specs: tuple[str, dict]) -> list[CampaignEntry]:
    return [CampaignEntry(name, str(tmp_path / name), _decision(tmp_path, name, **kw)) for name, kw in specs]


def test_v2_preferred_over_v1_wins_and_is_promoted_when_ready(tmp_path: Path) -> None:
    d = choose_winner(_entries(tmp_path, ("v1", dict(gap_ok=False, f1=0.96)), ("v2", dict(gap_ok=True, f1=0.95))))
    assert (d.winner, d.ready) == ("v2", True)
    assert d.winner_decision.endswith("v2-decision.json")
    assert d.reasons[0].startswith("v1 (by its own rules): not preferred") and "gap_below_max FAIL" in d.reasons[0]
    assert d.reasons[1].startswith("v2 (against v1): preferred, ready")


def test_v1_keeps_the_win_when_v2_is_not_preferred(tmp_path: Path) -> None:
    d = choose_winner(_entries(tmp_path, ("v1", dict(gap_ok=True, f1=0.94)),
                               ("v2", dict(gap_ok=True, f1=0.90, beats_predecessor=False))))
    assert (d.winner, d.ready) == ("v1", True)
    assert d.verdict == "v1 wins, ready for production"


def test_a_winner_below_the_f1_threshold_is_not_ready(tmp_path: Path) -> None:
    # F1 below 0.93 fails f1_at_least_min, a preference rule, so nobody is preferred: no winner.
    d = choose_winner(_entries(tmp_path, ("v1", dict(gap_ok=True, f1=0.5)), ("v2", dict(gap_ok=True, f1=0.6))))
    assert d.winner is None and not d.ready
    assert d.verdict == "no config passed the rules; nothing to promote"
    assert len(d.reasons) == 2


@pytest.mark.slow
def test_farense_run_two_configs_is_a_campaign_on_the_tiny_model(tmp_path: Path) -> None:
    """`farense run A B`: the base model scored, A and B trained side by side (B still decided against A),
    a table; the same campaign one training at a time trains the same adapters, to the byte."""
    from farense.model.demo import build_demo

    build_demo(tmp_path / ".farense" / "tiny")
    configs = []
    for name, parent in (("a", "v1"), ("b", "v2")):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'extends = ["{REPO}/configs/{parent}.toml", "{REPO}/configs/overlays/tiny.toml"]\n'
                        f'name = "{name}"\n[training]\niters = 10\nwarmup_steps = 2\n[validation]\nevery_steps = 5\n'
                        "[checkpoint]\nevery_steps = 5\n[evaluation]\nmax_examples = 4\nmax_new_tokens = 8\n")
        configs.append(str(path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(seeded_prefect_home(tmp_path / "prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               FARENSE_TRAINING_LOCK=str(tmp_path / "training.lock"))
    proc = subprocess.run([sys.executable, "-m", "farense", "--workspace", str(tmp_path), "run", *configs,
                           "--parallel", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]

    runs = tmp_path / "runs" / "tiny"
    campaign = json.loads((runs / "campaign.json").read_text())
    names = [row[0] for row in campaign["table"]["rows"]]
    assert names == ["base model (no adapters)", "a", "b"]
    assert campaign["reasons"][0].startswith("a (by its own rules):")
    assert campaign["reasons"][1].startswith("b (against a):")
    assert set(campaign["stage_seconds"]) >= {"base model evaluation", "a + b pipelines side by side"}
    assert "trainings: 2 trainings side by side (asked for), OPENBLAS_NUM_THREADS=" in proc.stdout + proc.stderr
    b_decision = json.loads((runs / "b" / "evaluation" / "decision.json").read_text())
    assert b_decision["incumbent"]["name"] == "a"  # V2 is decided against V1, not production
    base = json.loads((runs / ".base-model" / "evaluation_report.json").read_text())
    assert base["summary"]["examples"] == 4
    assert "base model (no adapters)" in proc.stdout and f"decision: {campaign['verdict']}" in proc.stdout
    # The tiny random model is never ready (F1 far below 0.93): nothing reaches production.
    assert not (tmp_path / "production" / "tiny" / "current").exists()
    # The table re-read from the runs' files matches what was written.
    entries = [CampaignEntry(n, str(runs / n), str(runs / n / "evaluation" / "decision.json")) for n in ("a", "b")]
    assert table_rows(base, entries) == campaign["table"]["rows"]

    # The same campaign written as a file (explicit trials, no [halving]) through `farense campaign run`:
    # the same flow, a table of the same shape, its runs in the campaign's own directory.
    listed = tmp_path / "ab.toml"
    listed.write_text(f'[[trials]]\nname = "a"\nconfig = "{configs[0]}"\n[[trials]]\nname = "b"\nconfig = "{configs[1]}"\n'
                      '[final]\npromote = false\n')
    argv = [sys.executable, "-m", "farense", "--workspace", str(tmp_path), "campaign"]
    proc = subprocess.run([*argv, "run", str(listed), "--parallel", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    again = json.loads((runs / "campaign-ab" / "campaign.json").read_text())
    assert set(again["stage_seconds"]) >= {"a pipeline", "b pipeline"}
    for name in ("a", "b"):  # one BLAS thread each beside the other, or both threads in turn: the same bytes
        side_by_side = (runs / name / "adapters" / "adapters.safetensors").read_bytes()
        assert side_by_side == (runs / "campaign-ab" / name / "adapters" / "adapters.safetensors").read_bytes()
    assert [row[0] for row in again["table"]["rows"]] == names
    assert again["reasons"][1].startswith("b (against a):") and "base model (no adapters)" in proc.stdout
    status = subprocess.run([*argv, "status", str(listed)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and "no halving" in status.stdout and status.stdout.count("finished") == 2, status.stdout


def test_a_bad_parallel_value_is_refused_before_anything_starts(capsys: Any) -> None:
    from farense.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "v1", "v2", "--tiny", "--parallel", "0"])
    assert exit_.value.code == 2
    assert "--parallel: expected 'auto' or a whole number >= 1, got '0'" in capsys.readouterr().err
