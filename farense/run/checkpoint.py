"""The checkpoint store: the only code that writes, verifies, lists, retains and deletes checkpoints.

A checkpoint exists whole or not at all (DESIGN.md, invariant 1):

    checkpoints/step-00000400.tmp-<hex>/   writers fill it; every file is fsynced
        adapters.safetensors ...
        MANIFEST.json                      written LAST: format, step, meta, size + SHA-256 per file
    checkpoints/step-00000400/             os.rename of the whole directory, then the parent fsynced

Readers trust only a checkpoint whose manifest verifies; names with `.tmp-` are never read.
Only one process writes (rank 0, holding the run lock), and pruning runs only after the newer
checkpoint has committed: callers call `prune` after `save` has returned.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from farense.config import CheckpointConfig
from farense.errors import CheckpointCorrupt, DiskFull, FarenseError
from farense.overfitting import improves_best
from farense.run import fsutil
from farense.run.layout import (
    MANIFEST_NAME,
    QUARANTINE_DIR,
    QUARANTINE_REASON_SUFFIX,
    checkpoint_name,
    is_temporary,
    parse_checkpoint_name,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "farense-checkpoint"
MANIFEST_VERSION = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Writer = Callable[[Path], None]
SkipHandler = Callable[[Path, str], None]
Check = Callable[["CheckpointInfo"], "str | None"]  # why a verified checkpoint still cannot be loaded, or None


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as its manifest describes it (not proof that it verifies)."""

    step: int
    path: Path
    meta: dict[str, Any] = field(hash=False)
    size_bytes: int  # sum of the file sizes in the manifest
    created_at: float  # Unix seconds, from the manifest
    files: tuple[str, ...] = ()

    def file(self, name: str) -> Path:
        """Path of one of the checkpoint's files, refusing names the manifest does not list."""
        if name not in self.files:
            raise KeyError(f"checkpoint {self.path} has no file {name!r} (it has: {', '.join(self.files)})")
        return self.path / name


class Verify(str, Enum):
    """How hard to check a checkpoint: sizes only (planning over thousands, no hashing) or every SHA-256 (before loading)."""

    SIZES = "sizes"
    SHA256 = "sha256"


@dataclass(frozen=True)
class ScannedCheckpoint:
    """A committed-looking checkpoint directory as planning sees it: its manifest's description, if usable."""

    step: int
    path: Path
    info: CheckpointInfo | None  # None: no usable manifest, so never loadable
    disk_bytes: int  # what deleting it frees: the blocks allocated to its directory and files


@dataclass(frozen=True)
class SavePolicy:
    """When a checkpoint is written, and which one is the best (the loop asks; the store keeps the answer)."""

    every_steps: int

    def due(self, step: int, total_steps: int, *, stopping: bool) -> bool:
        """Every `every_steps` optimizer steps, at the last step, and whenever the run stops (early stop, signal)."""
        return stopping or step == total_steps or step % self.every_steps == 0

    @staticmethod
    def is_best(val_loss: float | None, best_so_far: float | None) -> bool:
        """A checkpoint is the best when its validation loss is lower than every earlier checkpoint's."""
        return improves_best(val_loss, best_so_far)


