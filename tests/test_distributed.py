"""Data-parallel training: the launcher's rules and, with real processes on 127.0.0.1 (ring
backend, two ranks through mlx.launch), exact resume after a rank is SIGKILLed and a bounded stop
when a rank hangs."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
from training_fixtures import REPO, SHORT, farense_env, write_config_file

from farense.codes import ExitCode
from farense.errors import ConfigError
from farense.run.outcome import job_exit_code
from farense.train.distributed import (
    DEFAULT_PORT,
    ENV_RANK_GPUS,
    LaunchSpec,
    Watchdog,
    broadcast_bytes,
    parse_rank_exit,
    pin_rank_gpu,
    rank_gpus,
    share_checkpoint,
    spec_defaults_from_env,
    stop_on_stdin,
)

# --------------------------------------------------------------------------- the launcher's rules


def test_rank_exits_are_read_off_mlx_launch_warnings():
    assert parse_rank_exit(b"\x1b[33m[WARN] Node with rank 1 exited with code 9 \x1b[0m\n") == (1, 9)
    assert parse_rank_exit(b"\x1b[33m[WARN] Node with rank 0 exited with code -15 \x1b[0m\n") == (0, -15)
    assert parse_rank_exit(b"\x1b[33m[WARN] Node with rank 3 was killed \x1b[0m\n") == (3, None)
    assert parse_rank_exit(b"step 4/12: train 7.7 val 6.8\n") is None


@pytest.mark.parametrize("codes, expected", [
    ({}, ExitCode.OK),                                          # mlx.launch reports failures only
    ({1: -9, 0: ExitCode.PREEMPTED}, ExitCode.PREEMPTED),           # a rank SIGKILLed; rank 0 saw the peer go
    ({1: None, 0: ExitCode.BAD_INPUT}, ExitCode.PREEMPTED),         # a death outranks what the others said after it
    ({1: ExitCode.FAILED, 0: None}, ExitCode.FAILED),               # rank 1's exception, then mlx.launch killed rank 0
    ({0: ExitCode.FAILED, 1: -15}, ExitCode.FAILED),                # ... or SIGTERMed it: a consequence, not a preemption
    ({0: ExitCode.FAILED, 1: ExitCode.FAILED}, ExitCode.FAILED),    # both ranks hit the same bug
    ({1: 137}, ExitCode.PREEMPTED),                             # killed on a remote host (ssh: 128 + 9)
    ({1: 255}, ExitCode.PREEMPTED),                             # ssh lost the host
    ({1: ExitCode.BAD_INPUT, 0: ExitCode.PREEMPTED}, ExitCode.BAD_INPUT),  # the data is missing on rank 1's host
    ({0: ExitCode.NUMERICAL, 1: ExitCode.PREEMPTED}, ExitCode.NUMERICAL),
    ({1: ExitCode.FAILED, 0: ExitCode.PREEMPTED}, ExitCode.FAILED),     # a bug on one rank is not cured by a retry
    ({0: ExitCode.DISK_FULL, 1: ExitCode.PREEMPTED}, ExitCode.DISK_FULL),
    ({0: ExitCode.LOCKED, 1: ExitCode.PREEMPTED}, ExitCode.LOCKED),
    ({0: ExitCode.PREEMPTED, 1: ExitCode.PREEMPTED}, ExitCode.PREEMPTED),
])
def test_one_exit_code_for_the_job_means_what_a_single_trainers_code_means(codes, expected):
    assert job_exit_code(codes, 2) == expected


def test_launch_spec_gathers_every_problem_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError) as e:
        LaunchSpec.create(hosts="a,,b", ranks_per_host=0, backend="tcp", port=80, rank_timeout=0)
    msg = str(e.value)
    for expected in ("empty host name", "--ranks-per-host", "--backend", "--port", "--rank-timeout"):
        assert expected in msg, msg
    with pytest.raises(ConfigError, match="give exactly one of --hosts and --hostfile"):
        LaunchSpec.create()
    with pytest.raises(ConfigError, match="ring backend connects by IP address.*mac1"):
        LaunchSpec.create(hosts="mac1,10.0.0.2", backend="ring")
    with pytest.raises(ConfigError, match="--hostfile: .*doesn't exist"):
        LaunchSpec.create(hostfile=tmp_path / "missing.json")
    bad = tmp_path / "hosts.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="--hostfile: Failed to parse"):
        LaunchSpec.create(hostfile=bad)


def test_launch_spec_counts_ranks_and_builds_the_mlx_launch_command(tmp_path):
    spec = LaunchSpec.create(hosts="127.0.0.1", ranks_per_host=2, port=41000)
    assert spec.world_size == 2 and spec.all_local
    argv = spec.launcher_argv(["python", "-m", "farense", "train", "v2"])
    assert argv[argv.index("--hosts") + 1] == "127.0.0.1,127.0.0.1"
    assert argv[argv.index("--starting-port") + 1] == "41000"
    assert argv[-6:] == ["--", "python", "-m", "farense", "train", "v2"]

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(orjson.dumps({"backend": "ring", "hosts": [
        {"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}, {"ssh": "mac3", "ips": ["10.0.0.3"]},
    ]}).decode())
    spec = LaunchSpec.create(hostfile=hostfile)
    assert spec.world_size == 3 and not spec.all_local
    assert "--hostfile" in spec.launcher_argv(["x"]) and spec.port == DEFAULT_PORT


def test_each_rank_gets_its_own_gpu_where_mlx_launch_would_give_all_of_them_gpu_0():
    # Two ranks here: GPUs 0 and 1 (mlx.launch's own CUDA_VISIBLE_DEVICES=rank % 1 is 0 for both).
    assert rank_gpus(["127.0.0.1", "127.0.0.1"]) == ["0", "1"]
    # A narrowed CUDA_VISIBLE_DEVICES on this machine: the local rank-th of those GPUs.
    assert rank_gpus(["127.0.0.1", "127.0.0.1"], "2,3") == ["2", "3"]
    # Two hosts of two ranks each: the local rank on each host; another host's GPUs are its own.
    assert rank_gpus(["127.0.0.1", "127.0.0.1", "gpu2", "gpu2"], "5,6") == ["5", "6", "0", "1"]

    spec = LaunchSpec.create(hosts="127.0.0.1", ranks_per_host=2, backend="nccl")
    argv = spec.launcher_argv(["python", "-m", "farense"], environ={"NCCL_NVLS_ENABLE": "0", "HOME": "/root"})
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert f"{ENV_RANK_GPUS}=0,1" in envs
    assert "NCCL_NVLS_ENABLE=0" in envs, "NVLink multicast stays off in ranks started with their own environment"
    assert not any(e.startswith("HOME=") for e in envs)


def test_a_rank_pins_its_gpu_from_the_launchers_table_and_nothing_else_does():
    env = {"MLX_RANK": "1", ENV_RANK_GPUS: "0,1", "CUDA_VISIBLE_DEVICES": "0"}
    assert pin_rank_gpu(env) == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    alone = {"CUDA_VISIBLE_DEVICES": "3"}
    assert pin_rank_gpu(alone) is None and alone == {"CUDA_VISIBLE_DEVICES": "3"}  # not launched by farense
    assert pin_rank_gpu({"MLX_RANK": "1"}) is None  # launched by plain mlx.launch: left as it is


def test_the_rank_command_pins_its_gpu_before_mlx_is_imported():
    """The GPU must be chosen before CUDA initialises: the rank's path to pin_rank_gpu imports no mlx."""
    code = ("import sys; from farense.cli import build_parser; import farense.commands.train as t; "
            "import farense.train.distributed, farense.signals, farense.config; "
            "print('mlx.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_an_exception_in_a_rank_is_a_failure_and_a_lost_peer_is_resumable():
    from farense.commands.train import _as_failure, _as_peer_lost
    from farense.errors import PeerLost

    bug = RuntimeError("There is no Stream(gpu, 0) in current thread.")
    assert not isinstance(_as_peer_lost(bug), PeerLost)
    failure = _as_failure(bug, 1)
    assert failure.exit_code == ExitCode.FAILED and not failure.retryable and "rank 1" in str(failure)
    lost = _as_peer_lost(RuntimeError("[ring] Connection to a peer was lost"))
    assert isinstance(lost, PeerLost) and lost.retryable and lost.exit_code == ExitCode.PREEMPTED


def test_a_ranks_own_failure_decides_the_job_even_when_the_launcher_reported_a_peer_lost_first(tmp_path):
    """The race seen in CI: rank 1 raised (its own result says failed), rank 0 saw the lost peer and
    exited 75 before the launcher reaped rank 1 with SIGTERM. The job is failed, not resumable."""
    from farense.commands.train import _as_failure, _as_peer_lost, _job_outcome
    from farense.config import load_config
    from farense.run.outcome import TrainingOutcome
    from farense.train.distributed import JobOutcome

    config = load_config("v2", overlays=["tiny"], workspace=tmp_path)
    spec = LaunchSpec.create(hosts="127.0.0.1", ranks_per_host=2, port=41000)
    job = JobOutcome(job_exit_code({0: 75, 1: -15}, 2), {0: 75, 1: -15}, False, False, 3.0)
    assert job.exit_code == ExitCode.PREEMPTED  # what the launcher alone would say
    lost = TrainingOutcome.from_error(config.run_dir, _as_peer_lost(RuntimeError("[ring] connection to a peer was lost")))
    bug = TrainingOutcome.from_error(config.run_dir, _as_failure(RuntimeError("boom"), 1))
    result = _job_outcome(config, spec, job, {0: lost, 1: bug})
    assert result.exit_code == ExitCode.FAILED and not result.retryable
    assert "rank 1 failed: RuntimeError: boom" in result.message and "resumable" not in result.message
    assert result.ranks == {"0": ExitCode.PREEMPTED, "1": ExitCode.FAILED}
    # A real preemption stays resumable: every rank's own result says so.
    assert _job_outcome(config, spec, job, {0: lost, 1: lost}).exit_code == ExitCode.PREEMPTED
    assert _job_outcome(config, spec, job, {}).exit_code == ExitCode.PREEMPTED


def test_collectives_run_on_the_cpu_stream_except_under_nccl(monkeypatch):
    import mlx.core as mx

    from farense.train.distributed import collective_stream, nccl_backend

    monkeypatch.delenv("NCCL_HOST_IP", raising=False)
    assert not nccl_backend() and collective_stream() == mx.cpu
    monkeypatch.setenv("NCCL_HOST_IP", "127.0.0.1")
    # This CPU-only mlx has no GPU: still the CPU stream (NCCL would need one).
    assert collective_stream() == (mx.default_stream(mx.default_device()) if nccl_backend() else mx.cpu)


def test_a_killed_rank_stops_the_job_after_a_short_grace_not_the_rank_time_out():
    """NCCL ranks wait for a dead peer until their own time-out: once a rank is reported killed,
    the launcher ends the rest after death_grace seconds."""
    from farense.train.distributed import supervise

    fake_launch = ("import sys, time; print('[WARN] Node with rank 1 exited with code -9', file=sys.stderr, "
                   "flush=True); time.sleep(60)")
    out = supervise([sys.executable, "-c", fake_launch], world_size=2, rank_timeout=300, death_grace=0.5,
                    out=open(os.devnull, "wb"), err=open(os.devnull, "wb"), poll=0.05)
    assert out.seconds < 10 and out.killed_after_timeout
    assert out.exit_code == ExitCode.PREEMPTED and out.rank_codes == {1: -9, 0: None}


def test_hosts_default_to_the_environment_so_a_work_pool_can_set_them():
    env = {"FARENSE_HOSTS": "10.0.0.1,10.0.0.2"}
    assert spec_defaults_from_env(None, None, env) == ("10.0.0.1,10.0.0.2", None)
    assert spec_defaults_from_env("127.0.0.1", None, env) == ("127.0.0.1", None)  # the flag wins
    assert spec_defaults_from_env(None, None, {"FARENSE_HOSTFILE": "/etc/h.json"}) == (None, "/etc/h.json")
    assert spec_defaults_from_env(None, None, {}) == (None, None)


def test_watchdog_allows_a_long_start_then_bounds_every_step():
    now = [0.0]
    exits: list[int] = []
    logs: list[str] = []
    dog = Watchdog(10, 100, rank=1, log=logs.append, exit=exits.append, clock=lambda: now[0])
    now[0] = 90
    assert not dog.check()  # still starting (connect, load, compile)
    dog.beat()
    now[0] = 99
    assert not dog.check()
    now[0] = 101
    assert dog.check() and exits == [ExitCode.PREEMPTED]
    assert "rank 1" in logs[0] and "resumable" in logs[0]


def test_stop_line_or_launcher_gone_on_stdin_requests_a_stop():
    for payload in (b"hello\nstop\n", b""):
        r, w = os.pipe()
        stopped: list[bool] = []
        t = stop_on_stdin(lambda: stopped.append(True), fd=r)
        os.write(w, payload)
        if not payload:
            os.close(w)  # EOF
        t.join(timeout=5)
        assert stopped == [True], payload
        os.close(r)
        if payload:
            os.close(w)


def test_alone_the_collectives_are_identities():
    assert broadcast_bytes(b"abc") == b"abc"
    sentinel = object()
    assert share_checkpoint(sentinel, fingerprint="f", data_fingerprint="d") is sentinel


def test_cli_refuses_a_bad_launch_with_the_input_exit_code(tmp_path, demo_dir):
    cfg = _config(tmp_path, demo_dir)
    for extra, expected in ((["--hosts", "mac1,mac2", "--backend", "ring"], "IP address"),
                            (["--hosts", "127.0.0.1", "-n", "3"], "cannot be split equally across 3 ranks")):
        out = subprocess.run(_train_argv(cfg, tmp_path, *extra, "--result-json", str(tmp_path / "r.json")),
                             capture_output=True, text=True, env=farense_env(), cwd=REPO, timeout=120)
        assert out.returncode == ExitCode.BAD_INPUT, out.stderr
        assert expected in out.stderr
        assert orjson.loads((tmp_path / "r.json").read_bytes())["exit_code"] == ExitCode.BAD_INPUT


# --------------------------------------------------------------------------- two real ranks

# 12 steps of batch 2 (one example per rank) x accumulation 2; checkpoints every 4.
DIST = {
    "training": {**SHORT["training"], "iters": 12},
    "validation": {"every_steps": 4, "batches": 2},
    "checkpoint": {"every_steps": 4, "keep_last": 2},
}
RANK_TIMEOUT = 8  # seconds without a completed step; a step here takes well under one


def _config(ws: Path, demo_dir: Path) -> Path:
    from farense.config import load_config

    cfg = load_config("v2", overlays=["tiny"], workspace=ws).with_overrides(
        **{**DIST, "model": {"path": str(demo_dir / "model")}, "data": {"dir": str(demo_dir / "data")}})
    return write_config_file(cfg, ws / "v2.toml")


def _free_port_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _train_argv(cfg_file: Path, ws: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "farense", "--workspace", str(ws), "train", str(cfg_file), "--no-progress", *extra]


def _launch(cfg_file: Path, ws: Path, log: Path, **env: str) -> subprocess.Popen:
    argv = _train_argv(cfg_file, ws, "--hosts", "127.0.0.1,127.0.0.1", "--port", str(_free_port_pair()),
                       "--rank-timeout", str(RANK_TIMEOUT), "--result-json", str(ws / "result.json"))
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=farense_env(**env), cwd=REPO)


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("MLX_RANK") == str(rank) and "farense" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_digest(path: Path) -> str:
    """Every tensor's name, dtype, shape and bytes: the file's layout follows dict order, which a
    resume changes (as in a single-process resume), while every value is bit-identical."""
    import mlx.core as mx
    import numpy as np

    h = hashlib.sha256()
    for name, a in sorted(mx.load(str(path)).items()):
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(np.asarray(a.view(mx.uint8) if a.ndim else a.reshape(1).view(mx.uint8)).tobytes())
    return h.hexdigest()


