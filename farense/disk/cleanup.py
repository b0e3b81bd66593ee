"""Cleanup planning and applying: stale checkpoints, interrupted writes, old runs, unused models.

The seed's disk filled with 333 stale checkpoint directories; this is the policy that keeps that
from happening again, as a plan (what would go, why, how many bytes) that a person or the pipeline
applies:

    per run                 keep the last K checkpoints, the best and the newest intact one
    finished, older than N  keep only the final adapters, the summary and the evaluation
    *.tmp-* leftovers       interrupted writes and deletes (never read by anyone)
    Hugging Face cache      optionally, models that no config and no run refers to

Never touched: a run whose lock a live process holds (farense.run.locks), the production directory and
anything a symlink inside it resolves to. Sizes are what deleting frees (allocated blocks, not file
lengths). Planning reads manifests and stats files but never hashes, so it stays fast over thousands
of checkpoints; applying re-takes each run's lock before deleting,
and deletes by renaming to a `.tmp-` name first, so a delete cut short never leaves a half
checkpoint under a committed name.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson

from farense.codes import RunState
from farense.config import (
    CheckpointConfig,
    ConfigError,
    ExperimentConfig,
    default_config_dir,
    format_size,
    load_config,
)
from farense.errors import RunLocked
from farense.run import fsutil
from farense.run.checkpoint import (
    CheckpointStore,
    RetentionPolicy,
    ScannedCheckpoint,
    Verify,
)
from farense.run.layout import (
    CONFIG_FILE,
    RUN_LOCK_FILE,
    RUN_STATE_FILE,
    SUMMARY_FILE,
    RunPaths,
    is_temporary,
)
from farense.run.locks import LockInfo, RunLock, probe_lock
from farense.run.runstate import find_runs, read_run_state

OLD_CHECKPOINT = "old-checkpoint"
TEMPORARY = "temporary"
FINISHED_RUN_EXTRAS = "finished-run-extras"
HF_CACHE = "hf-cache"
KINDS = (OLD_CHECKPOINT, TEMPORARY, FINISHED_RUN_EXTRAS, HF_CACHE)

# What an old finished run keeps: the final adapters, the summary and evaluation (decisions compare
# them), and the small files that say what the run was.
FINISHED_KEEP = frozenset({"adapters", SUMMARY_FILE, "evaluation", RUN_STATE_FILE, CONFIG_FILE, RUN_LOCK_FILE})
_FINISHED_STATES = frozenset(s.value for s in RunState if s.finished)
_MAX_DEPTH = 3  # runs_dir/<group>/<run>: the demo overlay puts runs under runs/demo/
DAY = 86_400.0


@dataclass(frozen=True)
class CleanupItem:
    """One thing that would be deleted, with its size and why."""

    path: Path
    kind: str
    bytes: int
    reason: str
    run: Path | None = None  # the run whose lock guards it; None for Hugging Face cache entries
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "bytes": self.bytes, "reason": self.reason,
                "run": str(self.run) if self.run else None, "step": self.step}


@dataclass(frozen=True)
class SkippedRun:
    """A run (or path) left alone as a whole, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "reason": self.reason}


@dataclass(frozen=True)
class RunPlan:
    """What the plan decided for one run: its checkpoints, which steps stay, what it knows of best."""

    path: Path
    state: str | None
    checkpoints: int
    kept_steps: tuple[int, ...]
    best_step: int | None
    lock: LockInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "state": self.state, "checkpoints": self.checkpoints,
                "kept_steps": list(self.kept_steps), "best_step": self.best_step,
                "stale_lock_pid": self.lock.pid if self.lock and self.lock.stale else None}


