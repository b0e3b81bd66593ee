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
from prefect_harness import (
    REPO,
    PrefectAPI,
    quiet_env,
    start_server,
    start_webhook_listener,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERS, CHECKPOINT_EVERY = 40, 10

# v2 on the demo model, shortened so the whole scenario takes a couple of minutes on 2 cores.
E2E_CONFIG = f"""
extends = ["{REPO}/configs/v2.toml", "{REPO}/configs/overlays/tiny.toml"]
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


class Stack:
    """Server, webhook listener, deployments + automations (deployments.setup) and a worker, for one
    test; everything it started is stopped by PID on exit."""

    def __init__(self, tmp_path: Path, *setup_args: str, **env: str):
        from farense.model.demo import build_demo

        self.tmp = tmp_path
        self.workspace, self.logs = tmp_path / "workspace", tmp_path / "logs"
        build_demo(self.workspace / ".farense" / "tiny")
        self.config = self.workspace / "e2e.toml"
        self.config.write_text(E2E_CONFIG)
        self.run_dir = self.workspace / "runs" / "tiny" / "e2e"
        self.extra_env, self.setup_args = env, setup_args
        self.server = self.listener = None
        self.workers: list = []
        self.pids_to_reap: list[int] = []
        self.t0 = time.monotonic()

    def __enter__(self) -> "Stack":
        self.server = start_server(self.tmp / "prefect-home", self.logs)
        try:
            self.listener = start_webhook_listener(self.tmp / "webhook")
            self.env = quiet_env(self.tmp / "prefect-home", self.server.api_url, PREFECT_WORKER_QUERY_SECONDS="2",
                                 FARENSE_TRAINING_LOCK=str(self.tmp / "training.lock"), **self.extra_env)
            self.api = PrefectAPI(self.server.api_url)
            setup = subprocess.run([sys.executable, "-m", "deployments.setup", "--webhook-url", self.listener.url,
                                    *self.setup_args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180)
            assert setup.returncode == 0, setup.stdout + setup.stderr
            self.start_worker()
            self.deployment = self.api.deployment("farense-training", "nightly")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (*self.workers, self.listener):
            if proc is not None:
                proc.stop()
        if self.server is not None:
            self.server.stop()
        for pid in self.pids_to_reap:
            if not _pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        assert not self.server.alive() and not any(w.alive() for w in self.workers)

    def start_worker(self) -> None:
        """deployments/start-worker.sh; its setup step (pool, queues, automations) must succeed."""
        worker = start_worker(self.env, self.logs, name=f"worker-{len(self.workers)}")
        self.workers.append(worker)
        log = wait_for(lambda: (t := worker.tail(20000)) and ("started!" in t or "setup failed" in t or
                                                               not worker.alive()) and t, 120, "the worker to start")
        assert "setup failed" not in log and worker.alive(), log[-3000:]

    def deployment_run(self) -> str:
        """`prefect deployment run 'farense-training/nightly'` on the e2e config; the run's id."""
        params = {"config": str(self.config), "workspace": str(self.workspace), "demo": False, "promote": True}
        argv = [sys.executable, "-m", "prefect", "deployment", "run", "farense-training/nightly",
                "--params", json.dumps(params)]
        out = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

    def train_past_first_checkpoint(self, flow_run_id: str) -> tuple[int, int]:
        """Wait until training passed its first checkpoint; (the flow's process, the trainer) PIDs."""
        import psutil

        wait_for(lambda: _committed_checkpoints(self.run_dir) and _last_step(self.run_dir / "metrics.jsonl") > CHECKPOINT_EVERY,
                 240, "training past the first checkpoint", interval=0.2)
        trainer = json.loads((self.run_dir / "run_state.json").read_text())["pid"]
        self.pids_to_reap.append(trainer)
        flow = int(self.api.flow_run(flow_run_id)["infrastructure_pid"])
        assert psutil.Process(trainer).ppid() == flow, "the trainer is a child of the flow's process"
        return flow, trainer

    def last_checkpoint_after_death(self, trainer: int) -> int:
        wait_for(lambda: _pid_gone(trainer), 30, "the trainer to die with its flow (--die-with-parent)")
        last = _committed_checkpoints(self.run_dir)[-1]
        assert 0 < last < ITERS
        return last

    def resumed_run(self, crashed_id: str) -> dict:
        """The run the resume automation started for `crashed_id` (not the schedule's 02:00 runs)."""
        def started_by_automation() -> list[dict]:
            return [r for r in self.api.flow_runs_of(self.deployment["id"])
                    if r["id"] != crashed_id and (r.get("created_by") or {}).get("type") == "AUTOMATION"]

        run = wait_for(started_by_automation, 90, "the resume automation to start a new run")[0]
        assert run["parameters"]["config"] == str(self.config)
        assert run["parameters"]["workspace"] == str(self.workspace)
        assert run["parameters"]["resume_attempt"] == 1
        return run

    def finish(self, flow_run_id: str, timeout: float = 300) -> str:
        done = {"COMPLETED", "FAILED", "CRASHED"}
        return wait_for(lambda: (s := self.api.state_type(flow_run_id)) in done and s, timeout, "the run to finish")

    def assert_resumed_and_completed(self, run_id: str, last_checkpoint: int) -> list[str]:
        """The run resumed training from `last_checkpoint` (not step 0) and finished every step."""
        final = self.finish(run_id)
        assert final == "COMPLETED", "\n".join(self.api.logs(run_id)[-40:])
        _wait_for_log(self.api, run_id, "notified through custom-webhook/farense-notify")
        # Waited for on its own: under load a log batch can reach the server after later ones.
        logs = _wait_for_log(self.api, run_id, "training resumed from checkpoint step", timeout=60)
        assert f"training resumed from checkpoint step {last_checkpoint}" in logs, [x for x in logs if "resum" in x]
        assert any(f"resuming from step {last_checkpoint}" in line for line in logs)
        run_state = json.loads((self.run_dir / "run_state.json").read_text())
        assert run_state["state"] == "completed" and run_state["resumed_from"] == last_checkpoint
        steps = [json.loads(line)["step"] for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, ITERS + 1)), "metrics after the checkpoint were redone, once"
        assert json.loads((self.run_dir / "training_summary.json").read_text())["final_step"] == ITERS
        assert (self.run_dir / "evaluation" / "evaluation_report.json").is_file()
        assert (self.run_dir / "evaluation" / "decision.json").is_file()
        train_runs = [t for t in self.api.task_runs(run_id) if t["name"].startswith("train-")]
        assert len(train_runs) == 1 and train_runs[0]["run_count"] == 1
        return logs

    def notifications(self, subject_has: str, timeout: float = 60) -> list[dict]:
        find = lambda: [h["body"] for h in self.listener.received() if subject_has in h["body"].get("subject", "")]  # noqa: E731
        return wait_for(find, timeout, f"a notification with {subject_has!r} in its subject")


