"""Two Prefect process workers on one machine, each with a workspace and a training lock of its own,
train two trials of a halving campaign at the same time: the campaign flow runs each trial as a run of
the `farense-campaign-trial` deployment (trial_deployment, parallel=2). Server and workers are stopped
by PID at the end."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics
from prefect_harness import REPO, PrefectAPI, _spawn, quiet_env, start_server
from test_campaign_flow import _campaign

RUNG0 = 20  # steps: both trainings start their steps at a barrier; this keeps them going a while

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEPLOY_YAML = """name: farense-test
prefect-version: 3.8.8
build: null
push: null
deployments:
  - name: trial
    entrypoint: flows/campaign_halving.py:campaign_trial_flow
    tags: [farense, training, campaign]
    concurrency_limit:
      limit: 2
      collision_strategy: ENQUEUE
    work_pool:
      name: farense-test
      work_queue_name: training
"""


def _t(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def test_two_workers_train_two_trials_at_the_same_time(tmp_path: Path, demo_dir: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    server = start_server(tmp_path / "prefect-home", logs)
    procs = [server]
    try:
        env = quiet_env(tmp_path / "prefect-home", server.api_url, PYTHONPATH=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2")
        (tmp_path / "prefect.yaml").write_text(DEPLOY_YAML)
        for argv in (["work-pool", "create", "farense-test", "--type", "process"],
                     ["--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml")]):
            done = subprocess.run([sys.executable, "-m", "prefect", *argv], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        barrier_dir = tmp_path / "barrier"
        barrier_dir.mkdir()
        for name in ("a", "b"):
            ws = tmp_path / f"machine-{name}"
            ws.mkdir()
            # Both trainings begin their steps together (a barrier file each, up to 60 s): on a fast machine
            # 30 steps take a second, less than the workers' polling skew. Trainings run one after the
            # other would leave the first waiting in vain and their windows apart: the test would fail.
            wenv = {**env, "FARENSE_WORKSPACE": str(ws), "FARENSE_TRAINING_LOCK": str(ws / "training.lock"),
                    "FARENSE_BARRIER": f"training-loop:2:{barrier_dir}"}
            procs.append(_spawn(f"worker-{name}", [sys.executable, "-m", "prefect", "worker", "start", "--pool",
                                                   "farense-test", "--type", "process", "--limit", "1", "--name",
                                                   f"worker-{name}"], wenv, logs / f"worker-{name}.log"))
        campaign = _campaign(tmp_path, demo_dir)
        campaign.write_text(campaign.read_text().replace('"validation.every_steps" = 2', '"validation.every_steps" = 10')
                            .replace('"checkpoint.every_steps" = 2', '"checkpoint.every_steps" = 10')
                            .replace("budget = 4", f"budget = {2 * RUNG0}").replace("min_resource = 2",
                                                                                  f"min_resource = {RUNG0}"))
        code = ("import sys; from flows.campaign_halving import campaign_halving_flow as f; "
                "r = f(campaign=sys.argv[1], workspace=sys.argv[2], trial_deployment='farense-campaign-trial/trial', "
                "parallel=2, final_pipeline=False); print('WINNER', r.winner)")
        done = subprocess.run([sys.executable, "-c", code, str(campaign), str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "WINNER t0" in done.stdout
        api = PrefectAPI(server.api_url)
        deployment = api.deployment("farense-campaign-trial", "trial")
        runs = [r for r in api.flow_runs_of(deployment["id"]) if r["state_type"] == "COMPLETED"]
        assert len(runs) == 3, [(r["name"], r["state_type"]) for r in runs]  # two at rung 0, the winner to rung 1
        first = sorted((r for r in runs if r["name"].endswith(f"-to-step-{RUNG0}")), key=lambda r: r["start_time"])
        assert len(first) == 2
        assert _t(first[1]["start_time"]) < _t(first[0]["end_time"]), "the two trial runs did not run at once"
        # The trainings themselves overlap: each trial's metrics timestamps up to the first rung.
        windows = []
        for trial in ("t00", "t01"):
            rows = read_metrics(RunPaths(tmp_path / "runs" / "tiny" / "campaign-two" / trial).metrics_jsonl)
            stamps = [r["timestamp"] for r in rows if r["step"] <= RUNG0]
            windows.append((min(stamps), max(stamps)))
        assert max(w[0] for w in windows) < min(w[1] for w in windows), windows
    finally:
        for p in reversed(procs):
            p.stop()