@dataclass
class CleanupPlan:
    """Everything a cleanup would delete; nothing has been touched while making it."""

    runs_dir: Path
    production_dir: Path | None
    keep_last: int
    keep_best: bool
    older_than_days: float
    items: list[CleanupItem] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    kept: list[SkippedRun] = field(default_factory=list)  # could have gone, but cleanup leaves it: what and why
    runs: list[RunPlan] = field(default_factory=list)
    planning_seconds: float = 0.0

    @property
    def policy(self) -> RetentionPolicy:
        """The retention this plan applies to every run's checkpoints (the store's own rule)."""
        return RetentionPolicy(self.keep_last, self.keep_best)

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    def bytes_by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for i in self.items:
            out[i.kind] += i.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs_dir": str(self.runs_dir),
            "production_dir": str(self.production_dir) if self.production_dir else None,
            "policy": {"keep_last": self.keep_last, "keep_best": self.keep_best, "older_than_days": self.older_than_days},
            "total_bytes": self.total_bytes,
            "bytes_by_kind": self.bytes_by_kind(),
            "items": [i.to_dict() for i in self.items],
            "skipped": [s.to_dict() for s in self.skipped],
            "kept": [s.to_dict() for s in self.kept],
            "runs": [r.to_dict() for r in self.runs],
            "planning_seconds": self.planning_seconds,
        }


@dataclass
class CleanupResult:
    """What a cleanup did (or, as a dry run, would do): bytes planned and freed, what went, what failed,
    which runs became active meanwhile. The command, the Prefect task and the flows all return it."""

    bytes_freed: int = 0
    deleted: list[CleanupItem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    planned_bytes: int = 0
    dry_run: bool = False

    @classmethod
    def not_applied(cls, plan: CleanupPlan) -> CleanupResult:
        """A dry run (or an empty plan): what the plan would free, nothing touched."""
        return cls(planned_bytes=plan.total_bytes, dry_run=True)

    @property
    def freed_bytes(self) -> int:
        return self.bytes_freed

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_freed": self.bytes_freed, "deleted": [i.to_dict() for i in self.deleted],
                "errors": list(self.errors), "skipped": [s.to_dict() for s in self.skipped],
                "planned_bytes": self.planned_bytes, "dry_run": self.dry_run}


# --------------------------------------------------------------------------- protection


