"""The S3-compatible object store a run is mirrored to: one small client over obstore (data) and boto3
(only what obstore cannot do: buckets, listing and aborting multipart uploads).

Every failure reaches callers as one of four named errors: `PreconditionFailed` (a conditional put
lost: the basis of commit markers, leases and release pointers), `RemoteAccessDenied` (credentials),
`RemoteUnavailable` (network, timeouts, 5xx: a retry can help) and their base `RemoteStoreError`.
Secrets come from the standard AWS variables and are never logged or shown in a repr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
import obstore.exceptions as obx
from obstore.store import S3Store

from farense.codes import ExitCode
from farense.config import REMOTE_EXPECTED, is_key_segment, split_remote
from farense.errors import ConfigError, FarenseError

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 << 20  # below it one PUT: on loopback a 30 MB single put beats 8 MB parts 2:1
PART_SIZE = 16 << 20


class RemoteStoreError(FarenseError):
    """The object store refused or failed an operation (the message names the operation and the key)."""


class RemoteUnavailable(RemoteStoreError):
    """The store could not be reached or failed on its side (network, timeout, 5xx): a retry can help."""

    exit_code = ExitCode.PREEMPTED  # EX_TEMPFAIL: running again later resumes


class RemoteAccessDenied(RemoteStoreError):
    """The store refused the credentials (401/403): fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""

    exit_code = ExitCode.BAD_INPUT


class PreconditionFailed(RemoteStoreError):
    """A conditional put lost (412): the object exists (If-None-Match) or changed (If-Match)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RemoteLocation:
    """Where a run's files live remotely: `s3://bucket/prefix` (the prefix may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> RemoteLocation:
        """Parse `[storage] remote` (farense.config owns the rule); one ConfigError naming what is expected."""
        try:
            bucket, prefix = split_remote(url)
        except ValueError as exc:
            detail = "" if str(exc) == "not an s3:// URL" else f" ({exc})"
            raise ConfigError(f"[storage] remote: expected {REMOTE_EXPECTED}, got {url!r}{detail}") from None
        return cls(bucket, prefix)

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix (each part may hold '/'; no empty, '.' or '..' names)."""
        segments = [s for p in parts for s in p.split("/")]
        if not segments or not all(is_key_segment(s) for s in segments):
            raise ValueError(f"object key parts: expected names of letters, digits and !_.*'()=+,@-, got {parts!r}")
        return "/".join([self.prefix, *segments] if self.prefix else segments)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class StoreSettings:
    """Endpoint, region and credentials, from the standard AWS variables; secrets never in the repr."""

    endpoint: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        """AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL, AWS_REGION over AWS_DEFAULT_REGION, and the key pair."""
        env = os.environ if env is None else env
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"AWS_ENDPOINT_URL: expected http://HOST:PORT or https://HOST, got {endpoint!r}")
        return cls(endpoint=endpoint.rstrip("/") if endpoint else None,
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                   secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                   session_token=env.get("AWS_SESSION_TOKEN") or None)


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing or HEAD describes it."""

    key: str
    size: int
    etag: str | None
    last_modified: float  # Unix seconds, the server's clock


@dataclass(frozen=True)
class Downloaded:
    """A file streamed to disk: its size and SHA-256, computed on the way (no second read)."""

    size: int
    sha256: str
    etag: str | None


@dataclass(frozen=True)
class MultipartUpload:
    """A multipart upload started and neither completed nor aborted (its parts cost storage)."""

    key: str
    upload_id: str
    initiated: float  # Unix seconds


