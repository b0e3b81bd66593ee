"""End to end, as a person runs it: a real Prefect server on 127.0.0.1, the deployments applied by
`python -m deployments.setup`, a process worker from deployments/start-worker.sh, and
`prefect deployment run 'farense-training/nightly'`. The flow's process is SIGKILLed during
training; the resume automation must start a new run by itself, which resumes from the last
checkpoint and completes; a webhook listener receives the crash and the completion notifications.
Server, worker and listener are stopped by PID at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_harness import REPO, PrefectAPI, quiet_env, start_server, start_webhook_listener, start_worker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERS, CHECKPOINT_EVERY = 40, 10

# v2 on the demo model, shortened so the whole scenario takes a couple of minutes on 2 cores.
E2E_CONFIG = f"""
extends = ["{REPO}/configs/v2.toml", "{REPO}/configs/overlays/demo.toml"]
name = "e2e"

[training]
iters = {ITERS}
warmup_steps = 4

[validation]
every_steps = 10

[checkpoint]
every_steps = {CHECKPOINT_EVERY}

[evaluation]
max_examples = 6
max_new_tokens = 16
"""


def _committed_checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in d.iterdir()
                  if re.fullmatch(r"step-\d{8}", p.name) and (p / "MANIFEST.json").is_file())


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith(b"}")]
    return steps[-1] if steps else 0


def _wait_for_log(api: PrefectAPI, flow_run_id: str, text: str, timeout: float = 30) -> list[str]:
    """A run's logs once one contains `text` (logs reach the server shortly after the state does;
    those of one run arrive in order, so the lines logged before `text` are there too)."""
    return wait_for(lambda: (lines := api.logs(flow_run_id)) and any(text in line for line in lines) and lines,
                    timeout, f"a log line with {text!r}")


def _pid_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_nightly_deployment_resumes_by_itself_after_sigkill(tmp_path: Path) -> None:
    from farense.demo import build_demo

    workspace, logs = tmp_path / "workspace", tmp_path / "logs"
    build_demo(workspace / ".farense" / "demo")
    config = workspace / "e2e.toml"
    config.write_text(E2E_CONFIG)
    run_dir = workspace / "runs" / "demo" / "e2e"
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    server = start_server(tmp_path / "prefect-home", logs)
    listener = worker = None
    trainer_pid = None
    try:
        timings["server"] = time.monotonic() - t0
        listener = start_webhook_listener(tmp_path / "webhook")
        env = quiet_env(tmp_path / "prefect-home", server.api_url, PREFECT_WORKER_QUERY_SECONDS="2",
                        FARENSE_TRAINING_LOCK=str(tmp_path / "training.lock"))
        api = PrefectAPI(server.api_url)

        # Register the deployments, the notification block and the automations; start a worker.
        setup = subprocess.run([sys.executable, "-m", "deployments.setup", "--webhook-url", listener.url],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        worker = start_worker(env, logs)
        deployment = api.deployment("farense-training", "nightly")
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

        params = {"config": str(config), "workspace": str(workspace), "demo": False, "promote": True}

        def deployment_run() -> str:
            argv = [sys.executable, "-m", "prefect", "deployment", "run", "farense-training/nightly",
                    "--params", json.dumps(params)]
            out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

        first_id = deployment_run()
        timings["deployment run"] = time.monotonic() - t0

        # Let training pass its first checkpoint, then SIGKILL the flow's process.
        wait_for(lambda: _committed_checkpoints(run_dir) and _last_step(run_dir / "metrics.jsonl") > CHECKPOINT_EVERY,
                 240, "training past the first checkpoint", interval=0.2)
        state = json.loads((run_dir / "run_state.json").read_text())
        trainer_pid = state["pid"]
        flow_pid = int(api.flow_run(first_id)["infrastructure_pid"])
        import psutil

        assert psutil.Process(trainer_pid).ppid() == flow_pid, "the trainer is a child of the flow's process"
        os.kill(flow_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        timings["kill"] = killed_at - t0
        wait_for(lambda: _pid_gone(trainer_pid), 30, "the trainer to die with its flow (--die-with-parent)")
        last_checkpoint = _committed_checkpoints(run_dir)[-1]
        killed_at_step = _last_step(run_dir / "metrics.jsonl")
        assert 0 < last_checkpoint < ITERS

        # The run is Crashed, and a new run of the deployment starts by itself.
        wait_for(lambda: api.state_type(first_id) == "CRASHED", 60, "the killed run to be marked Crashed")
        def started_by_automation() -> list[dict]:  # the schedule's future 02:00 runs are not it
            return [r for r in api.flow_runs_of(deployment["id"])
                    if r["id"] != first_id and (r.get("created_by") or {}).get("type") == "AUTOMATION"]

        resumed = wait_for(started_by_automation, 90, "the resume automation to start a new run")[0]
        timings["new run created"] = time.monotonic() - killed_at
        assert resumed["parameters"]["config"] == str(config)
        assert resumed["parameters"]["workspace"] == str(workspace)
        assert resumed["parameters"]["resume_attempt"] == 1

        final = wait_for(lambda: api.state_type(resumed["id"]) in {"COMPLETED", "FAILED", "CRASHED"} and
                         api.state_type(resumed["id"]), 300, "the resumed run to finish")
        timings["resumed run finished"] = time.monotonic() - killed_at
        assert final == "COMPLETED", "\n".join(api.logs(resumed["id"])[-40:])

        # It resumed from the last checkpoint, not from step 0, and finished training.
        resumed_logs = _wait_for_log(api, resumed["id"], "notified through custom-webhook/farense-notify")
        assert f"training resumed from checkpoint step {last_checkpoint}" in resumed_logs
        assert any(f"resuming from step {last_checkpoint}" in line for line in resumed_logs)
        run_state = json.loads((run_dir / "run_state.json").read_text())
        assert run_state["state"] == "completed" and run_state["resumed_from"] == last_checkpoint
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, ITERS + 1)), "metrics after the checkpoint were redone, once"
        summary = json.loads((run_dir / "training_summary.json").read_text())
        assert summary["final_step"] == ITERS
        assert (run_dir / "evaluation" / "evaluation_report.json").is_file()
        assert (run_dir / "evaluation" / "decision.json").is_file()
        train_runs = [t for t in api.task_runs(resumed["id"]) if t["name"].startswith("train-")]
        assert len(train_runs) == 1 and train_runs[0]["run_count"] == 1

        # The webhook heard about the crash (automation) and the completion (the flow, with metrics).
        def notifications() -> tuple[list[dict], list[dict]]:
            bodies = [h["body"] for h in listener.received()]
            return ([b for b in bodies if "Crashed" in b.get("subject", "")],
                    [b for b in bodies if "completed" in b.get("subject", "")])

        crashed, completed = wait_for(lambda: all(notifications()) and notifications(), 60, "both notifications")
        assert "Crashed" in crashed[0]["body"] and str(config) in crashed[0]["body"]
        body = completed[0]["body"]
        assert "decision:" in body and "F1 " in body and f"resumed from step {last_checkpoint}" in body

        # One training at a time: of two more runs, one waits for the other's slot; neither trains
        # again (this config finished training) nor evaluates again (same adapters).
        t_pair = time.monotonic()
        pair = [deployment_run(), deployment_run()]
        done = {"COMPLETED", "FAILED", "CRASHED"}
        wait_for(lambda: all(api.state_type(i) in done for i in pair), 240, "two more runs to finish")
        assert [api.state_type(i) for i in pair] == ["COMPLETED", "COMPLETED"]
        runs = sorted((api.flow_run(i) for i in pair), key=lambda r: r["start_time"])
        # The second waited, as Scheduled (the training queue's limit: the worker does not take it) or
        # AwaitingConcurrencySlot (the deployment's limit), until the first had finished.
        assert runs[0]["end_time"] <= runs[1]["start_time"], "two trainings ran at the same time"
        for r in runs:
            lines = _wait_for_log(api, r["id"], "already evaluated with these adapters")
            assert any(f"already finished training at step {ITERS}" in line for line in lines)
        timings["two more runs"] = time.monotonic() - t_pair
        timings["total"] = time.monotonic() - t0
        print(f"\nkilled at step {killed_at_step}, resumed from checkpoint {last_checkpoint}; timings (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    finally:
        for proc in (worker, listener):
            if proc is not None:
                proc.stop()
        server.stop()
        if trainer_pid is not None and not _pid_gone(trainer_pid):
            os.kill(trainer_pid, signal.SIGKILL)
        assert not server.alive() and (worker is None or not worker.alive())
