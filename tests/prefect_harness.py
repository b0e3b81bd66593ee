"""Start and stop a real Prefect server, a process worker and a webhook listener, by PID.

The end-to-end test and the benchmark use these, so they exercise the project's own scripts
(deployments/start-server.sh, start-worker.sh). Everything binds 127.0.0.1, PREFECT_HOME is a
temporary directory, and telemetry is off: nothing leaves the machine.

Run as a script, this module is the webhook listener:
    python tests/prefect_harness.py webhook --port 0 --out hooks.jsonl --port-file port.txt
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, TypeVar

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO / "deployments"
T = TypeVar("T")


def _migrated_database() -> Path:
    """A Prefect SQLite database already migrated to this Prefect's schema, built once per Prefect version and
    interpreter and shared by the suite's workers (a file lock): a fresh PREFECT_HOME otherwise spends ~7 s of
    CPU on the migrations, and the suite starts about ten of them on two cores."""
    from importlib.metadata import version

    key = f"{version('prefect')}-{hashlib.sha256(sys.executable.encode()).hexdigest()[:10]}"
    cache = Path(tempfile.gettempdir()) / f"farense-tests-prefect-db-{key}"
    db = cache / "prefect.db"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.is_file():
            home = Path(tempfile.mkdtemp(dir=cache))
            env = quiet_env(home)
            out = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                 env=env, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"prefect server database upgrade failed:\n{out.stdout}{out.stderr}")
            os.replace(home / "prefect.db", db)
            shutil.rmtree(home, ignore_errors=True)
    return db


def seeded_prefect_home(prefect_home: Path) -> Path:
    """`prefect_home`, holding a copy of the migrated database unless it has one: what a second run on a
    user's machine finds. Prefect still checks the schema at start-up; it finds nothing to do."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    if not (prefect_home / "prefect.db").exists():
        shutil.copyfile(_migrated_database(), prefect_home / "prefect.db")
    return prefect_home


def quiet_env(prefect_home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment every process of a test gets: its own PREFECT_HOME and no telemetry."""
    env = dict(os.environ)
    for key in list(env):  # a developer's own server or profile must not leak into a test
        if key.startswith("PREFECT_"):
            del env[key]
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        FARENSE_PYTHON=sys.executable,  # the scripts run the interpreter the tests run in
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll until `predicate()` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A process this harness started: its PID and where its output goes."""

    name: str
    pid: int
    log: Path
    popen: subprocess.Popen | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        stop_pid(self.pid, timeout)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process we started and its descendants, then SIGKILL whatever is left."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _spawn(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, popen.pid, log, popen)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Server(Proc):
    url: str = ""

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def start_server(prefect_home: Path, logs: Path, port: int | None = None, timeout: float = 90.0,
                 **extra_env: str) -> Server:
    """deployments/start-server.sh on 127.0.0.1:port, waited for until /api/health answers."""
    port = port or free_port()
    env = quiet_env(seeded_prefect_home(prefect_home), FARENSE_PREFECT_PORT=str(port), FARENSE_PREFECT_HOST="127.0.0.1", **extra_env)
    proc = _spawn("server", ["bash", str(DEPLOYMENTS / "start-server.sh")], env, logs / "server.log")
    server = Server(proc.name, proc.pid, proc.log, proc.popen, url=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: _http_ok(f"{server.api_url}/health") or _died(server), timeout, "the Prefect server")
        if not server.alive():
            raise RuntimeError(f"the Prefect server exited:\n{server.tail()}")
    except BaseException:
        server.stop()
        raise
    return server


def _died(p: Proc) -> bool:
    return not p.alive()


def start_worker(env: dict[str, str], logs: Path, name: str = "worker") -> Proc:
    """deployments/start-worker.sh: setup (pool, queues, automations) then a process worker."""
    return _spawn(name, ["bash", str(DEPLOYMENTS / "start-worker.sh")], env, logs / f"{name}.log")


class PrefectAPI:
    """The few REST calls the tests make, over plain HTTP (no Prefect settings in the test process)."""

    def __init__(self, api_url: str):
        self.api_url = api_url.rstrip("/")

    def _call(self, method: str, path: str, body: Any = None, attempts: int = 3) -> Any:
        """One API call; a timeout or dropped connection (a busy 2-core machine) is tried again."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(attempts):
            req = urllib.request.Request(f"{self.api_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    raw = r.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError:
                raise
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == attempts - 1:
                    raise
                time.sleep(1 + attempt)

    def deployment(self, flow_name: str, deployment_name: str) -> dict[str, Any]:
        return self._call("GET", f"/deployments/name/{flow_name}/{deployment_name}")

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/flow_runs/{flow_run_id}")

    def flow_runs_of(self, deployment_id: str) -> list[dict[str, Any]]:
        """Runs of a deployment, oldest first."""
        body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 50}
        return self._call("POST", "/flow_runs/filter", body)

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self._call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 100})

    def logs(self, flow_run_id: str) -> list[str]:
        out: list[str] = []
        while True:
            body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200,
                    "offset": len(out)}
            page = [entry["message"] for entry in self._call("POST", "/logs/filter", body)]
            out += page
            if len(page) < 200:
                return out

    def states(self, flow_run_id: str) -> list[dict[str, Any]]:
        """Every state the run went through (name, type, timestamp)."""
        return self._call("GET", f"/flow_run_states/?flow_run_id={flow_run_id}")

    def state_type(self, flow_run_id: str) -> str | None:
        state = self.flow_run(flow_run_id).get("state") or {}
        return state.get("type")


# --------------------------------------------------------------------------- webhook listener


@dataclass
class Listener(Proc):
    url: str = ""
    out: Path = Path()

    def received(self) -> list[dict[str, Any]]:
        """Every request body received so far (JSON when it parses, else {"raw": text})."""
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]


def start_webhook_listener(directory: Path, timeout: float = 20.0) -> Listener:
    """A tiny HTTP listener on 127.0.0.1 that appends each request it receives to hooks.jsonl."""
    directory.mkdir(parents=True, exist_ok=True)
    out, port_file = directory / "hooks.jsonl", directory / "webhook.port"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [sys.executable, str(Path(__file__).resolve()), "webhook", "--out", str(out), "--port-file", str(port_file)]
    proc = _spawn("webhook", argv, env, directory / "webhook.log")
    port = wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout, "the webhook listener")
    return Listener(proc.name, proc.pid, proc.log, proc.popen, url=f"http://127.0.0.1:{port}/hook", out=out)


def _serve_webhook(out: Path, port: int, port_file: Path) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {"raw": body}
            record = {"received_at": time.time(), "path": self.path, "body": payload}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        do_PUT = do_POST

        def log_message(self, fmt: str, *args: Any) -> None:
            sys.stderr.write("webhook: " + fmt % args + "\n")

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(httpd.server_address[1]))
    tmp.rename(port_file)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("webhook", help="Run the webhook listener.")
    w.add_argument("--port", type=int, default=0)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args(argv)
    _serve_webhook(args.out, args.port, args.port_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
