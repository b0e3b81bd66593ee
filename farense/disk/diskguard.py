"""The disk guard's level state machine: watermarks checked before every checkpoint write and during a run.

The preflight before a run starts is farense.preflight.

Three levels, each a share of the filesystem used AND an absolute amount free, whichever is
stricter (so one config fits a 256 GB laptop and an 8 TB server):

    low    85% used or < 20 GB free   warn, prune to the retention policy
    high   90% used or < 10 GB free   prune to the minimum (latest + best), warn loudly
    flood  95% used or <  5 GB free,  write nothing: stop as "paused: disk full" (resumable)
           or < next checkpoint + reserve

A level is left only when usage falls `hysteresis_percent` points below its share AND free space
rises above its absolute threshold by a margin, so the guard does not flap around a threshold.

Free space is what a non-root writer can use (statvfs f_bavail). ext4 reserves ~5% for root, so a
process running as root could still write past "0 free"; the guard ignores that reserve on
purpose and "used %" is computed as `df` does, used / (used + available). tmpfs has no reserve.

The usage function and the clock are parameters: tests drive every level without filling a disk
and without sleeping.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from farense.config import DiskConfig, ExperimentConfig, format_size
from farense.disk.estimate import estimate_run
from farense.errors import DiskFull
from farense.run.checkpoint import RetentionPolicy
from farense.run.fsutil import existing_path

if TYPE_CHECKING:
    from farense.run.checkpoint import CheckpointStore


class Level(str, Enum):
    OK = "ok"
    LOW = "low"
    HIGH = "high"
    FLOOD = "flood"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Level.OK: 0, Level.LOW: 1, Level.HIGH: 2, Level.FLOOD: 3}
_BY_SEVERITY = {v: k for k, v in _SEVERITY.items()}


@dataclass(frozen=True)
class Usage:
    """One filesystem's size: total, used, and free for a non-root writer (bytes)."""

    total: int
    used: int
    free: int

    @property
    def used_percent(self) -> float:
        """As `df` shows it: used / (used + available), so root's reserve does not hide a full disk."""
        denom = self.used + self.free
        return 100.0 * self.used / denom if denom > 0 else 100.0


UsageFn = Callable[[Path], Usage]


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """statvfs of the filesystem that holds (or will hold) `path`; free is f_bavail (non-root)."""
    st = os.statvfs(existing_path(path))
    return Usage(
        total=st.f_blocks * st.f_frsize,
        used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        free=st.f_bavail * st.f_frsize,
    )


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the filesystem that holds (or will hold) `path`."""
    p = existing_path(path).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


@dataclass(frozen=True)
class Threshold:
    """A level's trigger: at or above `used_percent`, or below `free_bytes` free."""

    level: Level
    used_percent: float
    free_bytes: int

    def describe(self) -> str:
        return f"{self.level.value} at {self.used_percent:g}% used or < {format_size(self.free_bytes)} free"


def thresholds(config: DiskConfig) -> dict[Level, Threshold]:
    return {
        Level.LOW: Threshold(Level.LOW, config.low_used_percent, int(config.low_free)),
        Level.HIGH: Threshold(Level.HIGH, config.high_used_percent, int(config.high_free)),
        Level.FLOOD: Threshold(Level.FLOOD, config.flood_used_percent, int(config.flood_free)),
    }


def flood_floor(config: DiskConfig, usage: Usage) -> int:
    """Free bytes under which the flood level starts on this filesystem (percent or absolute)."""
    share = (100.0 - config.flood_used_percent) / 100.0 * (usage.used + usage.free)
    return max(int(config.flood_free), int(share) + 1)


@dataclass(frozen=True)
class GuardReading:
    """One measurement and the level it puts the run at."""

    level: Level
    total: int
    used: int
    free: int
    used_percent: float
    message: str
    next_write_bytes: int = 0
    raw_level: Level = Level.OK  # before hysteresis
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level.value, "raw_level": self.raw_level.value, "total": self.total, "used": self.used,
                "free": self.free, "used_percent": round(self.used_percent, 2), "next_write_bytes": self.next_write_bytes,
                "path": str(self.path) if self.path else None, "message": self.message}


@dataclass(frozen=True)
class GuardAction:
    """What the guard did about a reading: a warning, or a prune with the steps deleted."""

    kind: str  # "warn", "prune", "prune-to-minimum"
    level: Level
    message: str
    deleted_steps: tuple[int, ...] = ()
    bytes_freed: int = 0