def test_nightly_deployment_resumes_by_itself_after_sigkill(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    with Stack(tmp_path) as st:
        schedule = st.deployment["schedules"][0]["schedule"]
        assert (schedule["cron"], schedule["timezone"]) == ("0 2 * * *", "Europe/Lisbon")
        first_id = st.deployment_run()
        timings["deployment run"] = time.monotonic() - st.t0

        # Let training pass its first checkpoint, then SIGKILL the flow's process.
        flow_pid, trainer_pid = st.train_past_first_checkpoint(first_id)
        os.kill(flow_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        timings["kill"] = killed_at - st.t0
        last_checkpoint = st.last_checkpoint_after_death(trainer_pid)
        killed_at_step = _last_step(st.run_dir / "metrics.jsonl")

        # The worker marks it Crashed; the resume automation starts a new run by itself, which resumes
        # from the checkpoint and completes.
        wait_for(lambda: st.api.state_type(first_id) == "CRASHED", 60, "the killed run to be marked Crashed")
        resumed = st.resumed_run(first_id)
        timings["new run created"] = time.monotonic() - killed_at
        st.assert_resumed_and_completed(resumed["id"], last_checkpoint)
        timings["resumed run finished"] = time.monotonic() - killed_at

        # The webhook heard about the crash (automation) and the completion (the flow, with metrics).
        crashed = st.notifications("Crashed")
        assert str(st.config) in crashed[0]["body"] and "SIGKILL" in crashed[0]["body"]
        body = st.notifications("completed")[0]["body"]
        assert "decision:" in body and "F1 " in body and f"resumed from step {last_checkpoint}" in body
        gap = json.loads((st.run_dir / "training_summary.json").read_text())["train_val_gap"]
        assert f"= gap {gap:+.4f} " in body, body  # the summary's gap, with the two losses it is made of

        # One training at a time: of two more runs, the second waits until the first has finished;
        # neither trains again (this config finished training) nor evaluates again (same adapters).
        t_pair = time.monotonic()
        pair = [st.deployment_run(), st.deployment_run()]
        assert [st.finish(i, 240) for i in pair] == ["COMPLETED", "COMPLETED"]
        runs = sorted((st.api.flow_run(i) for i in pair), key=lambda r: r["start_time"])
        # The second waited as Scheduled (the training queue's limit: the worker does not take it) or
        # AwaitingConcurrencySlot (the deployment's limit).
        assert runs[0]["end_time"] <= runs[1]["start_time"], "two trainings ran at the same time"
        for r in runs:
            lines = _wait_for_log(st.api, r["id"], "already evaluated with these adapters")
            assert any(f"already finished training at step {ITERS}" in line for line in lines)
        timings["two more runs"] = time.monotonic() - t_pair
        timings["total"] = time.monotonic() - st.t0
    print(f"\nkilled at step {killed_at_step}, resumed from checkpoint {last_checkpoint}; timings (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


GRACE = 45  # seconds without a heartbeat (30 s apart) before the zombie automation acts


def test_a_run_whose_machine_died_is_crashed_by_heartbeat_and_resumed(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    with Stack(tmp_path, "--timezone", "America/New_York",
               FARENSE_HEARTBEAT_GRACE_SECONDS=str(GRACE), PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30") as st:
        schedule = st.deployment["schedules"][0]["schedule"]
        assert (schedule["cron"], schedule["timezone"]) == ("0 2 * * *", "America/New_York"), "the user's time zone"
        first_id = st.deployment_run()
        flow_pid, trainer_pid = st.train_past_first_checkpoint(first_id)

        # The machine dies: the worker and the flow's process together, so nobody reports a crash.
        os.kill(st.workers[0].pid, signal.SIGKILL)
        os.kill(flow_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        last_checkpoint = st.last_checkpoint_after_death(trainer_pid)
        time.sleep(3)
        assert st.api.state_type(first_id) == "RUNNING", "nothing but the heartbeats can tell it died"

        # Heartbeats stop: the zombie automation marks it Crashed. The machine comes back (a new
        # worker) and picks up the run the resume automation started.
        wait_for(lambda: st.api.state_type(first_id) == "CRASHED", GRACE + 60, "the zombie automation")
        timings["crashed after"] = time.monotonic() - killed_at
        assert "No heartbeat" in st.api.flow_run(first_id)["state"]["message"]
        resumed = st.resumed_run(first_id)
        st.start_worker()
        st.assert_resumed_and_completed(resumed["id"], last_checkpoint)
        timings["resumed run finished"] = time.monotonic() - killed_at
        assert "No heartbeat" in st.notifications("Crashed")[0]["body"]
        timings["total"] = time.monotonic() - st.t0
    print(f"\ndead worker: resumed from checkpoint {last_checkpoint}; timings (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