def _wait_for(pred, timeout: float = 120, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics_steps(paths) -> int:
    try:
        return len(paths.metrics_jsonl.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def _finish(cfg_file: Path, ws: Path, log: Path) -> dict:
    proc = _launch(cfg_file, ws, log)
    assert proc.wait(timeout=300) == ExitCode.OK, log.read_text()[-4000:]
    return orjson.loads((ws / "result.json").read_bytes())


def _outcome(ws: Path) -> dict:
    from farense.config import load_config
    from farense.run.layout import RunPaths
    from farense.run.metrics import read_metrics

    paths = RunPaths(load_config(ws / "v2.toml", workspace=ws).run_dir)
    return {
        "adapters": _sha(paths.adapters / "adapters.safetensors"),
        "final_checkpoint": _sha(paths.checkpoints / "step-00000012" / "adapters.safetensors"),
        "optimizer": _tensors_digest(paths.checkpoints / "step-00000012" / "optimizer.safetensors"),
        "metrics": [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(paths.metrics_jsonl)],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir):
    """One uninterrupted 2-rank run: the bytes every interrupted 2-rank run must reproduce."""
    ws = tmp_path_factory.mktemp("dist-reference")
    cfg = _config(ws, demo_dir)
    result = _finish(cfg, ws, ws / "log.txt")
    assert result["state"] == "completed" and result["world_size"] == 2
    log = (ws / "log.txt").read_text()
    assert "[rank 1] loading" in log and log.count("checkpoint step-00000012") == 1  # rank 0 alone writes
    return _outcome(ws)


def _paths(ws: Path):
    from farense.config import load_config
    from farense.run.layout import RunPaths

    return RunPaths(load_config(ws / "v2.toml", workspace=ws).run_dir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank0_sigkilled_mid_checkpoint_stops_the_job_and_the_retry_is_byte_identical(tmp_path, demo_dir, reference):
    ws = tmp_path
    cfg = _config(ws, demo_dir)
    paths = _paths(ws)
    marker = tmp_path / "fault.txt"
    proc = _launch(cfg, ws, ws / "log1.txt", FARENSE_FAULT="checkpoint-write:8", FARENSE_FAULT_MARKER=str(marker))
    _wait_for(marker.exists, what="rank 0 writing checkpoint 8")
    rank0 = int(marker.read_text().split(":")[2])
    assert rank0 == _rank_pid(proc, 0)
    killed_at = time.monotonic()
    os.kill(rank0, signal.SIGKILL)
    code = proc.wait(timeout=120)
    stopped_after = time.monotonic() - killed_at
    log1 = (ws / "log1.txt").read_text()
    assert code == ExitCode.PREEMPTED, log1[-4000:]
    assert stopped_after < RANK_TIMEOUT, f"rank 1 should see the lost peer at once, took {stopped_after:.1f} s"
    assert "another rank was lost" in log1
    result = orjson.loads((ws / "result.json").read_bytes())
    assert result["retryable"] and result["ranks"]["0"] == -signal.SIGKILL
    assert [p.name for p in paths.checkpoints.iterdir() if ".tmp-" in p.name], "a half-written checkpoint is left"

    result = _finish(cfg, ws, ws / "log2.txt")
    assert result["resumed_from"] == 4, (ws / "log2.txt").read_text()[-3000:]
    assert "[rank 1] resuming from step 4" in (ws / "log2.txt").read_text()
    assert _outcome(ws) == reference


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_rank_stops_the_job_within_the_time_out_and_the_retry_is_byte_identical(tmp_path, demo_dir, reference):
    ws = tmp_path
    cfg = _config(ws, demo_dir)
    paths = _paths(ws)
    proc = _launch(cfg, ws, ws / "log1.txt")
    rank1 = _rank_pid(proc, 1)
    _wait_for(lambda: _metrics_steps(paths) >= 5, what="5 steps (checkpoint 4 written)")
    ranks = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    stopped_at = time.monotonic()
    os.kill(rank1, signal.SIGSTOP)  # a host that vanished: no socket closes, the collective waits forever
    code = proc.wait(timeout=120)
    took = time.monotonic() - stopped_at
    log1 = (ws / "log1.txt").read_text()
    assert code == ExitCode.PREEMPTED, log1[-4000:]
    assert RANK_TIMEOUT * 0.8 < took < 2 * RANK_TIMEOUT + 10, f"stopped after {took:.1f} s"
    assert "no progress for 8 s" in log1
    result = orjson.loads((ws / "result.json").read_bytes())
    assert result["state"] == "preempted" and result["killed_after_timeout"] and result["ranks"]["0"] == ExitCode.PREEMPTED
    assert not [pid for pid in ranks if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

    result = _finish(cfg, ws, ws / "log2.txt")
    assert result["state"] == "completed" and result["resumed_from"] in (4, 8)
    assert _outcome(ws) == reference


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_and_loses_none(tmp_path, demo_dir, reference):
    from farense.run.checkpoint import CheckpointStore
    from farense.run.metrics import read_metrics

    ws = tmp_path
    cfg = _config(ws, demo_dir)
    paths = _paths(ws)
    proc = _launch(cfg, ws, ws / "log1.txt")
    _wait_for(lambda: _metrics_steps(paths) >= 5, what="5 steps")
    proc.send_signal(signal.SIGTERM)  # what Prefect's cancellation and the OS's shutdown send
    assert proc.wait(timeout=120) == ExitCode.PREEMPTED, (ws / "log1.txt").read_text()[-4000:]
    log1 = (ws / "log1.txt").read_text()
    last = read_metrics(paths.metrics_jsonl)[-1]["step"]
    assert CheckpointStore(paths.checkpoints).latest_verified().step == last, "the stop step is checkpointed"
    assert f"rank 0: preempted: preempted by signal 15 after step {last};" in log1
    assert f"rank 1: preempted: preempted by signal 15 after step {last};" in log1  # the same step
    assert orjson.loads((ws / "result.json").read_bytes())["state"] == "preempted"

    result = _finish(cfg, ws, ws / "log2.txt")
    assert result["resumed_from"] == last
    assert _outcome(ws) == reference


# --------------------------------------------------------------------------- several machines


def test_multi_machine_deployments_pin_each_run_to_one_machine_with_one_training_at_a_time():
    """Every training deployment targets its machine's own queue (so a crash resumes where the
    checkpoints are), one run at a time; each machine cleans its own disk."""
    import yaml

    spec = yaml.safe_load((REPO / "deployments" / "multi-machine.yaml").read_text())
    deployments = spec["deployments"]
    names = [d["name"] for d in deployments]
    assert len(names) == len(set(names))
    machines = set()
    for d in deployments:
        path, _, func = d["entrypoint"].partition(":")
        assert (REPO / path).exists() and f"def {func}(" in (REPO / path).read_text()
        pool = d["work_pool"]
        queue = pool["work_queue_name"]
        assert pool["name"] == "farense"
        kind, _, machine = queue.partition("-")
        assert machine, f"{d['name']}: queue {queue!r} names no machine"
        machines.add(machine)
        if d["entrypoint"].endswith("training_flow"):
            assert kind == "training" and d["concurrency_limit"]["limit"] == 1
            assert d["parameters"]["config"] and "resume_attempt" not in d["parameters"]
        else:
            assert kind == "maintenance"
    assert machines == {"mac1", "mac2"}
    dp = next(d for d in deployments if "FARENSE_HOSTFILE" in d["work_pool"]["job_variables"]["env"])
    assert dp["work_pool"]["work_queue_name"] == "training-mac1" and "schedules" not in dp
    hosts = LaunchSpec.create(hostfile=REPO / "deployments" / "hosts.example.json")
    assert hosts.world_size == 2 and not hosts.all_local
    script = (REPO / "deployments" / "start-machine-worker.sh").read_text()
    assert '--limit 1' in script and '--work-queue "training-$machine"' in script
    assert subprocess.run(["bash", "-n", str(REPO / "deployments" / "start-machine-worker.sh")]).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_that_dies_of_an_exception_fails_the_job_and_is_not_retried(tmp_path, demo_dir):
    """A bug is no preemption: rank 1 raises inside step 3; mlx.launch then kills rank 0; the job
    ends failed (exit 1, not retryable), never 'preempted ... resumable'."""
    ws = tmp_path
    cfg = _config(ws, demo_dir)
    proc = _launch(cfg, ws, ws / "log1.txt", FARENSE_FAULT="step:3:raise", FARENSE_FAULT_RANK="1")
    code = proc.wait(timeout=180)
    log1 = (ws / "log1.txt").read_text()
    assert code == ExitCode.FAILED, log1[-4000:]
    assert "rank 1 failed: RuntimeError: FARENSE-FAULT-POINT step:3" in log1
    result = orjson.loads((ws / "result.json").read_bytes())
    assert result["state"] == "failed" and not result["retryable"] and result["ranks"]["1"] == ExitCode.FAILED
    assert "resumable" not in result["message"]