@dataclass(frozen=True)
class RetentionPolicy:
    """How many checkpoints to keep; the latest (and the best, with keep_best) are always kept."""

    keep_last: int = 3
    keep_best: bool = True

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1:
            problems.append(
                f"keep_last: expected an integer >= 1 (the latest checkpoint is always kept), got {self.keep_last!r}"
            )
        if not isinstance(self.keep_best, bool):
            problems.append(f"keep_best: expected true or false, got {self.keep_best!r}")
        if problems:
            raise ValueError("RetentionPolicy is not valid: " + "; ".join(problems))

    @classmethod
    def from_config(cls, checkpoint: CheckpointConfig) -> RetentionPolicy:
        """The policy a config's [checkpoint] section sets: the trainer, the disk guard, cleanup and the
        estimate all build it here."""
        return cls(checkpoint.keep_last, checkpoint.keep_best)

    @property
    def most_on_disk(self) -> int:
        """Checkpoints on disk at the worst moment: the last keep_last, the best, and one being written."""
        return self.keep_last + (1 if self.keep_best else 0) + 1


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed, structurally checked manifest of a checkpoint directory (or of MANIFEST.json).

    Raises CheckpointCorrupt (with `.reason`) when it is missing, unreadable or malformed.
    Checks structure only: use CheckpointStore.verify to check the files against it.
    """
    path = Path(path)
    directory = path.parent if path.name == MANIFEST_NAME else path
    manifest, reason = _load_manifest(directory)
    if manifest is None:
        err = CheckpointCorrupt(f"checkpoint {directory}: {reason}")
        err.reason = reason  # type: ignore[attr-defined]
        raise err
    return manifest


class CheckpointStore:
    """Owns one run's checkpoints directory (Orbax's CheckpointManager, reduced to what we need).

    `rank`: only rank 0 writes or deletes; other ranks' save/prune/remove calls do nothing.
    `on_skip(path, reason)`: told about every checkpoint latest_verified passes over.
    `required_files`: names every checkpoint must list in its manifest to verify (e.g. the
    optimizer state), so a checkpoint from a narrower writer is not mistaken for a full one.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rank: int = 0,
        on_skip: SkipHandler | None = None,
        required_files: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.on_skip: SkipHandler = on_skip or _warn_skip
        self.required_files = tuple(required_files)
        self._clock = clock
        self._lock = threading.Lock()  # prune/remove/remove_temporaries against each other
        self._in_progress: set[Path] = set()  # our own tmp dirs: remove_temporaries leaves them

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r}, rank={self.rank})"

    # ------------------------------------------------------------------ writing

    def save(self, step: int, writers: Mapping[str, Writer], meta: Mapping[str, Any]) -> CheckpointInfo | None:
        """Write a checkpoint whole or not at all; returns it, or None on a rank other than 0.

        Each writer receives the destination path of its file inside the temporary directory and
        must create exactly that file (mx.save_safetensors appends `.safetensors` to names that lack
        it, so give such files that suffix). If the step is already committed and verifies, that
        checkpoint is returned unchanged; if it exists and does not verify, CheckpointCorrupt.
        ENOSPC/EDQUOT/EIO: the temporary directory is deleted and DiskFull raised (resumable).
        """
        if self.rank != 0:
            return None
        _check_step(step)
        names = _check_writer_names(writers)
        try:
            meta_dict = orjson.loads(orjson.dumps(dict(meta)))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise TypeError(f"checkpoint meta for step {step} must be JSON-serializable: {exc}") from exc

        final = self.directory / checkpoint_name(step)
        existing = self._already_saved(final, step)
        if existing is not None:
            return existing

        tmp = fsutil.tmp_sibling(final)
        self._in_progress.add(tmp)
        in_writer = False
        written: dict[str, Any] = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.mkdir(tmp)
            for name in names:
                target = tmp / name
                in_writer = True
                writers[name](target)
                in_writer = False
                _check_written(target, name)
            # Each file is hashed and fsynced through one descriptor while the manifest is written.
            fsutil.commit_dir(tmp, final, synced=True,
                              manifest=lambda d: written.update(self._write_manifest(d, step, meta_dict, names)),
                              before_rename=lambda: self._refuse_overwrite(final, step))
        except _AlreadySaved as done:
            _rmtree_quiet(tmp)
            return done.info
        except BaseException as exc:
            # Classify before the rmtree frees the space that the no-errno check measures. A
            # failed parent fsync after the rename leaves the checkpoint (it verifies or it is
            # skipped), but the run must stop all the same.
            disk_full = self._disk_full_error(exc, step, from_writer=in_writer)
            _rmtree_quiet(tmp)
            if disk_full is not None:
                raise disk_full from exc
            raise
        finally:
            self._in_progress.discard(tmp)
        return _info_from_manifest(final, written)

    def _refuse_overwrite(self, final: Path, step: int) -> None:
        existing = self._already_saved(final, step)  # another writer is a bug, but never clobber
        if existing is not None:
            raise _AlreadySaved(existing)

    def _already_saved(self, final: Path, step: int) -> CheckpointInfo | None:
        if not os.path.lexists(final):
            return None
        ok, reason = self.verify_path(final)
        if ok:
            log.info("checkpoint %s already committed and verifies; not writing it again", final)
            return _info_from_manifest(final, read_manifest(final))
        raise CheckpointCorrupt(
            f"cannot save step {step}: {final} already exists and does not verify ({reason}). "
            f"It is never loaded; remove it (CheckpointStore.remove({step}) or rm -r) and resume."
        )

    def _write_manifest(self, tmp: Path, step: int, meta: dict[str, Any], names: builtins.list[str]) -> dict[str, Any]:
        """MANIFEST.json, written last into `tmp` and fsynced once, with each file's size and SHA-256."""
        files: dict[str, dict[str, Any]] = {}
        with os.scandir(tmp) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) or not entry.is_file(follow_symlinks=False):
                raise ValueError(
                    f"checkpoint step {step}: writers must create plain files, found {entry.name!r} in {tmp}"
                )
            if entry.name not in names:
                _check_file_name(entry.name, f"file {entry.name!r} created by a writer")
            files[entry.name] = _hash_and_sync(Path(entry.path))
        created = self._clock()
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "step": step,
            "created_at": created,
            "created_at_utc": datetime.fromtimestamp(created, timezone.utc).isoformat(),
            "meta": meta,
            "files": files,
        }
        data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        fd = os.open(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fsutil.fsync_fd(fd)  # once; a failure propagates (never retried)
        finally:
            os.close(fd)
        return manifest

    def _disk_full_error(self, exc: BaseException, step: int, *, from_writer: bool) -> DiskFull | None:
        """The DiskFull to raise for a failed save, or None if `exc` is something else.

        Writers that wrap I/O in their own exception (mx.save_safetensors: RuntimeError "[write]
        Unable to write N bytes to file.") carry no errno: then the filesystem is asked.
        """
        if isinstance(exc, FarenseError):  # already named (DiskFull, Preempted, ...): keep it
            return None
        no_errno = from_writer and isinstance(exc, Exception) and not isinstance(exc, OSError)
        if not fsutil.is_disk_full_error(exc, self.directory if no_errno else None):
            return None
        code = fsutil.disk_full_errno(exc)
        why = f"{os.strerror(code)} (errno {code})" if code is not None else \
            f"No space left on device ({_free_bytes(self.directory)} bytes free after the writer failed with {exc!r})"
        return DiskFull(f"could not save checkpoint step {step} in {self.directory}: {why}; the partial write was "
                        "removed. Free space and resume.")

    # ------------------------------------------------------------------ reading

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a well-formed manifest, oldest first; reads manifests only."""
        infos = []
        for _, path in self._committed_dirs():
            manifest, _ = _load_manifest(path)
            if manifest is not None:
                infos.append(_info_from_manifest(path, manifest))
        return infos

    def verify(self, info_or_step: CheckpointInfo | int, level: Verify = Verify.SHA256) -> tuple[bool, str]:
        """Re-read every file against the manifest: (True, "ok") or (False, why it must not be loaded)."""
        if isinstance(info_or_step, CheckpointInfo):
            path = info_or_step.path
        else:
            _check_step(info_or_step)
            path = self.directory / checkpoint_name(info_or_step)
        return self.verify_path(path, level)

    def verify_path(self, path: str | os.PathLike[str], level: Verify = Verify.SHA256) -> tuple[bool, str]:
        """verify() for a checkpoint directory given by path; Verify.SIZES stops before hashing."""
        path = Path(path)
        if not path.is_dir():
            return False, "not a directory" if os.path.lexists(path) else "checkpoint directory missing"
        manifest, reason = _load_manifest(path)
        if manifest is None:
            return False, reason
        files: dict[str, dict[str, Any]] = manifest["files"]
        for name in self.required_files:
            if name not in files:
                return False, f"required file {name} not in manifest"
        try:
            present = {e.name: e for e in os.scandir(path)}
        except OSError as exc:
            return False, f"directory unreadable: {exc}"
        for name in sorted(present):
            if name != MANIFEST_NAME and name not in files and not name.startswith("."):
                return False, f"unexpected file {name} (not in manifest)"
        # Sizes first: cheap, and they catch truncation without hashing gigabytes.
        for name, entry in sorted(files.items()):
            found = present.get(name)
            if found is None:
                return False, f"missing file {name}"
            if not found.is_file(follow_symlinks=False):
                return False, f"{name}: not a regular file"
            size = found.stat(follow_symlinks=False).st_size
            if size != entry["size"]:
                return False, f"{name}: size {size} != manifest {entry['size']}"
        if level is Verify.SIZES:
            return True, "ok"
        for name, entry in sorted(files.items()):
            try:
                digest = fsutil.sha256_file(path / name)
            except OSError as exc:
                return False, f"{name}: unreadable: {exc}"
            if digest != entry["sha256"]:
                return False, f"sha256 mismatch in {name}"
        return True, "ok"

    def latest_verified(self) -> CheckpointInfo | None:
        """The newest checkpoint that verifies; each newer one passed over is reported to on_skip."""
        for _, path in reversed(self._committed_dirs()):
            ok, reason = self.verify_path(path)
            if not ok:
                self.on_skip(path, reason)
                continue
            try:
                return _info_from_manifest(path, read_manifest(path))
            except CheckpointCorrupt as exc:  # changed under us between verify and read
                self.on_skip(path, getattr(exc, "reason", str(exc)))
        return None

    def latest_usable(self, check: Check | None = None) -> tuple[CheckpointInfo | None, builtins.list[Path]]:
        """The newest checkpoint that verifies and passes `check` (e.g. its state.json parses), and the
        newer ones that did not, each moved to quarantine/ with its reason (never deleted for failing)."""
        moved: builtins.list[Path] = []
        for _, path in reversed(self._committed_dirs()):
            ok, reason = self.verify_path(path)
            if ok:
                try:
                    info = _info_from_manifest(path, read_manifest(path))
                except CheckpointCorrupt as exc:  # changed under us between verify and read
                    reason = getattr(exc, "reason", str(exc))
                else:
                    why = check(info) if check is not None else None
                    if why is None:
                        return info, moved
                    reason = why
            self.on_skip(path, reason)
            if (target := self.quarantine(path, reason)) is not None:
                moved.append(target)
        return None, moved

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Move a checkpoint that must not be loaded to quarantine/<name>, its reason beside it; the new path."""
        if self.rank != 0:
            return None
        qdir = self.directory / QUARANTINE_DIR
        with self._lock:
            qdir.mkdir(exist_ok=True)
            target, n = qdir / path.name, 1
            while os.path.lexists(target) or os.path.lexists(_reason_file(target)):
                n += 1
                target = qdir / f"{path.name}-{n}"
            record = {"checkpoint": path.name, "reason": reason, "quarantined_at": self._clock(),
                      "quarantined_at_utc": datetime.fromtimestamp(self._clock(), timezone.utc).isoformat()}
            fsutil.atomic_write_bytes(_reason_file(target), orjson.dumps(record, option=orjson.OPT_INDENT_2))
            os.rename(path, target)
            fsutil.fsync_dir(self.directory)
            fsutil.fsync_dir(qdir)
        return target

    def quarantined(self) -> builtins.list[tuple[Path, str]]:
        """Checkpoints moved to quarantine/, oldest name first, with the reason recorded for each."""
        qdir = self.directory / QUARANTINE_DIR
        try:
            with os.scandir(qdir) as it:
                dirs = sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for d in dirs:
            record = fsutil.read_json_object(_reason_file(d)) or {}
            out.append((d, str(record.get("reason", "reason not recorded"))))
        return out

    def scan(self) -> builtins.list[ScannedCheckpoint]:
        """Every committed-looking checkpoint directory, oldest first, with or without a usable manifest.

        Reads manifests and stats files (never hashes): planning over thousands of directories stays fast.
        """
        out = []
        for step, path in self._committed_dirs():
            manifest, _ = _load_manifest(path)
            info = _info_from_manifest(path, manifest) if manifest is not None else None
            out.append(ScannedCheckpoint(step, path, info, fsutil.allocated_bytes(path)))
        return out

    def temporaries(self) -> builtins.list[Path]:
        """Leftovers of interrupted writes and deletes (`*.tmp-*`) in the checkpoints directory."""
        try:
            with os.scandir(self.directory) as it:
                return sorted(Path(e.path) for e in it if is_temporary(e.name))
        except (FileNotFoundError, NotADirectoryError):
            return []

    @staticmethod
    def recorded_best(infos: Sequence[CheckpointInfo]) -> tuple[int | None, bool]:
        """(best step, known?) as the manifests record it: the newest one's best_step, else the lowest val_loss."""
        meta = infos[-1].meta
        if "best_step" in meta:
            b = meta["best_step"]
            return (b if isinstance(b, int) and not isinstance(b, bool) else None), True
        best: tuple[int | None, float | None] = (None, None)
        for i in infos:  # oldest first, so a tie keeps the earlier step, as improves_best says
            v = i.meta.get("val_loss")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and improves_best(v, best[1]):
                best = (i.step, v)
        return best[0], best[0] is not None

    def retained(self, infos: Sequence[CheckpointInfo], policy: RetentionPolicy, *, best_step: int | None,
                 protect: Iterable[int] = (), level: Verify = Verify.SHA256) -> set[int]:
        """The steps retention keeps: the last keep_last, the newest, the protected, the best (with
        keep_best) and the newest that verifies at `level` (so a damaged newest never costs the last good one)."""
        if not infos:
            return set()
        keep = {info.step for info in infos[-policy.keep_last:]}
        keep.add(infos[-1].step)
        keep.update(protect)
        if policy.keep_best and best_step is not None:
            keep.add(best_step)
        newest_good = next((info.step for info in reversed(infos) if self.verify(info, level)[0]), None)
        if newest_good is not None:
            keep.add(newest_good)
        return keep

    def committed_steps(self) -> builtins.list[int]:
        """Steps of the committed-looking directories, by name only (no manifest read): for watchers."""
        return [step for step, _ in self._committed_dirs()]

    def checkpoint_bytes(self, step: int) -> int | None:
        """Size of a committed checkpoint's files from its manifest; None if there is none."""
        manifest, _ = _load_manifest(self.directory / checkpoint_name(step))
        if manifest is None:
            return None
        return sum(f["size"] for f in manifest["files"].values())

    def last_checkpoint_size(self) -> int | None:
        """Size of the newest listed checkpoint: the disk guard's estimate of the next write."""
        infos = self.list()
        return infos[-1].size_bytes if infos else None

    # ------------------------------------------------------------------ deleting

    def prune(
        self, policy: RetentionPolicy, *, best_step: int | None, protect: Iterable[int] = ()
    ) -> builtins.list[CheckpointInfo]:
        """Delete checkpoints beyond policy.keep_last; returns what was deleted, oldest first.

        Always kept: the newest committed one, the newest one that verifies (so a damaged newest
        never costs the last good one), the best (with keep_best) and every step in `protect`
        (the one the run resumed from). Call only after save() returned: never before a newer
        checkpoint has committed.
        """
        if self.rank != 0:
            return []
        with self._lock:
            infos = self.list()
            keep = self.retained(infos, policy, best_step=best_step, protect=protect)
            deleted = []
            for info in infos:
                if info.step not in keep and self._delete(info.path):
                    deleted.append(info)
            return deleted

    def prune_to_minimum(self, best_step: int | None, protect: Iterable[int] = ()) -> builtins.list[CheckpointInfo]:
        """Keep only the latest, the best and the protected: the disk guard's high-watermark move."""
        return self.prune(RetentionPolicy(keep_last=1, keep_best=True), best_step=best_step, protect=protect)

    def remove(self, step: int) -> bool:
        """Delete one committed checkpoint (e.g. an unverifiable one newer than the resume point)."""
        if self.rank != 0:
            return False
        _check_step(step)
        with self._lock:
            return self._delete(self.directory / checkpoint_name(step))

    def discard_after(self, step: int | None) -> builtins.list[Path]:
        """Delete every checkpoint directory newer than `step` (all if None), manifest or not.

        A resuming trainer calls this with the step it resumes from: anything newer failed to
        verify, and its name must be free for the step to be written again.
        """
        if self.rank != 0:
            return []
        gone = []
        with self._lock:
            for s, path in self._committed_dirs():
                if (step is None or s > step) and self._delete(path):
                    gone.append(path)
        return gone

    def remove_temporaries(self) -> int:
        """Delete leftovers of interrupted writes and deletes (`*.tmp-*`); returns bytes freed.

        The caller must hold the run lock (farense.run.locks) or know the run's trainer is dead: a
        live trainer in another process may be writing one of these right now. This store's own
        write in progress is always left alone.
        """
        if self.rank != 0 or not self.directory.is_dir():
            return 0
        freed = 0
        with self._lock:
            leftovers = self.temporaries()
            for path in leftovers:
                if path in self._in_progress:
                    continue
                size = fsutil.dir_size(path)
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:
                    continue
                freed += size
            if leftovers:
                fsutil.fsync_dir(self.directory)
        return freed

    # ------------------------------------------------------------------ internals

    def _committed_dirs(self) -> builtins.list[tuple[int, Path]]:
        """(step, path) of every committed-looking directory, manifest or not, oldest first."""
        try:
            with os.scandir(self.directory) as it:
                found = [
                    (step, Path(e.path))
                    for e in it
                    if (step := parse_checkpoint_name(e.name)) is not None and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
        return sorted(found)

    def _delete(self, path: Path) -> bool:
        # Renamed first, so a delete cut short leaves a `.tmp-` leftover, never a half checkpoint
        # under a committed name.
        return fsutil.remove_atomically(path, ignore_errors=True)


# ---------------------------------------------------------------------- helpers


class _AlreadySaved(Exception):
    """The step was committed by someone else while we wrote it (and it verifies): keep theirs."""

    def __init__(self, info: CheckpointInfo):
        super().__init__(str(info.path))
        self.info = info


def _reason_file(quarantined: Path) -> Path:
    return quarantined.with_name(quarantined.name + QUARANTINE_REASON_SUFFIX)


def _warn_skip(path: Path, reason: str) -> None:
    log.warning("skipping checkpoint %s: %s", path, reason)


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 99_999_999:
        raise ValueError(f"checkpoint step: expected an integer from 0 to 99999999, got {step!r}")


def _check_file_name(name: str, what: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name == MANIFEST_NAME
    ):
        raise ValueError(
            f"{what}: expected a plain file name (no '/', not starting with '.', not {MANIFEST_NAME}), got {name!r}"
        )


def _check_writer_names(writers: Mapping[str, Writer]) -> list[str]:
    if not writers:
        raise ValueError("checkpoint writers: expected at least one {file name: writer}, got none")
    for name, writer in writers.items():
        _check_file_name(name, "checkpoint writer")
        if not callable(writer):
            raise TypeError(f"checkpoint writer for {name!r}: expected a callable taking a Path, got {writer!r}")
    return sorted(writers)


def _check_written(target: Path, name: str) -> None:
    if target.is_file() and not target.is_symlink():
        return
    hint = ""
    if target.with_name(name + ".safetensors").exists():
        hint = (
            f" It wrote {name}.safetensors instead: mx.save_safetensors appends the suffix, "
            f"so name the file {name}.safetensors."
        )
    raise ValueError(f"checkpoint writer for {name!r} did not create the file {target}.{hint}")


def _hash_and_sync(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a just-written file, fsynced once through the same descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, fsutil.CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
        fsutil.fsync_fd(fd)  # once; a failure propagates (never retried)
    finally:
        os.close(fd)
    return {"size": size, "sha256": digest.hexdigest()}


def _load_manifest(directory: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "ok") or (None, reason): the structural checks every reader shares."""
    try:
        data = (directory / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None, "manifest missing"
    except OSError as exc:
        return None, f"manifest unreadable: {exc}"
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return None, f"manifest is not valid JSON: {exc}"
    if not isinstance(manifest, dict):
        return None, "manifest is not a JSON object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return None, f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}"
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        return None, f"manifest format_version {version!r} is not {MANIFEST_VERSION} (the one this farense reads)"
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None, f"manifest step {step!r} is not a non-negative integer"
    dir_step = parse_checkpoint_name(directory.name)
    if dir_step is not None and dir_step != step:
        return None, f"manifest step {step} != directory step {dir_step}"
    if not isinstance(manifest.get("meta"), dict):
        return None, "manifest meta is not an object"
    created = manifest.get("created_at")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        return None, f"manifest created_at {created!r} is not a number"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None, "manifest lists no files"
    for name, entry in files.items():
        try:
            _check_file_name(name, "manifest file")
        except ValueError:
            return None, f"manifest lists an invalid file name {name!r}"
        if not isinstance(entry, dict):
            return None, f"manifest entry for {name} is not an object"
        size, sha = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return None, f"manifest size of {name} is not a non-negative integer: {size!r}"
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            return None, f"manifest sha256 of {name} is not 64 lowercase hex digits: {sha!r}"
    return manifest, "ok"


def _info_from_manifest(path: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
    files = manifest["files"]
    return CheckpointInfo(
        step=manifest["step"],
        path=path,
        meta=dict(manifest["meta"]),
        size_bytes=sum(f["size"] for f in files.values()),
        created_at=float(manifest["created_at"]),
        files=tuple(sorted(files)),
    )


def _free_bytes(path: Path) -> int | str:
    try:
        return fsutil.free_bytes(path)
    except OSError:
        return "?"


def _rmtree_quiet(path: Path) -> None:
    # Best effort: if this fails too (EIO), the leftover is a `.tmp-` name that readers never
    # see and remove_temporaries() deletes later.
    shutil.rmtree(path, ignore_errors=True)
