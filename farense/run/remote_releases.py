"""Releases on the object store, and the `production/current` pointer moved by compare-and-swap.

    <prefix>/releases/<id>/<files...>        the adapter files (and whatever the release holds), uploaded first
    <prefix>/releases/<id>/release.json      the release manifest, uploaded LAST with If-None-Match
    <prefix>/current                         {"release_id", "previous", "updated_at", "by_host", "action"}

Moving `current` is a conditional put: If-Match on the ETag read (If-None-Match when there is none),
so of two machines promoting at once exactly one wins; the other gets ReleaseConflict naming the winner.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from farense.run import fsutil
from farense.errors import FarenseError
from farense.run.objectstore import ObjectStore, PreconditionFailed
from farense.run.remote_layout import join_key

RELEASE_MANIFEST = "release.json"  # the name farense.promotion gives a local release's manifest
RELEASE_FORMAT = "farense.release/1"
CURRENT_NAME = "current"
_READ = object()  # expected_current not given: whatever is current when promote reads it


class ReleaseConflict(FarenseError):
    """Another promotion moved production/current first (or it is not what the caller decided against)."""


@dataclass(frozen=True)
class RemoteRelease:
    """One release on the store, as its manifest describes it."""

    id: str
    created_at: str
    previous: str | None
    files: dict[str, Any]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class CurrentPointer:
    """What production/current says: the release in production, the one before it, who moved it when."""

    release_id: str
    previous: str | None
    updated_at: float
    by_host: str
    action: str  # "promote" or "rollback"


class RemoteReleases:
    """The releases under `prefix` (a whole key prefix, e.g. `store.key("production")`)."""

    def __init__(self, store: ObjectStore, prefix: str, *, now: Callable[[], float] = time.time) -> None:
        self.store, self.prefix, self._now = store, prefix, now

    def _key(self, *parts: str) -> str:
        return join_key(self.prefix, *parts)

    # ------------------------------------------------------------------ releases

    def write_release(self, release_id: str, files: Mapping[str, Path], meta: Mapping[str, Any] | None = None
                      ) -> RemoteRelease:
        """Upload `files` ({name in the release: local path}) and then the release manifest (If-None-Match):
        releases are immutable, so an id already taken with other content is an error."""
        self.store.location.key(release_id)  # one plain name: no '/', no '..'
        current = self.current()
        manifest = {"format": RELEASE_FORMAT, "id": release_id,
                    "created_at": datetime.fromtimestamp(self._now(), timezone.utc).isoformat(),
                    "previous": current[0].release_id if current else None, **dict(meta or {}),
                    "files": {name: {"size": Path(p).stat().st_size, "sha256": fsutil.sha256_file(p)}
                              for name, p in sorted(files.items())}}
        return self._upload(release_id, dict(files), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))

    def upload_release(self, release_dir: Path) -> RemoteRelease:
        """Mirror a local release directory built by farense.promotion (its release.json uploaded last, as is)."""
        manifest_bytes = (Path(release_dir) / RELEASE_MANIFEST).read_bytes()
        manifest = orjson.loads(manifest_bytes)
        return self._upload(manifest["id"], {name: Path(release_dir) / name for name in manifest["files"]},
                            manifest_bytes)

    def _upload(self, release_id: str, files: dict[str, Path], manifest_bytes: bytes) -> RemoteRelease:
        key = self._key("releases", release_id, RELEASE_MANIFEST)
        existing = self.store.get(key)
        if existing is None:
            for name, path in sorted(files.items()):
                self.store.upload_file(self._key("releases", release_id, name), path)
            try:
                self.store.put_if_absent(key, manifest_bytes)
            except PreconditionFailed:
                existing = self.store.get(key)
        if existing is not None and existing[0] != manifest_bytes:
            raise FarenseError(f"release {release_id} already exists on the store with other content ({key}); "
                               "releases are immutable: give this one another id")
        return _release(orjson.loads(manifest_bytes))

    def get_release(self, release_id: str) -> RemoteRelease | None:
        found = self.store.get(self._key("releases", release_id, RELEASE_MANIFEST))
        return _release(orjson.loads(found[0])) if found is not None else None

    def list_releases(self) -> list[RemoteRelease]:
        """Every complete release (its manifest is there), oldest first."""
        root = self._key("releases")
        ids = sorted({i.key[len(root) + 1:].split("/")[0] for i in self.store.list(root)
                      if i.key.endswith("/" + RELEASE_MANIFEST)})
        found = [r for rid in ids if (r := self.get_release(rid)) is not None]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    # ------------------------------------------------------------------ the pointer

    def current(self) -> tuple[CurrentPointer, str] | None:
        """(pointer, its ETag), None when nothing was ever promoted."""
        found = self.store.get(self._key(CURRENT_NAME))
        if found is None:
            return None
        raw = orjson.loads(found[0])
        return CurrentPointer(raw["release_id"], raw.get("previous"), float(raw["updated_at"]),
                              str(raw.get("by_host", "")), str(raw.get("action", "promote"))), found[1]

    def promote(self, release_id: str, *, expected_current: str | None | object = _READ,
                action: str = "promote") -> CurrentPointer:
        """Point production/current at `release_id` by compare-and-swap.

        `expected_current`: the release the caller decided against (None: nothing in production); when
        current is another one, or another promotion moves it between our read and write, ReleaseConflict.
        """
        if self.get_release(release_id) is None:
            raise FarenseError(f"no release {release_id!r} on the store under {self._key('releases')}; "
                               f"releases there: {', '.join(r.id for r in self.list_releases()) or 'none'}")
        found = self.current()
        seen = found[0].release_id if found else None
        if expected_current is not _READ and expected_current != seen:
            raise ReleaseConflict(f"production/current is {seen!r}, not {expected_current!r}: "
                                  f"{_moved_by(found[0]) if found else 'nothing is promoted'}; decide again")
        t = self._now()
        pointer = CurrentPointer(release_id, seen, t, socket.gethostname(), action)
        data = orjson.dumps({**pointer.__dict__, "updated_at_utc": datetime.fromtimestamp(t, timezone.utc).isoformat()},
                            option=orjson.OPT_INDENT_2)
        try:
            if found is None:
                written = self.store.put_if_absent(self._key(CURRENT_NAME), data)
            else:
                written = self.store.put_if_match(self._key(CURRENT_NAME), data, found[1])
            # Read back: a store whose conditional writes are not atomic under load (a self-hosted S3
            # can let two racing writers both pass) shows here which write stayed; only that one won.
            after = self.current()
            if written and (after is None or after[1] != written):
                raise PreconditionFailed(f"production/current was overwritten after {release_id}'s write",
                                         self._key(CURRENT_NAME))
        except PreconditionFailed:
            winner = self.current()
            raise ReleaseConflict(f"another promotion moved production/current first: "
                                  f"{_moved_by(winner[0]) if winner else 'then removed it'}; "
                                  f"{release_id} was not promoted") from None
        return pointer

    def rollback(self, to_id: str | None = None, *, expected_current: str | None | object = _READ) -> CurrentPointer:
        """Point current back at `to_id` (default: the release before the current one), by the same compare-and-swap."""
        if to_id is None:
            found = self.current()
            if found is None or found[0].previous is None:
                raise FarenseError("nothing to roll back to: production/current has no previous release")
            to_id = found[0].previous
            if expected_current is _READ:
                expected_current = found[0].release_id  # rolled back from what we read, or a conflict
        return self.promote(to_id, expected_current=expected_current, action="rollback")


def _release(m: dict[str, Any]) -> RemoteRelease:
    return RemoteRelease(m["id"], str(m.get("created_at", "")), m.get("previous"), dict(m.get("files", {})), m)


def _moved_by(p: CurrentPointer) -> str:
    when = datetime.fromtimestamp(p.updated_at, timezone.utc).isoformat(timespec="seconds")
    return f"it points at {p.release_id} ({p.action} by {p.by_host} at {when})"