class _Protected:
    """Real paths that must survive: the production directory and every symlink target inside it."""

    def __init__(self, production_dir: Path | None) -> None:
        self.roots: list[str] = []
        if production_dir is None:
            return
        prod = Path(production_dir)
        self.roots.append(os.path.realpath(prod))
        if not prod.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(prod, followlinks=False):
            for name in (*dirnames, *filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    self.roots.append(os.path.realpath(p))

    def within(self, real: str) -> str | None:
        """The protected path that `real` is or lies inside (a directory that merely holds one is not)."""
        for root in self.roots:
            if real == root or real.startswith(root + os.sep):
                return root
        return None

    def conflicts(self, real: str) -> str | None:
        """The protected path that deleting `real` would touch (it, inside it, or containing it)."""
        for root in self.roots:
            if real == root or real.startswith(root + os.sep) or root.startswith(real + os.sep):
                return root
        return None


# --------------------------------------------------------------------------- planning


def plan_cleanup(
    runs_dir: str | os.PathLike[str],
    *,
    production_dir: str | os.PathLike[str] | None = None,
    keep_last: int = 3,
    keep_best: bool = True,
    older_than_days: float | None = None,
    now: float | None = None,
    include_hf_cache: bool = False,
    referenced_models: Iterable[str] = (),
    hf_cache_dir: str | os.PathLike[str] | None = None,
) -> CleanupPlan:
    """What a cleanup would delete, and why; touches nothing. `now` is Unix seconds (tests pass it).

    `older_than_days` defaults to the config field checkpoint.cleanup_after_days's default.
    """
    if older_than_days is None:
        older_than_days = CheckpointConfig().cleanup_after_days
    if keep_last < 1:
        raise ValueError(f"keep_last: expected an integer >= 1 (the latest checkpoint is needed to resume), got {keep_last}")
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    runs_dir = Path(runs_dir)
    prod = Path(production_dir) if production_dir is not None else None
    protected = _Protected(prod)
    plan = CleanupPlan(runs_dir, prod, keep_last, keep_best, older_than_days)
    models = set(referenced_models)
    for run in _find_runs(runs_dir, protected, plan.skipped):
        _plan_run(plan, RunPaths(run), protected, now=now, models=models)
    if include_hf_cache:
        _plan_hf_cache(plan, protected, models, Path(hf_cache_dir) if hf_cache_dir else None)
    plan.planning_seconds = time.perf_counter() - t0
    return plan


def _find_runs(root: Path, protected: _Protected, skipped: list[SkippedRun]) -> list[Path]:
    """Runs under `root` that cleanup may look at: never through a symlink, never inside production."""
    def production(path: Path) -> str | None:
        hit = protected.within(os.path.realpath(path))
        return None if hit is None else f"production: inside {hit}"

    notes: list[tuple[Path, str]] = []
    runs = find_runs(root, max_depth=_MAX_DEPTH, follow_symlinks=False, exclude=production, skipped=notes)
    skipped.extend(SkippedRun(path, why) for path, why in notes)
    return runs


def _plan_run(plan: CleanupPlan, paths: RunPaths, protected: _Protected, *, now: float, models: set[str]) -> None:
    lock = probe_lock(paths.lock)
    if lock.held:
        plan.skipped.append(SkippedRun(paths.root, f"active: locked by {lock.describe()}"))
        return
    state = read_run_state(paths.state) or {}
    if (m := _run_model(paths)) is not None:
        models.add(m)
    store = CheckpointStore(paths.checkpoints)
    items = [CleanupItem(p, TEMPORARY, fsutil.allocated_bytes(p), "left by an interrupted checkpoint write or delete",
                         paths.root) for p in store.temporaries()]
    items += _run_temporaries(paths)
    ckpts = store.scan()
    age_days = _finished_age_days(paths, state, now)
    state_name = state.get("state") if isinstance(state.get("state"), str) else None
    kept: list[int] = []
    best: int | None = None
    if age_days is not None and age_days > plan.older_than_days and paths.best_adapters.is_file():
        why = f"finished {age_days:.0f} days ago ({state_name}): only the final adapters and summary are kept"
        items += [CleanupItem(c.path, FINISHED_RUN_EXTRAS, c.disk_bytes, why, paths.root, c.step) for c in ckpts]
        items += _finished_extras(paths, why, plan.skipped)
    else:
        kept, best = _plan_checkpoints(plan, paths, store, ckpts, items)
    _plan_quarantine(plan, paths, store)
    _add_unprotected(plan, paths, protected, items)
    plan.runs.append(RunPlan(paths.root, state_name, len(ckpts), tuple(kept), best, lock))


def _plan_checkpoints(plan: CleanupPlan, paths: RunPaths, store: CheckpointStore, ckpts: list[ScannedCheckpoint],
                      items: list[CleanupItem]) -> tuple[list[int], int | None]:
    """Retention as the store keeps it (checked by sizes only), plus old directories that can never load."""
    valid = [c.info for c in ckpts if c.info is not None]
    best, best_known = store.recorded_best(valid) if valid and plan.keep_best else (None, True)
    keep = store.retained(valid, plan.policy, best_step=best, level=Verify.SIZES)
    kept = sorted(keep)
    if not best_known:
        plan.skipped.append(SkippedRun(paths.root, "checkpoints kept: best step unknown (no best_step or "
                                                   "val_loss in the manifests)"))
        kept = [c.step for c in valid]
    else:
        desc = f"beyond keep_last={plan.keep_last} (kept: {', '.join(map(str, kept)) or 'none'}"
        desc += f"; best: {best})" if plan.keep_best else ")"
        items += [CleanupItem(c.path, OLD_CHECKPOINT, c.disk_bytes, desc, paths.root, c.step)
                  for c in ckpts if c.info is not None and c.step not in keep]
    newest_valid = valid[-1].step if valid else None
    items += [CleanupItem(c.path, OLD_CHECKPOINT, c.disk_bytes,
                          f"no usable manifest: never loadable, older than step {newest_valid}", paths.root, c.step)
              for c in ckpts if c.info is None and newest_valid is not None and c.step < newest_valid]
    for c in ckpts:
        if c.info is None and (newest_valid is None or c.step > newest_valid):
            why = store.verify_path(c.path, Verify.SIZES)[1]
            plan.kept.append(SkippedRun(c.path, f"{format_size(c.disk_bytes)} kept: it does not verify ({why}) but "
                                                "no newer checkpoint does either; `farense train` moves it to "
                                                "checkpoints/quarantine/ when it resumes"))
    return kept, best


def _plan_quarantine(plan: CleanupPlan, paths: RunPaths, store: CheckpointStore) -> None:
    """Quarantined checkpoints are never deleted by cleanup; the plan says so, with their size."""
    quarantined = store.quarantined()
    if quarantined:
        size = fsutil.allocated_bytes(paths.quarantine)
        plan.kept.append(SkippedRun(paths.quarantine, f"{format_size(size)} kept: {len(quarantined)} checkpoint(s) "
                                                      "that failed verification; cleanup never deletes them: "
                                                      "inspect, then remove by hand"))


def _add_unprotected(plan: CleanupPlan, paths: RunPaths, protected: _Protected, items: list[CleanupItem]) -> None:
    """Items enter the plan unless deleting them would touch production."""
    ckpt_real = os.path.realpath(paths.checkpoints)
    run_real = os.path.realpath(paths.root)
    for item in items:
        if item.path.parent == paths.checkpoints:  # no realpath per checkpoint: thousands of them
            real = os.path.join(ckpt_real, item.path.name)
        else:
            real = os.path.join(run_real, os.path.relpath(item.path, paths.root))
        if (hit := protected.conflicts(real)) is not None:
            plan.skipped.append(SkippedRun(item.path, f"production: {hit}"))
            continue
        plan.items.append(item)


def _run_temporaries(paths: RunPaths) -> list[CleanupItem]:
    """Leftovers of atomic writes in the run directory and of best-adapter swaps in adapters/."""
    out = []
    for d, match in ((paths.root, is_temporary),
                     (paths.adapters, lambda n: is_temporary(n) or (n.startswith(".best-") and ".tmp" in n))):
        try:
            with os.scandir(d) as it:
                for e in it:
                    if match(e.name):
                        out.append(CleanupItem(Path(e.path), TEMPORARY, fsutil.allocated_bytes(e.path),
                                               "left by an interrupted write", paths.root))
        except (FileNotFoundError, NotADirectoryError):
            pass
    return out


def _finished_extras(paths: RunPaths, why: str, skipped: list[SkippedRun]) -> list[CleanupItem]:
    """What an old finished run may lose; a directory holding runs is never one run's extras."""
    out = []
    with os.scandir(paths.root) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.name in FINISHED_KEEP or e.name == paths.checkpoints.name or is_temporary(e.name):
                continue
            if e.is_dir(follow_symlinks=False) and (inner := find_runs(e.path, max_depth=_MAX_DEPTH,
                                                                          follow_symlinks=False)):
                skipped.append(SkippedRun(Path(e.path), f"holds {len(inner)} run(s) ({inner[0]}...): "
                                                        f"never the extras of the run {paths.root}"))
                continue
            out.append(CleanupItem(Path(e.path), FINISHED_RUN_EXTRAS, fsutil.allocated_bytes(e.path), why, paths.root))
    return out


def _finished_age_days(paths: RunPaths, state: dict[str, Any], now: float) -> float | None:
    """Days since a finished run ended; None for a run that is not finished."""
    if state.get("state") not in _FINISHED_STATES:
        return None
    ended = state.get("updated_at")
    if not isinstance(ended, (int, float)) or isinstance(ended, bool):
        try:
            ended = paths.summary.stat().st_mtime
        except OSError:
            return None
    return (now - float(ended)) / DAY


def _run_model(paths: RunPaths) -> str | None:
    try:
        data = orjson.loads(paths.config.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    model = data.get("model", {}).get("path") if isinstance(data, dict) and isinstance(data.get("model"), dict) else None
    return model if isinstance(model, str) else None


def _plan_hf_cache(plan: CleanupPlan, protected: _Protected, models: set[str], cache_dir: Path | None) -> None:
    """Model repos in the Hugging Face cache that no config and no run refers to."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or repo.repo_id in models:
            continue
        path = Path(repo.repo_path)
        if (hit := protected.conflicts(os.path.realpath(path))) is not None:
            plan.skipped.append(SkippedRun(path, f"production: {hit}"))
            continue
        plan.items.append(CleanupItem(path, HF_CACHE, int(repo.size_on_disk),
                                      f"{repo.repo_id}: no config or run refers to it"))


def plan_for_config(config: ExperimentConfig, *, older_than_days: float | None = None, **kw: Any) -> CleanupPlan:
    """The cleanup plan of a config's runs directory by its own retention policy."""
    policy = RetentionPolicy.from_config(config.checkpoint)
    return plan_cleanup(config.runs_dir, production_dir=config.production_dir, keep_last=policy.keep_last,
                        keep_best=policy.keep_best,
                        older_than_days=config.checkpoint.cleanup_after_days if older_than_days is None else older_than_days,
                        **kw)


def free_space_now(config: ExperimentConfig) -> int:
    """Apply the config's cleanup policy at once (after a disk-full pause); returns the bytes freed."""
    return apply_cleanup(plan_for_config(config)).bytes_freed


def referenced_models(runs_dir: str | os.PathLike[str], config_dir: str | os.PathLike[str] | None = None) -> set[str]:
    """Model paths / repo ids named by the configs in `config_dir` and by every run's config.json."""
    out: set[str] = set()
    cdir = Path(config_dir) if config_dir is not None else default_config_dir()
    for toml in sorted(cdir.glob("*.toml")) if cdir.is_dir() else ():
        try:
            out.add(load_config(toml).model.path)
        except (ConfigError, OSError):
            continue
    for run in _find_runs(Path(runs_dir), _Protected(None), []):
        if (m := _run_model(RunPaths(run))) is not None:
            out.add(m)
    return out


# --------------------------------------------------------------------------- applying


def apply_cleanup(plan: CleanupPlan, *, lock_timeout: float = 0.2) -> CleanupResult:
    """Delete what the plan lists, run by run under that run's lock; reports bytes freed and errors.

    A run that became active since planning is skipped whole. Production is checked again.
    """
    result = CleanupResult(planned_bytes=plan.total_bytes)
    protected = _Protected(plan.production_dir)
    by_run: dict[Path | None, list[CleanupItem]] = defaultdict(list)
    for item in plan.items:
        by_run[item.run].append(item)
    for run, items in by_run.items():
        lock = None
        if run is not None:
            try:
                lock = RunLock(RunPaths(run).lock, command="farense cleanup", timeout=lock_timeout).acquire()
            except RunLocked as exc:
                result.skipped.append(SkippedRun(run, f"active now: {exc}"))
                continue
            except OSError as exc:
                # A disk too full to create run.lock: no trainer can hold a lock file that does not
                # exist, and freeing space is the point, so go on when nobody holds one.
                if not fsutil.is_disk_full_error(exc) or probe_lock(RunPaths(run).lock).held:
                    result.errors.append(f"{run}: cannot take the run lock: {exc}")
                    continue
        try:
            for item in items:
                if (hit := protected.conflicts(os.path.realpath(item.path))) is not None:
                    result.skipped.append(SkippedRun(item.path, f"production: {hit}"))
                    continue
                try:
                    if _delete(item.path):
                        result.deleted.append(item)
                        result.bytes_freed += item.bytes
                except OSError as exc:
                    result.errors.append(f"{item.path}: {exc}")
        finally:
            if lock is not None:
                lock.release()
    return result


_rename = os.rename  # a seam: tests make it fail as a full ext4 directory block would


def _delete(path: Path) -> bool:
    """Rename to a `.tmp-` name (readers never see it again), fsync the parent, then remove it."""
    return fsutil.remove_atomically(path, rename=lambda a, b: _rename(a, b))


# --------------------------------------------------------------------------- presentation


def summary_rows(plan: CleanupPlan) -> list[list[str]]:
    """One row per run and kind: what would go, how many, how many bytes, why."""
    groups: dict[tuple[str, str], list[CleanupItem]] = defaultdict(list)
    for item in plan.items:
        where = os.path.relpath(item.run, plan.runs_dir) if item.run else str(item.path.parent)
        groups[(where, item.kind)].append(item)
    rows = []
    for (where, kind), items in groups.items():
        steps = sorted(i.step for i in items if i.step is not None)
        what = (f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}") if steps else ""
        names = ", ".join(i.path.name for i in items[:2]) + (", ..." if len(items) > 2 else "")
        rows.append([where, kind, str(len(items)), what or names, format_size(sum(i.bytes for i in items)),
                     items[0].reason])
    return rows


def item_rows(plan: CleanupPlan) -> list[list[str]]:
    return [[str(i.path), i.kind, format_size(i.bytes), i.reason] for i in plan.items]
