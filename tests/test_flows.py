"""The Prefect layer without a real deployment: flows against a temporary Prefect API
(prefect_test_harness), the retry rules of the training task, the resume automation's parameter
templates, and the deployments file."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from prefect_harness import seeded_prefect_home

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect API for the module: its own PREFECT_HOME, no telemetry."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _flow_run(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


# --------------------------------------------------------------------------- failing at once


@pytest.mark.parametrize(
    "overrides, bad_data, expected",
    [
        ({"lora": {"rank": 0}}, False, ["Config is not well-formed", "lora.rank: expected an integer >= 1, got 0"]),
        ({"training": {"learning_rat": 1e-4}}, False, ["training.learning_rat: unknown key", "did you mean 'learning_rate'"]),
        ({}, True, ["Data is not valid", "train.jsonl:3"]),
    ],
    ids=["bad-value", "unknown-key", "bad-data"],
)
def test_bad_input_fails_the_flow_at_once_without_retries(
    prefect_api: None, write_config: Any, data_dir: Path, tmp_path: Path, overrides: dict, bad_data: bool,
    expected: list[str],
) -> None:
    from flows.pipeline import training_flow

    if bad_data:
        lines = (data_dir / "train.jsonl").read_text().splitlines()
        lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
        (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = write_config(overrides)

    started = time.monotonic()
    state = training_flow(config=str(config), workspace=str(tmp_path), return_state=True)
    elapsed = time.monotonic() - started

    assert state.is_failed(), state
    for text in expected:
        assert text in state.message, state.message
    run = _flow_run(state.state_details.flow_run_id)
    assert run.run_count == 1
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(run.id)}
    assert set(tasks) == {"check-inputs"}, "nothing after the input check may run"
    assert tasks["check-inputs"].run_count == 1 and tasks["check-inputs"].state.is_failed()
    assert not (tmp_path / "runs").exists(), "no run directory for a config that never trained"
    assert elapsed < 30, f"a bad input must fail at once, took {elapsed:.1f}s"


def test_resume_limit_fails_instead_of_looping(prefect_api: None) -> None:
    from flows.pipeline import training_flow

    state = training_flow(config="v2", demo="tiny", resume_attempt=4, max_resume_attempts=3, return_state=True)

    assert state.is_failed() and not state.is_crashed()
    assert "resumed 3 times after crashes (max_resume_attempts=3)" in state.message
    assert _task_runs(state.state_details.flow_run_id) == []


def test_maintenance_flow_reports_a_dry_run(prefect_api: None, write_config: Any, tmp_path: Path) -> None:
    from flows.maintenance import maintenance_flow

    state = maintenance_flow(config=str(write_config()), workspace=str(tmp_path), dry_run=True, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result.dry_run and result.freed_bytes == 0


@pytest.mark.slow
def test_farense_run_is_the_whole_pipeline_without_a_server(tmp_path: Path) -> None:
    """`farense run` on the demo model (shortened): Prefect's ephemeral API, no server to start;
    a second run finds training and evaluation done and does not redo them."""
    import subprocess
    import sys

    from farense.model.demo import build_demo

    build_demo(tmp_path / ".farense" / "tiny")
    config = tmp_path / "short.toml"
    config.write_text(f'extends = ["{REPO}/configs/v2.toml", "{REPO}/configs/overlays/tiny.toml"]\nname = "short"\n'
                      "[training]\niters = 12\nwarmup_steps = 2\n[validation]\nevery_steps = 6\n"
                      "[checkpoint]\nevery_steps = 6\n[evaluation]\nmax_examples = 4\nmax_new_tokens = 8\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(seeded_prefect_home(tmp_path / "prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               FARENSE_TRAINING_LOCK=str(tmp_path / "training.lock"))
    argv = [sys.executable, "-m", "farense", "--workspace", str(tmp_path), "run", str(config)]

    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "short: completed at step 12/12" in first.stdout and "decision: short is" in first.stdout
    run_dir = tmp_path / "runs" / "tiny" / "short"
    assert (run_dir / "evaluation" / "decision.json").is_file()

    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(already trained)" in again.stdout
    assert "already evaluated with these adapters" in again.stderr


def test_a_local_flow_gives_its_own_value_or_one_line_and_its_errors_exit_code(capsys: Any,
                                                                                monkeypatch: Any) -> None:
    """`farense run` takes the value the flow returned in memory (never the API's copy of the final
    state, which a 'database is locked' can leave without data) and maps a failure to its exit code."""
    from farense.commands import call_flow, local_prefect_env
    from farense.errors import ConfigError

    assert call_flow(lambda **p: p["x"] * 2, x=21) == (42, 0)

    def bad(**_: Any) -> None:
        raise ConfigError("configs/v9.toml: [training] iters: expected a positive whole number")

    assert call_flow(bad) == (None, ConfigError("x").exit_code)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("farense: error: ") and "[training] iters: expected" in err[0]
    assert call_flow(lambda: 1 / 0)[1] == 1
    assert capsys.readouterr().err.strip() == "farense: failed: ZeroDivisionError: division by zero"

    batch, every = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"
    for name in ("PREFECT_API_URL", batch, every):
        monkeypatch.delenv(name, raising=False)
    local_prefect_env()
    assert (os.environ[batch], os.environ[every]) == ("1000", "1")  # one recorder flush at a time
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and os.environ["DO_NOT_TRACK"] == "1"
    from prefect.settings.models.server.services import ServerServicesTaskRunRecorderSettings

    assert ServerServicesTaskRunRecorderSettings().batch_size == 1000  # the names Prefect reads
    for name in (batch, every):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    local_prefect_env()  # a real server is left as it is
    assert batch not in os.environ and every not in os.environ


# --------------------------------------------------------------------------- retry rules


@pytest.mark.parametrize(
    "code, retryable",
    [(75, True), (76, True), (73, True), (-9, True), (2, False), (3, False), (1, False)],
)
def test_only_failures_a_retry_can_cure_are_retried(code: int, retryable: bool) -> None:
    from farense.errors import TrainingFailed
    from farense.run.outcome import TrainingOutcome
    from farense.train.supervisor import judge_exit
    from tasks.train import retry_only_curable

    failure = judge_exit(code, TrainingOutcome.failure("run", code, "detail", "E", False), [], lambda: 1)
    message, curable = failure.message, failure.retryable
    assert curable is retryable and "detail" in message
    state = SimpleNamespace(data=TrainingFailed(message, code, curable))
    assert retry_only_curable(None, None, state) is retryable
    assert retry_only_curable(None, None, SimpleNamespace(data=ValueError("bug"))) is False


def test_the_training_task_retries_with_jittered_backoff() -> None:
    from tasks.train import train_model

    assert train_model.retries >= 2
    assert train_model.retry_jitter_factor and train_model.retry_condition_fn is not None


def test_already_trained_needs_a_finished_run_with_the_same_fingerprint(write_config: Any, tmp_path: Path) -> None:
    import orjson

    from farense.config import load_config
    from farense.train.data import data_fingerprint
    from farense.train.supervisor import already_trained

    cfg = load_config(write_config(), workspace=tmp_path)
    cfg.run_dir.mkdir(parents=True)
    summary = cfg.run_dir / "training_summary.json"
    assert already_trained(cfg) is None
    same = {"fingerprint": cfg.fingerprint, "data_fingerprint": data_fingerprint(cfg)}
    summary.write_bytes(orjson.dumps({"state": "completed", **same, "final_step": 9, "total_steps": 9}))
    assert already_trained(cfg).step == 9
    summary.write_bytes(orjson.dumps({"state": "completed", **same, "fingerprint": "other", "final_step": 9}))
    assert already_trained(cfg) is None
    summary.write_bytes(orjson.dumps({"state": "completed", **same, "data_fingerprint": "changed", "final_step": 9}))
    assert already_trained(cfg) is None, "new data means training again"
    summary.write_bytes(orjson.dumps({"state": "preempted", **same, "final_step": 4}))
    assert already_trained(cfg) is None


def test_the_watcher_follows_a_resumed_run(tmp_path: Path) -> None:
    import orjson

    from farense.run.layout import RunPaths, checkpoint_name
    from farense.train.supervisor import TrainingWatcher

    paths = RunPaths(tmp_path / "run")
    (paths.checkpoints / checkpoint_name(10)).mkdir(parents=True)
    paths.metrics_jsonl.write_bytes(b"".join(orjson.dumps({"step": s, "train_loss": 2.0}) + b"\n" for s in range(1, 14)))
    paths.state.write_bytes(orjson.dumps({"state": "running", "pid": 4242, "total_steps": 40, "resumed_from": 10}))
    lines: list[str] = []
    saved: list[int] = []
    watcher = TrainingWatcher(paths, 4242, lines.append, on_checkpoint=saved.append)

    watcher.poll()
    assert watcher.step == 13 and watcher.total == 40 and lines == ["training resumed from checkpoint step 10"]
    # The trainer cuts metrics.jsonl back to its checkpoint (a new file) and goes on; a line being
    # written is not read until it is whole.
    tmp = paths.metrics_jsonl.with_suffix(".tmp")
    tmp.write_bytes(b"".join(orjson.dumps({"step": s, "train_loss": 1.0, "val_loss": 1.5}) + b"\n" for s in range(1, 21))
                    + b'{"step": 21, "tra')
    os.replace(tmp, paths.metrics_jsonl)
    (paths.checkpoints / checkpoint_name(20)).mkdir()
    watcher.poll()
    assert watcher.step == 20 and watcher.last_val["val_loss"] == 1.5 and saved == [20]
    watcher.poll()
    assert lines == ["training resumed from checkpoint step 10"] and saved == [20], "each thing is told once"


def test_the_progress_bar_moves_every_few_percent_not_every_poll(tmp_path: Path) -> None:
    import orjson

    from farense.run.layout import RunPaths
    from farense.train.supervisor import (
        PROGRESS_MAX_SECONDS,
        TrainingWatcher,
        progress_due,
    )

    assert progress_due(0.0, None, 0) and not progress_due(3.0, 0.0, 60) and not progress_due(6.0, 0.0, 1)
    assert progress_due(6.0, 0.0, 11) and progress_due(0.5, 0.0, PROGRESS_MAX_SECONDS) and progress_due(100.0, 99.0, 0)

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir(parents=True)
    paths.state.write_bytes(orjson.dumps({"state": "running", "pid": 7, "total_steps": 100}))
    now = [0.0]
    bars: list[tuple[float, str]] = []
    watcher = TrainingWatcher(paths, 7, lambda line: None, on_progress=lambda p, d: bars.append((p, d)),
                              clock=lambda: now[0])
    rows = []
    for step in range(1, 101):  # one step a second, a poll after each
        rows.append({"step": step, "train_loss": 2.0})
        if step % 10 == 0:
            rows[-1].update(val_loss=2.1, train_loss_window=2.0, train_loss_window_steps=10, gap=0.1, gap_status="BOM")
        paths.metrics_jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        now[0] = float(step)
        watcher.poll()
    assert 8 <= len(bars) <= 12 and bars[-1][0] == 100.0, [p for p, _ in bars]
    assert "step 41/100 · at step 40: val 2.1000" in bars[4][1] and all("ETA" in d for _, d in bars[1:-1]), bars
    assert "val 2.1000 - train 2.0000 (mean of last 10 steps) = gap +0.1000 BOM" in bars[-1][1]
    assert bars[-1][1].startswith("▰▰▰▰▰▰▰▰▰▰ 100% · step 100/100") and "ETA" not in bars[-1][1]
    # The trainer's final state comes after its last step: the bar says how it ended, once.
    paths.state.write_bytes(orjson.dumps({"state": "completed", "pid": 7, "total_steps": 100}))
    watcher.poll()
    watcher.poll()
    assert bars[-1][1].startswith("▰▰▰▰▰▰▰▰▰▰ 100% · completed at step 100/100") and bars[-2][0] == 100.0
    assert len([d for _, d in bars if "completed" in d]) == 1


def test_a_second_training_on_the_machine_waits_until_the_first_dies(tmp_path: Path, monkeypatch: Any) -> None:
    import subprocess
    import sys
    import threading

    from farense.train.supervisor import MACHINE_LOCK_ENV, one_training_on_this_machine

    lock = tmp_path / "training.lock"
    monkeypatch.setenv(MACHINE_LOCK_ENV, str(lock))
    hold = ("import sys, time; from farense.run.locks import RunLock; RunLock(sys.argv[1], command='train other').acquire();"
            " print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages: list[str] = []
        threading.Timer(1.0, holder.kill).start()  # SIGKILL: the kernel frees the flock
        started = time.monotonic()
        with one_training_on_this_machine(messages.append, "mine"):
            waited = time.monotonic() - started
        assert waited >= 0.9
        assert "another training runs on this machine" in messages[0] and "train other" in messages[0]
    finally:
        holder.kill()
        holder.wait()


def test_with_two_slots_two_trainings_hold_the_machine_and_a_third_waits_for_either(tmp_path: Path,
                                                                                   monkeypatch: Any) -> None:
    """A campaign training side by side takes one of two slots; a third training (two slots, or the usual
    one) waits until a holder dies, and says who holds what."""
    import subprocess
    import sys
    import threading

    from farense.train.supervisor import MACHINE_LOCK_ENV, one_training_on_this_machine, training_lock_paths

    monkeypatch.setenv(MACHINE_LOCK_ENV, str(tmp_path / "training.lock"))
    first, second = training_lock_paths(2)
    assert first == tmp_path / "training.lock" and second == tmp_path / "training.lock.1"
    hold = ("import sys, time; from farense.run.locks import RunLock; RunLock(sys.argv[1], command='train ' + sys.argv[2])"
            ".acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(first), "v1"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages: list[str] = []
        with one_training_on_this_machine(messages.append, "v2", slots=2):  # the second slot is free: no wait
            assert messages == [] and json_record(second)["command"] == "train v2"
            threading.Timer(1.0, holder.kill).start()  # SIGKILL frees the first slot
            started = time.monotonic()
            with one_training_on_this_machine(messages.append, "v3", slots=2):
                waited = time.monotonic() - started
                assert json_record(first)["command"] == "train v3"
        assert waited >= 0.9
        assert messages[0].startswith("waiting: every training slot is taken on this machine")
        assert "train v1" in messages[0] and "train v2" in messages[0]
        # Both slots free again: a one-slot training takes the first at once.
        with one_training_on_this_machine(messages.append, "v4"):
            assert json_record(first)["command"] == "train v4" and len(messages) == 1
    finally:
        holder.kill()
        holder.wait()


def json_record(lock: Path) -> dict[str, Any]:
    import orjson

    return orjson.loads(lock.read_bytes())


@pytest.mark.parametrize("requested, device, cores, memory, expected", [
    ("auto", "cpu", 2, None, 2),
    ("auto", "cpu", 8, None, 2),  # never more than there are configs
    ("auto", "cpu", 1, None, 1),  # one core: nothing to gain
    ("auto", "cpu", 2, 1.5, 1),  # memory for one run only
    ("auto", "gpu", 8, None, 1),  # one device, never shared
    (2, "gpu", 8, None, 1),
    (1, "cpu", 8, None, 1),
    (3, "cpu", 2, None, 2),  # asked for more than there are configs
])
def test_how_many_trainings_run_side_by_side(requested: Any, device: str, cores: int, memory: float | None,
                                             expected: int) -> None:
    from farense.train.supervisor import trainings_side_by_side

    gb = 1 << 30
    n, why = trainings_side_by_side(requested, 2, device=device, cores=cores,
                                    available_bytes=None if memory is None else int(memory * gb), run_bytes=gb)
    assert n == expected, why
    assert ("side by side" in why and f"OPENBLAS_NUM_THREADS={max(1, cores // n)}" in why) if n > 1 else \
        why.startswith("one training at a time")
    with pytest.raises(ValueError, match="parallel: expected 'auto' or a whole number >= 1, got 0"):
        trainings_side_by_side(0, 2, device=device, cores=cores)


# --------------------------------------------------------------------------- the resume automation


def test_resume_automation_passes_the_crashed_runs_parameters_and_counts_attempts() -> None:
    import inspect

    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    from deployments.setup import resume_parameters
    from flows.pipeline import training_flow

    templates = resume_parameters()
    assert set(templates) == set(inspect.signature(training_flow.fn).parameters)

    def render(params: dict[str, Any]) -> dict[str, Any]:
        ctx = HydrationContext(render_jinja=True, jinja_context={"flow_run": SimpleNamespace(parameters=params)})
        return hydrate(templates, ctx)

    # A deployment run that set only some parameters: the others keep the flow's defaults.
    first = render({"config": "v1", "demo": True})
    assert first == {"config": "v1", "compare_with": "production", "promote": True, "demo": True, "workspace": None,
                     "notify_block": None, "notify": True, "resume_attempt": 1, "max_resume_attempts": 3,
                     "side_by_side_with": None}
    again = render({**first, "workspace": "/w"})
    assert again["resume_attempt"] == 2 and again["workspace"] == "/w"


def test_automations_are_valid_and_bounded() -> None:
    from uuid import uuid4

    from deployments.setup import (
        AUTOMATION_NOTIFY,
        AUTOMATION_RESUME,
        AUTOMATION_ZOMBIE,
        HEARTBEAT_GRACE,
        automations,
    )

    made = {a.name: a for a in automations(uuid4())}
    assert set(made) == {AUTOMATION_RESUME, AUTOMATION_ZOMBIE, AUTOMATION_NOTIFY}
    assert made[AUTOMATION_RESUME].trigger.expect == {"prefect.flow-run.Crashed"}
    assert HEARTBEAT_GRACE.total_seconds() > 2 * 30  # more than two missed heartbeats of 30 s
    assert AUTOMATION_NOTIFY not in {a.name for a in automations(None)}


# --------------------------------------------------------------------------- deployments file


def test_prefect_yaml_nightly_and_weekly_deployments() -> None:
    import yaml

    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    nightly, weekly = deps["nightly"], deps["weekly-cleanup"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["schedules"][0]["timezone"] == "Europe/Lisbon"
    assert set(nightly["parameters"]) == {"config", "compare_with", "promote", "demo"}
    assert nightly["concurrency_limit"]["limit"] == 1
    assert nightly["work_pool"]["name"] == weekly["work_pool"]["name"] == "farense"
    assert "pull" not in doc or all("git_clone" not in str(s) for s in doc.get("pull") or [])

    from flows.maintenance import maintenance_flow
    from flows.pipeline import training_flow

    assert nightly["entrypoint"] == "flows/pipeline.py:training_flow" and training_flow.name == "farense-training"
    assert weekly["entrypoint"] == "flows/maintenance.py:maintenance_flow" and maintenance_flow.name == "farense-maintenance"
    assert set(weekly["parameters"]) <= set(__import__("inspect").signature(maintenance_flow.fn).parameters)

    from flows.campaign import campaign_flow

    campaign = deps["campaign"]
    assert campaign["entrypoint"] == "flows/campaign.py:campaign_flow" and campaign_flow.name == "farense-campaign"
    assert campaign["parameters"]["configs"] == ["v1", "v2"]
    assert set(campaign["parameters"]) <= set(__import__("inspect").signature(campaign_flow.fn).parameters)
    assert campaign["work_pool"]["work_queue_name"] == nightly["work_pool"]["work_queue_name"]

    # The halving campaign: its trials are runs of the trial deployment on the training queue; the
    # coordinating run waits elsewhere, or it would hold the one training slot its own trials need.
    from deployments.setup import QUEUES
    from flows.campaign_halving import campaign_halving_flow, campaign_trial_flow

    halving, trial = deps["halving"], deps["trial"]
    assert halving["entrypoint"] == "flows/campaign_halving.py:campaign_halving_flow"
    assert trial["entrypoint"] == "flows/campaign_halving.py:campaign_trial_flow"
    assert halving["parameters"]["trial_deployment"] == f"{campaign_trial_flow.name}/{trial['name']}"
    assert set(halving["parameters"]) <= set(__import__("inspect").signature(campaign_halving_flow.fn).parameters)
    assert (REPO / halving["parameters"]["campaign"]).is_file()
    assert trial["work_pool"]["work_queue_name"] == "training" and QUEUES["training"] == 1
    assert halving["work_pool"]["work_queue_name"] in QUEUES and halving["work_pool"]["work_queue_name"] != "training"


# --------------------------------------------------------------------------- what a person sees


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.type != "result"}


def _logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                                        limit=200)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_what_a_person_sees_in_prefect_after_a_run(prefect_api: None, tmp_path: Path, monkeypatch: Any) -> None:
    """After a flow run, read back through Prefect's API: a keyed artifact for every step (the progress bar
    too), one gap everywhere (log, training summary, decision, monitor, notification), a preflight whose
    rows add up to its total, and tags on every task and on the run itself."""
    import re

    from test_diskguard import preflight_table_adds_up

    from farense.model.demo import build_demo
    from farense.observe.monitor import snapshot
    from flows.pipeline import completion_message, training_flow

    monkeypatch.setenv("FARENSE_TRAINING_LOCK", str(tmp_path / "training.lock"))
    build_demo(tmp_path / ".farense" / "tiny")
    config = tmp_path / "seen.toml"
    config.write_text(f'extends = ["{REPO}/configs/v2.toml", "{REPO}/configs/overlays/tiny.toml"]\nname = "seen"\n'
                      "[training]\niters = 12\nwarmup_steps = 2\n[validation]\nevery_steps = 4\n"
                      "[checkpoint]\nevery_steps = 6\n[evaluation]\nmax_examples = 4\nmax_new_tokens = 8\n")

    state = training_flow(config=str(config), workspace=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    run_id, result = state.state_details.flow_run_id, state.result()

    found = _artifacts(run_id)
    keys = {"preflight-seen", "cleanup-seen", "training-progress-seen", "training-summary-seen", "evaluation-seen",
            "decision-seen"}
    assert keys <= set(found), sorted(found)
    assert None not in found, "every artifact has a key (an unkeyed one is missing from the UI's list)"
    progress = found["training-progress-seen"]
    assert progress.type == "progress" and progress.data == 100.0 and "step 12/12" in progress.description
    cards = {k: a.description for k, a in found.items() if a.type != "progress"}  # a bar's line may be longer
    assert all(0 < len(d or "") <= 80 for d in cards.values()), cards

    # One gap: the summary's, the decision's and the trainer's log line at the best step are the same number.
    summary_md, decision_md = found["training-summary-seen"].data, found["decision-seen"].data
    best = re.search(r"\| best step \| (\d+) \|", summary_md).group(1)
    gap = re.search(r"\| gap at the best step[^|]*\| ([+-]\d+\.\d{4}) \(", summary_md).group(1)
    assert re.search(r"\| train loss \(mean of last 4 steps\) at the best step \| \d", summary_md), summary_md
    val, train, gap_in_decision = re.search(r"val (\d+\.\d{4}) - train (\d+\.\d{4}) \(mean of last 4 steps\) = gap "
                                            r"([+-]\d+\.\d{4})", decision_md).groups()
    assert gap_in_decision == gap and abs(float(val) - float(train) - float(gap)) <= 1.5e-4
    best_line = wait_for_line(run_id, f"step {best}/12: ")
    assert f"= gap {gap} " in best_line and f"val {val} - train {train} (mean of last 4 steps)" in best_line
    s = snapshot(Path(result.run_dir))
    assert s.gap == pytest.approx(s.val_loss - s.gap_train_loss) and s.gap_train_steps == 4
    _, body = completion_message(load_config_for(config, tmp_path), result.training, result.evaluation,
                                 result.decision, result.promotion)
    assert f"= gap {gap} " in body

    # The preflight's "needs" is the sum of its rows.
    assert preflight_table_adds_up(found["preflight-seen"].data) == [result.preflight.needed_bytes]

    # Tags on every task run and on the run itself, as a deployment run would have them.
    tasks = _task_runs(run_id)
    assert tasks and all("farense" in t.tags for t in tasks), {t.name: t.tags for t in tasks}
    assert {"farense", "training", "config:seen"} <= set(_flow_run(run_id).tags)


def wait_for_line(flow_run_id: Any, text: str, timeout: float = 30) -> str:
    """The first log line of the run containing `text` (logs reach the API shortly after the run ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in _logs(flow_run_id) if text in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"no log line with {text!r}"
            return lines[0]
        time.sleep(1)


def load_config_for(config: Path, workspace: Path) -> Any:
    from farense.config import load_config

    return load_config(str(config), workspace=workspace)
