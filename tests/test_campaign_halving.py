"""Campaigns with successive halving on the tiny model: 8 trials, eta 2, rungs at steps 4, 8, 16, 24.

Uninterrupted, the campaign trains at most 45% of the steps of 8 full trainings and picks the
trial that full training of all 8 picks (each trial continued to the end: an exact resume). Killed
with SIGKILL at random moments and started again, it ends with the same decisions, table and
winner, and no trial's newest checkpoint ever moves backwards.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from training_fixtures import REPO, farense_env

from farense.release.campaign_file import CampaignSpec, load_campaign
from farense.release.halving import REPORT
from farense.release.trials import (
    RunProgress,
    campaign_status,
    run_campaign,
    train_in_process,
    trained_steps,
)
from farense.run.layout import RunPaths

pytestmark = pytest.mark.slow
BUDGET, TRIALS = 24, 8


def _campaign_file(where: Path, demo: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / "halving.toml"
    path.write_text(f'''base = "{REPO}/configs/v2.toml"
overlays = ["tiny"]
[set]
"model.path" = "{demo / 'model'}"
"data.dir" = "{demo / 'data'}"
"training.warmup_steps" = 3
"training.max_seq_length" = 128
"training.batch_size" = 2
"training.grad_accumulation" = 2
"validation.every_steps" = 4
"validation.batches" = 4
"checkpoint.every_steps" = 4
"checkpoint.keep_last" = 2
"early_stopping.patience" = 0
[search]
"lora.rank" = [4, 8]
"training.learning_rate" = [3e-5, 3e-4, 1e-3, 3e-3]
[halving]
budget = {BUDGET}
min_resource = 4
eta = 2
''')
    return path


def _rows_trained(spec: CampaignSpec) -> int:
    """Metrics rows written so far by all trials (one per optimizer step, replays after a resume included)."""
    total = 0
    for t in spec.trials:
        path = RunPaths(t.config.run_dir).metrics_jsonl
        total += path.read_bytes().count(b"\n") if path.exists() else 0
    return total


def _decisions(events: list[dict[str, Any]]) -> list[tuple]:
    return [(e["kind"], e["trial"], e.get("rung"), e.get("step"), round(e["value"], 6) if "value" in e else None)
            for e in events]


def _command(workspace: Path, path: Path) -> list[str]:
    """`farense campaign run` as a person runs it, without the winner's evaluation."""
    return [sys.executable, "-m", "farense", "--workspace", str(workspace), "campaign", "run", str(path), "--no-final"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> tuple[CampaignSpec, Any]:
    """The campaign run once, uninterrupted, through the real command: the same kind of process as the
    killed one below (in-process under pytest, floats differed at the 6th decimal from the command's)."""
    ws = tmp_path_factory.mktemp("ws-straight")
    path = _campaign_file(ws, demo_dir)
    done = subprocess.run(_command(ws, path), cwd=REPO, env=farense_env(), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = load_campaign(path, workspace=ws)
    return spec, run_campaign(spec, log=lambda m: None)  # a finished campaign: read from its log


def test_halving_trains_under_45_percent_and_picks_the_full_trainings_winner(uninterrupted: Any) -> None:
    spec, outcome = uninterrupted
    assert len(spec.trials) == TRIALS and spec.rungs == (4, 8, 16, 24)
    steps = trained_steps(spec)
    assert steps <= 0.45 * TRIALS * BUDGET, steps
    assert outcome.stopped_per_rung == {0: 4, 1: 2, 2: 1}
    assert outcome.winner is not None
    statuses = {r["trial"]: r for r in campaign_status(spec)}
    assert statuses[outcome.winner.name]["status"] == "winner"
    # Full training of every trial: each continues from its rung checkpoint to the end (exact resume).
    for t in spec.trials:
        train_in_process(t.config, BUDGET)
    full = {t.name: RunProgress.read(t.config).best_val(BUDGET) for t in spec.trials}
    assert all(RunProgress.read(t.config).last_step == BUDGET for t in spec.trials)
    assert min(full, key=lambda n: (full[n], n)) == outcome.winner.name, full


def test_sigkill_at_random_moments_then_the_same_command_gives_the_same_campaign(
        uninterrupted: Any, tmp_path: Path, demo_dir: Path) -> None:
    spec0, outcome0 = uninterrupted
    path = _campaign_file(tmp_path, demo_dir)
    spec = load_campaign(path, workspace=tmp_path)
    argv = _command(tmp_path, path)  # the same command as the uninterrupted campaign: like with like
    rng = random.Random(22)
    highest = {t.name: 0 for t in spec.trials}
    kills = 0
    for _ in range(4):
        # A random moment measured in training, not in seconds (a fast machine would finish first):
        # after 2-10 more optimizer steps across the trials, plus up to half a second.
        target = _rows_trained(spec) + rng.randint(2, 10)
        proc = subprocess.Popen(argv, cwd=REPO, env=farense_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while proc.poll() is None and _rows_trained(spec) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for t in spec.trials:
            step = RunProgress.read(t.config).checkpoint_step
            assert step >= highest[t.name], f"{t.name}'s newest checkpoint went back from {highest[t.name]} to {step}"
            highest[t.name] = step
    assert kills >= 2
    done = subprocess.run(argv, cwd=REPO, env=farense_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = run_campaign(spec, log=lambda m: None)  # a finished campaign: nothing more to do
    assert _decisions(outcome.events) == _decisions(outcome0.events)
    assert outcome.winner.name == outcome0.winner.name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "steps"} for r in rows]  # noqa: E731
    assert strip(campaign_status(spec)) == strip(campaign_status(spec0))
    reports = [e for e in outcome.events if e["kind"] == REPORT]
    assert len(reports) == len({(e["trial"], e["rung"]) for e in reports})  # no rung reported twice