class ObjectStore:
    """Puts, conditional puts, gets, lists and deletes in one bucket; errors translated to named ones."""

    def __init__(self, location: RemoteLocation, settings: StoreSettings | None = None, *,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 request_timeout_s: float = 120.0, client_retries: int = 2) -> None:
        self.location = location
        self.settings = settings if settings is not None else StoreSettings.from_env()
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._request_timeout_s = request_timeout_s
        self._boto: Any = None
        # obstore retries little and briefly: callers (the mirror) own the long retries with backoff.
        self._store = S3Store(
            location.bucket, **self._credentials(),
            client_options={"allow_http": bool(self.settings.endpoint and self.settings.endpoint.startswith("http://")),
                            "connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=request_timeout_s)},
            retry_config={"max_retries": client_retries, "retry_timeout": timedelta(seconds=20),
                          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                                      "base": 2}})
        log.debug("object store %s at %s (region %s)", location, self.settings.endpoint or "AWS", self.settings.region)

    @classmethod
    def at(cls, url: str, **options: Any) -> ObjectStore | None:
        """The store an `s3://BUCKET/PREFIX` names (endpoint and credentials from the AWS_* variables), None for "":
        the one way the trainer, the commands, the tasks and the flows open a remote."""
        return cls(RemoteLocation.parse(url), StoreSettings.from_env(), **options) if url else None

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.location)!r}, endpoint={self.settings.endpoint!r})"

    def _credentials(self) -> dict[str, str]:
        s = self.settings
        given = {"endpoint": s.endpoint, "region": s.region, "access_key_id": s.access_key_id,
                 "secret_access_key": s.secret_access_key, "session_token": s.session_token}
        return {k: v for k, v in given.items() if v}

    def key(self, *parts: str) -> str:
        """The key of `parts` under this store's prefix (RemoteLocation.key)."""
        return self.location.key(*parts)

    # ------------------------------------------------------------------ writing

    def put(self, key: str, data: bytes | Path) -> str:
        """Write (or overwrite) an object; its new ETag. A Path is uploaded as a file (multipart when large)."""
        if isinstance(data, Path):
            return self.upload_file(key, data)
        return self._put(key, data, "overwrite")

    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create an object only if none exists (If-None-Match: *); PreconditionFailed when one does."""
        return self._put(key, data, "create")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace an object only if its ETag is still `etag` (If-Match); PreconditionFailed otherwise."""
        return self._put(key, data, {"e_tag": etag})

    def _put(self, key: str, data: bytes, mode: Any) -> str:
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise _translate(exc, "put", key) from exc
        return _etag(result.get("e_tag"))

    def upload_file(self, key: str, path: Path) -> str:
        """Upload a local file; above `multipart_threshold` in parallel parts (obstore aborts them on failure)."""
        # Local errors (the file gone, EIO) propagate as OSError: they are not the store's.
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size < self.multipart_threshold else None
            try:
                if data is not None:
                    result = obstore.put(self._store, key, data, use_multipart=False)
                else:
                    result = obstore.put(self._store, key, f, use_multipart=True, chunk_size=self.part_size,
                                         max_concurrency=8)
            except Exception as exc:
                raise _translate(exc, "upload", key) from exc
        return _etag(result.get("e_tag"))

    def delete(self, key: str) -> None:
        """Delete an object; deleting one that is not there is not an error (S3's rule)."""
        try:
            obstore.delete(self._store, key)
        except (obx.NotFoundError, FileNotFoundError):
            return
        except Exception as exc:
            raise _translate(exc, "delete", key) from exc

    # ------------------------------------------------------------------ reading

    def get(self, key: str) -> tuple[bytes, str] | None:
        """(content, ETag) of an object, None when there is none; for small objects (manifests, pointers)."""
        try:
            result = obstore.get(self._store, key)
            return bytes(result.bytes()), _etag(result.meta.get("e_tag"))
        except (obx.NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise _translate(exc, "get", key) from exc

    def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag and time of an object, None when there is none."""
        try:
            return _info(obstore.head(self._store, key))
        except (obx.NotFoundError, FileNotFoundError):
            return None
        except Exception as exc:
            raise _translate(exc, "head", key) from exc

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under the "directory" `prefix` (whole '/'-separated names, not a string prefix), by key."""
        try:
            return sorted((_info(m) for batch in obstore.list(self._store, prefix=prefix) for m in batch),
                          key=lambda i: i.key)
        except Exception as exc:
            raise _translate(exc, "list", prefix) from exc

    def download_file(self, key: str, path: Path, *, on_chunk: Callable[[int], None] | None = None) -> Downloaded:
        """Stream an object into a new file at `path` (created, never replaced), fsynced, hashed on the way."""
        digest, size = hashlib.sha256(), 0
        try:
            result = obstore.get(self._store, key)
            with open(path, "xb") as f:
                for chunk in result.stream(min_chunk_size=1 << 20):
                    view = memoryview(chunk)
                    f.write(view)
                    digest.update(view)
                    size += len(view)
                    if on_chunk is not None:
                        on_chunk(len(view))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno is None and exc.filename is None:  # obstore's (NotFoundError is a FileNotFoundError)
                raise _translate(exc, "download", key) from exc
            raise  # a local write error (ENOSPC ...): the disk guard's business, not the store's
        except Exception as exc:
            raise _translate(exc, "download", key) from exc
        return Downloaded(size, digest.hexdigest(), _etag(result.meta.get("e_tag")))

    # ------------------------------------------------------------------ boto3: what obstore cannot do

    def _client(self) -> Any:
        if self._boto is None:
            import boto3  # only for buckets and multipart housekeeping
            from botocore.config import Config

            s = self.settings
            self._boto = boto3.client(
                "s3", endpoint_url=s.endpoint, region_name=s.region, aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key, aws_session_token=s.session_token,
                config=Config(s3={"addressing_style": "path"} if s.endpoint else {}, connect_timeout=5,
                              read_timeout=self._request_timeout_s, retries={"max_attempts": 3, "mode": "standard"}))
        return self._boto

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; True when it was created now."""
        client = self._client()
        try:
            client.head_bucket(Bucket=self.location.bucket)
            return False
        except Exception as exc:
            if _boto_status(exc) not in (404, 400):
                raise _translate_boto(exc, "head bucket", self.location.bucket) from exc
        try:
            args: dict[str, Any] = {"Bucket": self.location.bucket}
            if self.settings.region != "us-east-1" and not self.settings.endpoint:
                args["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
            client.create_bucket(**args)
            return True
        except Exception as exc:
            if _boto_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise _translate_boto(exc, "create bucket", self.location.bucket) from exc

    def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        """Multipart uploads in progress (or abandoned) under `prefix`, oldest first."""
        client, out = self._client(), []
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
        try:
            while True:
                page = client.list_multipart_uploads(**args)
                out += [MultipartUpload(u["Key"], u["UploadId"], u["Initiated"].timestamp())
                        for u in page.get("Uploads") or []]
                if not page.get("IsTruncated"):
                    break
                args.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))
        except Exception as exc:
            raise _translate_boto(exc, "list multipart uploads", prefix) from exc
        return sorted(out, key=lambda u: u.initiated)

    def abort_stale_multipart(self, older_than_s: float, prefix: str = "", *,
                              now: Callable[[], float] = time.time) -> list[MultipartUpload]:
        """Abort multipart uploads started more than `older_than_s` ago (a crashed uploader's parts); those aborted."""
        stale = [u for u in self.list_multipart_uploads(prefix) if now() - u.initiated > older_than_s]
        for upload in stale:
            self.abort_multipart(upload)
            log.info("aborted a stale multipart upload of %s (started %.0f s ago)", upload.key, now() - upload.initiated)
        return stale

    def abort_multipart(self, upload: MultipartUpload) -> None:
        """Abort one multipart upload (its parts are freed); one finished or aborted meanwhile is not an error."""
        try:
            self._client().abort_multipart_upload(Bucket=self.location.bucket, Key=upload.key,
                                                  UploadId=upload.upload_id)
        except Exception as exc:
            if _boto_code(exc) != "NoSuchUpload":
                raise _translate_boto(exc, "abort multipart upload", upload.key) from exc


# ---------------------------------------------------------------------- helpers


def _etag(value: str | None) -> str:
    if not value:
        raise RemoteStoreError("the store returned no ETag: conditional puts (commit markers, leases) need one")
    return value


def _info(meta: Mapping[str, Any]) -> ObjectInfo:
    modified = meta.get("last_modified")
    return ObjectInfo(key=meta["path"], size=int(meta["size"]), etag=meta.get("e_tag"),
                      last_modified=modified.timestamp() if modified is not None else 0.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _translate(exc: Exception, op: str, key: str) -> RemoteStoreError:
    """The named error for an obstore failure (the first line of its message: the long debug dump is left out)."""
    what = f"{op} {key}: {_first_line(exc)}"
    if isinstance(exc, (obx.AlreadyExistsError, obx.PreconditionError)):
        return PreconditionFailed(f"precondition failed: {what}", key)
    if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError)):
        return RemoteAccessDenied(f"access denied: {what} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, (obx.NotFoundError, FileNotFoundError)):
        return RemoteStoreError(f"not found: {what}")
    return RemoteUnavailable(f"object store unavailable: {what}")


def _boto_status(exc: Exception) -> int | None:
    return getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _boto_code(exc: Exception) -> str | None:
    return getattr(exc, "response", {}).get("Error", {}).get("Code")


def _translate_boto(exc: Exception, op: str, what: str) -> RemoteStoreError:
    status = _boto_status(exc)
    text = f"{op} {what}: {_first_line(exc)}"
    if status in (401, 403):
        return RemoteAccessDenied(f"access denied: {text} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if status is not None and status < 500 and status != 429:
        return RemoteStoreError(text)
    return RemoteUnavailable(f"object store unavailable: {text}")