class DiskGuard:
    """Watermarks on the filesystem of `path`: `check` measures, `enforce` acts, `due` paces checks."""

    def __init__(
        self,
        config: DiskConfig,
        path: str | os.PathLike[str],
        *,
        usage: UsageFn = disk_usage,
        clock: Callable[[], float] = time.monotonic,
        cleanup_hint: str | None = None,
    ) -> None:
        self.config = config
        self.path = Path(path)
        self._usage = usage
        self._clock = clock
        self.cleanup_hint = cleanup_hint or "farense cleanup --apply"
        self.thresholds = thresholds(config)
        self.level = Level.OK
        self._last_due: float | None = None

    # ---- measuring

    def raw_level(self, u: Usage, next_write_bytes: int = 0) -> Level:
        """The level these numbers reach, without hysteresis."""
        if u.free < next_write_bytes + int(self.config.reserve):
            return Level.FLOOD
        for level in (Level.FLOOD, Level.HIGH, Level.LOW):
            t = self.thresholds[level]
            if u.used_percent >= t.used_percent or u.free < t.free_bytes:
                return level
        return Level.OK

    def released(self, level: Level, u: Usage) -> bool:
        """Has usage fallen clearly below `level` (its share minus hysteresis, its free plus a margin)?"""
        t = self.thresholds[level]
        hyst = self.config.hysteresis_percent
        margin = min(int(hyst / 100.0 * (u.used + u.free)), t.free_bytes)
        return u.used_percent < t.used_percent - hyst and u.free >= t.free_bytes + margin

    def check(self, next_write_bytes: int = 0) -> GuardReading:
        """Measure now and move the level (with hysteresis); acts on nothing."""
        u = self._usage(self.path)
        raw = self.raw_level(u, next_write_bytes)
        level = self.level
        while level.severity > raw.severity and self.released(level, u):
            level = _BY_SEVERITY[level.severity - 1]
        if raw.severity > level.severity:
            level = raw
        self.level = level
        return GuardReading(level, u.total, u.used, u.free, u.used_percent,
                            self._describe(level, u, next_write_bytes), next_write_bytes, raw, self.path)

    def due(self, now: float | None = None) -> bool:
        """True at most once per check_interval_seconds (the first call included); the caller then checks."""
        now = self._clock() if now is None else now
        if self._last_due is not None and now - self._last_due < self.config.check_interval_seconds:
            return False
        self._last_due = now
        return True

    def _describe(self, level: Level, u: Usage, next_write: int) -> str:
        head = {Level.OK: "disk ok", Level.LOW: "disk low", Level.HIGH: "DISK HIGH", Level.FLOOD: "DISK FULL"}[level]
        msg = (f"{head}: {u.used_percent:.1f}% used, {format_size(u.free)} free of {format_size(u.total)} "
               f"on the filesystem of {self.path}")
        if level is not Level.OK:
            t = self.thresholds[level]
            msg += f" ({t.describe()}"
            if level is Level.FLOOD:
                msg += f", or < next checkpoint {format_size(next_write)} + reserve {format_size(self.config.reserve)}"
            msg += ")"
        return msg

    # ---- acting

    def enforce(
        self,
        reading: GuardReading,
        store: CheckpointStore,
        policy: RetentionPolicy | None,
        best_step: int | None,
        protect: Iterable[int] = (),
    ) -> list[GuardAction]:
        """Apply the reading's level to `store`: prune to policy (low), to latest + best (high), or stop.

        Flood first prunes to the minimum (deleting writes nothing) and measures again; if still at
        flood, raises errors.DiskFull with the numbers: nothing has been written.
        """
        protect = tuple(protect)
        actions: list[GuardAction] = []
        if reading.level is Level.OK:
            return actions
        if reading.level is Level.LOW:
            actions.append(GuardAction("warn", Level.LOW, reading.message))
            if policy is not None:
                actions.append(_pruned("prune", Level.LOW, store.prune(policy, best_step=best_step, protect=protect),
                                       f"pruned to the retention policy (keep_last={getattr(policy, 'keep_last', '?')})"))
            return [a for a in actions if a.kind == "warn" or a.deleted_steps]
        actions.append(GuardAction("warn", reading.level, reading.message))
        actions.append(_pruned("prune-to-minimum", reading.level, store.prune_to_minimum(best_step, protect=protect),
                               "pruned to the minimum (latest + best)"))
        if reading.level is Level.HIGH:
            return actions
        again = self.check(reading.next_write_bytes)
        if again.level is not Level.FLOOD:
            actions.append(GuardAction("warn", again.level, f"after pruning: {again.message}"))
            return actions
        raise self.disk_full(again, freed=sum(a.bytes_freed for a in actions))

    def disk_full(self, reading: GuardReading, *, freed: int = 0) -> DiskFull:
        """The DiskFull that stops the run, with every number a person needs to decide."""
        t = self.thresholds[Level.FLOOD]
        need = reading.next_write_bytes + int(self.config.reserve)
        floor = flood_floor(self.config, Usage(reading.total, reading.used, reading.free))
        msg = (f"paused: disk full. {format_size(reading.free)} free ({reading.used_percent:.1f}% used) on the "
               f"filesystem of {self.path}; the next checkpoint needs {format_size(reading.next_write_bytes)} + "
               f"reserve {format_size(self.config.reserve)} = {format_size(need)}, and the flood level is "
               f"{t.used_percent:g}% used or < {format_size(t.free_bytes)} free (here: below {format_size(floor)} free). "
               f"Nothing was written; the last checkpoint is intact"
               + (f" ({format_size(freed)} of stale checkpoints were pruned)" if freed else "")
               + f". Free space (`{self.cleanup_hint}`) and resume: the run continues from its last checkpoint.")
        err = DiskFull(msg)
        err.reading = reading  # type: ignore[attr-defined]
        err.free = reading.free  # type: ignore[attr-defined]
        err.needed = max(need, floor)  # type: ignore[attr-defined]
        return err


