"""farense.run.objectstore against a real S3 server (SeaweedFS `weed mini` on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3_server import store_for

from farense.errors import ConfigError
from farense.run.objectstore import (
    ObjectStore,
    PreconditionFailed,
    RemoteAccessDenied,
    RemoteLocation,
    RemoteUnavailable,
    StoreSettings,
)

pytest_plugins = ["conftest_s3"]


# ---------------------------------------------------------------------- location and settings (no server)


def test_parse_location() -> None:
    loc = RemoteLocation.parse("s3://my-bucket/runs/exp1/")
    assert (loc.bucket, loc.prefix) == ("my-bucket", "runs/exp1")
    assert loc.key("checkpoints", "step-00000200/MANIFEST.json") == "runs/exp1/checkpoints/step-00000200/MANIFEST.json"
    assert str(loc) == "s3://my-bucket/runs/exp1"
    assert RemoteLocation.parse("s3://bucket").key("a") == "a"


@pytest.mark.parametrize("url", ["bucket/prefix", "s3://", "s3://UPPER/x", "s3://b/../x", "s3://ok-bucket/a//b x",
                                 "gs://bucket/p", "s3://ab"])
def test_parse_location_refuses_with_one_clear_message(url: str) -> None:
    with pytest.raises(ConfigError, match=r"expected s3://BUCKET or s3://BUCKET/PREFIX") as err:
        RemoteLocation.parse(url)
    assert err.value.exit_code == 2


def test_key_refuses_dot_dot() -> None:
    with pytest.raises(ValueError):
        RemoteLocation("b", "p").key("..", "x")


def test_settings_from_env_prefer_the_specific_names_and_hide_secrets() -> None:
    s = StoreSettings.from_env({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://s3:2/",
                                "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-south-1",
                                "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "TOPSECRET",
                                "AWS_SESSION_TOKEN": "TOKENSECRET"})
    assert (s.endpoint, s.region, s.access_key_id) == ("http://s3:2", "eu-south-1", "AKID")
    assert "TOPSECRET" not in repr(s) and "TOKENSECRET" not in repr(s)
    store = ObjectStore(RemoteLocation("bucket"), s)
    assert "TOPSECRET" not in repr(store)
    with pytest.raises(ConfigError, match="AWS_ENDPOINT_URL"):
        StoreSettings.from_env({"AWS_ENDPOINT_URL": "s3.example:9000"})


# ---------------------------------------------------------------------- against the server


def test_put_get_head_list_delete(s3_store: ObjectStore) -> None:
    k = s3_store.key("a", "one.txt")
    etag = s3_store.put(k, b"hello")
    assert s3_store.get(k) == (b"hello", etag)
    info = s3_store.head(k)
    assert info is not None and (info.size, info.etag) == (5, etag) and info.last_modified > 0
    s3_store.put(s3_store.key("a", "two.txt"), b"xy")
    s3_store.put(s3_store.key("ab", "other.txt"), b"z")
    listed = s3_store.list(s3_store.key("a"))
    assert [i.key for i in listed] == [s3_store.key("a", "one.txt"), s3_store.key("a", "two.txt")]
    assert [i.size for i in listed] == [5, 2]
    s3_store.delete(k)
    s3_store.delete(k)  # deleting what is not there is fine
    assert s3_store.get(k) is None and s3_store.head(k) is None


def test_put_if_absent_has_exactly_one_winner_among_32(s3_server, s3_store: ObjectStore) -> None:
    key = s3_store.key("race", "marker")
    stores = [store_for(s3_server, s3_store.location.prefix) for _ in range(32)]
    start = threading.Barrier(32)

    def attempt(i: int) -> int | None:
        start.wait()
        try:
            stores[i].put_if_absent(key, f"writer {i}".encode())
            return i
        except PreconditionFailed:
            return None

    with ThreadPoolExecutor(32) as pool:
        winners = [i for i in pool.map(attempt, range(32)) if i is not None]
    assert len(winners) == 1
    assert s3_store.get(key)[0] == f"writer {winners[0]}".encode()  # type: ignore[index]


def test_put_if_match_refuses_a_stale_etag(s3_store: ObjectStore) -> None:
    key = s3_store.key("pointer")
    first = s3_store.put_if_absent(key, b"v1")
    second = s3_store.put_if_match(key, b"v2", first)
    with pytest.raises(PreconditionFailed) as err:
        s3_store.put_if_match(key, b"v3", first)
    assert err.value.key == key
    assert s3_store.get(key) == (b"v2", second)
    with pytest.raises(PreconditionFailed):
        s3_store.put_if_match(s3_store.key("never-written"), b"x", first)


def test_files_round_trip_single_and_multipart(s3_store: ObjectStore, tmp_path: Path) -> None:
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(1000))
    big.write_bytes(os.urandom(11 << 20))
    store = ObjectStore(s3_store.location, s3_store.settings, multipart_threshold=6 << 20, part_size=5 << 20)
    for path in (small, big):
        etag = store.upload_file(store.key(path.name), path)
        got = store.download_file(store.key(path.name), tmp_path / f"{path.name}.back")
        assert got.size == path.stat().st_size
        assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (tmp_path / f"{path.name}.back").read_bytes() == path.read_bytes()
        assert got.etag == etag
    assert store.head(store.key("big.bin")).etag.rstrip('"').endswith("-3")  # type: ignore[union-attr]  # 3 parts
    with pytest.raises(FileExistsError):  # never replaces a local file
        store.download_file(store.key("small.bin"), tmp_path / "small.bin.back")


def test_multipart_listing_and_abort(s3_store: ObjectStore) -> None:
    client = s3_store._client()
    key = s3_store.key("mp", "abandoned")
    up = client.create_multipart_upload(Bucket=s3_store.location.bucket, Key=key)
    client.upload_part(Bucket=s3_store.location.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 10)
    listed = s3_store.list_multipart_uploads(s3_store.key("mp"))
    assert [(u.key, u.upload_id) for u in listed] == [(key, up["UploadId"])]
    assert s3_store.abort_stale_multipart(3600, s3_store.key("mp")) == []  # too young
    started = listed[0].initiated
    aborted = s3_store.abort_stale_multipart(3600, s3_store.key("mp"), now=lambda: started + 7200)
    assert [u.key for u in aborted] == [key]
    assert s3_store.list_multipart_uploads(s3_store.key("mp")) == []


def test_ensure_bucket_is_idempotent(s3_server) -> None:
    store = store_for(s3_server, "")
    other = ObjectStore(RemoteLocation("farense-other-bucket"), store.settings)
    assert other.ensure_bucket() is True
    assert other.ensure_bucket() is False
    other.put("x", b"1")


def test_bad_credentials_are_access_denied_and_secret_never_shown(s3_server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    settings = StoreSettings(endpoint=s3_server.endpoint, access_key_id="nobody", secret_access_key="WRONGSECRET")
    store = ObjectStore(RemoteLocation(s3_server.bucket, "x"), settings)
    with pytest.raises(RemoteAccessDenied) as err:
        store.put(store.key("k"), b"1")
    assert err.value.exit_code == 2
    assert "WRONGSECRET" not in str(err.value) and "WRONGSECRET" not in caplog.text


def test_unreachable_store_is_retryable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    store = ObjectStore(RemoteLocation("b", "p"), StoreSettings(endpoint=f"http://127.0.0.1:{port}",
                                                                access_key_id="a", secret_access_key="b"),
                        client_retries=0)
    with pytest.raises(RemoteUnavailable) as err:
        store.get(store.key("x"))
    assert err.value.retryable and err.value.exit_code == 75
