"""farense.run.remote_releases against a real S3 server: immutable releases, one winner per pointer move."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from s3_server import store_for

from farense.errors import FarenseError
from farense.run.objectstore import ObjectStore
from farense.run.remote_releases import ReleaseConflict, RemoteReleases

pytest_plugins = ["conftest_s3"]


def adapters(tmp_path: Path, tag: str) -> dict[str, Path]:
    d = tmp_path / tag
    d.mkdir()
    (d / "adapters.safetensors").write_bytes(f"weights of {tag}".encode() * 100)
    (d / "adapter_config.json").write_text('{"rank": 8}')
    return {"adapters/adapters.safetensors": d / "adapters.safetensors",
            "adapters/adapter_config.json": d / "adapter_config.json"}


def test_write_promote_list_and_roll_back(s3_store: ObjectStore, tmp_path: Path) -> None:
    rel = RemoteReleases(s3_store, s3_store.key("production"), now=lambda: 1_800_000_000.0)
    r1 = rel.write_release("r1", adapters(tmp_path, "r1"), {"run_name": "exp1"})
    files = r1.files["adapters/adapters.safetensors"]
    assert files["sha256"] == hashlib.sha256((tmp_path / "r1" / "adapters.safetensors").read_bytes()).hexdigest()
    assert rel.current() is None
    first = rel.promote("r1", expected_current=None)
    assert (first.release_id, first.previous, first.action) == ("r1", None, "promote")
    r2 = rel.write_release("r2", adapters(tmp_path, "r2"))
    assert r2.previous == "r1"
    rel.promote("r2", expected_current="r1")
    assert [r.id for r in rel.list_releases()] == ["r1", "r2"]
    back = rel.rollback()
    assert (back.release_id, back.previous, back.action) == ("r1", "r2", "rollback")
    assert rel.current()[0].release_id == "r1"  # type: ignore[index]
    with pytest.raises(FarenseError, match="no release 'r9'.*r1, r2"):
        rel.rollback("r9")


def test_release_is_immutable_and_incomplete_ones_are_not_listed(s3_store: ObjectStore, tmp_path: Path) -> None:
    rel = RemoteReleases(s3_store, s3_store.key("production"))
    files = adapters(tmp_path, "r1")
    rel.write_release("r1", files)
    with pytest.raises(FarenseError, match="immutable"):
        rel.write_release("r1", adapters(tmp_path, "other"))
    assert s3_store.get(s3_store.key("production/releases/r1/adapters/adapters.safetensors"))[0] == \
        files["adapters/adapters.safetensors"].read_bytes()  # type: ignore[index]  # untouched
    s3_store.put(s3_store.key("production/releases/half/adapters/adapters.safetensors"), b"x")  # no manifest
    assert [r.id for r in rel.list_releases()] == ["r1"]
    with pytest.raises(FarenseError, match="no release 'half'"):
        rel.promote("half")


def test_upload_of_a_local_release_directory(s3_store: ObjectStore, tmp_path: Path) -> None:
    d = tmp_path / "releases" / "exp1-20270115-abcd1234"
    (d / "adapters").mkdir(parents=True)
    (d / "adapters" / "adapters.safetensors").write_bytes(b"w" * 1000)
    files = {"adapters/adapters.safetensors": {"size": 1000, "sha256": hashlib.sha256(b"w" * 1000).hexdigest()}}
    manifest = orjson.dumps({"format": "farense.release/1", "id": d.name, "created_at": "2027-01-15T08:00:00+00:00",
                             "previous": None, "files": files})
    (d / "release.json").write_bytes(manifest)
    rel = RemoteReleases(s3_store, s3_store.key("production"))
    assert rel.upload_release(d).id == d.name
    assert rel.upload_release(d).id == d.name  # again: already there, same content
    assert s3_store.get(s3_store.key(f"production/releases/{d.name}/release.json"))[0] == manifest  # type: ignore[index]


def test_racing_promotions_have_exactly_one_winner(s3_server, s3_store: ObjectStore, tmp_path: Path) -> None:
    prefix = s3_store.key("production")
    n = 8
    for i in range(n):
        RemoteReleases(s3_store, prefix).write_release(f"r{i}", adapters(tmp_path, f"r{i}"))
    machines = [RemoteReleases(store_for(s3_server, s3_store.location.prefix), prefix) for _ in range(n)]
    for _round in range(2):  # first with nothing in production, then against the first winner
        start = threading.Barrier(n)
        current = RemoteReleases(s3_store, prefix).current()
        seen = current[0].release_id if current else None

        def promote(i: int, start: threading.Barrier = start, seen: str | None = seen) -> str:
            start.wait()
            try:
                machines[i].promote(f"r{i}", expected_current=seen)
                return "won"
            except ReleaseConflict as err:
                return str(err)

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(promote, range(n)))
        winners = [i for i, r in enumerate(results) if r == "won"]
        assert len(winners) == 1, results
        assert all(f"points at r{winners[0]}" in r for r in results if r != "won")
        pointer = RemoteReleases(s3_store, prefix).current()[0]  # type: ignore[index]
        assert (pointer.release_id, pointer.previous) == (f"r{winners[0]}", seen)


def test_stale_expectation_is_a_conflict(s3_store: ObjectStore, tmp_path: Path) -> None:
    rel = RemoteReleases(s3_store, s3_store.key("production"))
    for rid in ("r1", "r2"):
        rel.write_release(rid, adapters(tmp_path, rid))
    rel.promote("r1", expected_current=None)
    with pytest.raises(ReleaseConflict, match="production/current is 'r1', not None"):
        rel.promote("r2", expected_current=None)


class _RacyStore:
    """The store as a self-hosted S3 can behave under load: a second writer's conditional put passes
    the same check as ours and lands just after it (both get 200)."""

    def __init__(self, store: ObjectStore, rival: bytes) -> None:
        self._store, self._rival = store, rival

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def put_if_absent(self, key: str, data: bytes) -> str:
        etag = self._store.put_if_absent(key, data)
        self._store.put(key, self._rival)  # the rival's write, accepted too
        return etag


def test_a_write_overwritten_by_a_racing_writer_is_a_conflict_not_a_second_winner(s3_store: ObjectStore,
                                                                                 tmp_path: Path) -> None:
    prefix = s3_store.key("production")
    for rid in ("r1", "r2"):
        RemoteReleases(s3_store, prefix).write_release(rid, adapters(tmp_path, rid))
    rival = orjson.dumps({"release_id": "r2", "previous": None, "updated_at": 1.0, "by_host": "rival",
                          "action": "promote"})
    racy = RemoteReleases(_RacyStore(s3_store, rival), prefix)  # type: ignore[arg-type]
    with pytest.raises(ReleaseConflict, match="points at r2 .*r1 was not promoted"):
        racy.promote("r1", expected_current=None)
    assert RemoteReleases(s3_store, prefix).current()[0].release_id == "r2"  # type: ignore[index]