def _pruned(kind: str, level: Level, deleted: Sequence[Any], what: str) -> GuardAction:
    steps = tuple(getattr(i, "step", i) for i in deleted)
    freed = sum(int(getattr(i, "size_bytes", 0) or 0) for i in deleted)
    msg = f"{what}: deleted {len(steps)} checkpoint(s) ({format_size(freed)})" if steps else f"{what}: nothing to delete"
    return GuardAction(kind, level, msg, steps, freed)


class RunDiskGuard(DiskGuard):
    """The guard as the trainer uses it: a check before every checkpoint write and periodic ones.

    `policy` is the run's RetentionPolicy (the low level prunes to it; without one, low only warns,
    since the trainer prunes to policy after every save anyway). `checkpoint_estimate` stands in for
    the next write's size until the run has written its first checkpoint.
    """

    def __init__(
        self,
        config: DiskConfig,
        run_dir: str | os.PathLike[str],
        *,
        policy: RetentionPolicy | None = None,
        checkpoint_estimate: int = 0,
        usage: UsageFn = disk_usage,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> None:
        run_dir = Path(run_dir)
        super().__init__(config, run_dir, usage=usage, clock=clock,
                         cleanup_hint=f"farense cleanup --runs-dir {run_dir.parent} --apply")
        self.policy = policy
        self.checkpoint_estimate = int(checkpoint_estimate)
        self.log = log or (lambda m: print(f"farense disk guard: {m}", file=sys.stderr, flush=True))
        self.readings: list[GuardReading] = []  # every reading, for tests and the run's report
        self._logged_level = Level.OK

    @classmethod
    def for_config(
        cls,
        config: ExperimentConfig,
        *,
        usage: UsageFn = disk_usage,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> "RunDiskGuard":
        """The guard for one run: its disk config, its retention policy, its estimated checkpoint size."""
        policy = RetentionPolicy.from_config(config.checkpoint)
        estimate = estimate_run(config).checkpoint_bytes or 0
        return cls(config.disk, config.run_dir, policy=policy, checkpoint_estimate=estimate, usage=usage,
                   clock=clock, log=log)

    def before_write(self, store: CheckpointStore, next_bytes: int, *, best_step: int | None, protect: Iterable[int] = ()) -> GuardReading:
        """Call before every checkpoint write; raises DiskFull (write nothing) at the flood level."""
        return self._guard(store, next_bytes, best_step, protect, always_log=True)

    def periodic(self, store: CheckpointStore, next_bytes: int, *, best_step: int | None, protect: Iterable[int] = ()) -> GuardReading:
        """Call when due(); logs only when the level changes or something was pruned."""
        return self._guard(store, next_bytes, best_step, protect, always_log=False)

    def _guard(self, store: CheckpointStore, next_bytes: int, best_step: int | None, protect: Iterable[int],
               *, always_log: bool) -> GuardReading:
        reading = self.check(next_bytes or self.checkpoint_estimate)
        self.readings.append(reading)
        try:
            actions = self.enforce(reading, store, self.policy, best_step, protect)
        except DiskFull as exc:
            self.log(str(exc))
            raise
        changed = reading.level is not self._logged_level
        self._logged_level = reading.level
        loud = reading.level in (Level.HIGH, Level.FLOOD) and always_log
        for a in actions:
            if a.kind != "warn" or changed or loud:
                self.log(("WARNING: " if a.level in (Level.HIGH, Level.FLOOD) else "") + a.message)
        if changed and reading.level is Level.OK:
            self.log(reading.message)
        return reading
