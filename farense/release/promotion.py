"""Promotion to production: immutable release directories and one atomically swapped symlink.

    <production_dir>/
        releases/<release-id>/     adapters/, config.json, training_summary.json,
                                   evaluation_report.json, evaluation_summary.csv, decision.json,
                                   release.json (manifest: SHA-256 and size of every file, written last)
        releases/<id>.tmp-<hex>/   a release being built (never read; removed by the next promotion)
        current -> releases/<id>   relative symlink, replaced with os.replace (atomic)
        history.json               log of every switch (promote, rollback)
        .promotion.lock            fcntl.flock: one promotion or rollback at a time

A promotion builds the release beside its final place, fsyncs every file and directory, renames it
into releases/, then swaps `current` by renaming a fresh symlink over it. A process killed at any
point leaves `current` on the old release or on the new one, never on a partial one. Each release
records the release that was current when it was built (`previous`), which `rollback` returns to.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from farense.config import DecisionConfig, config_from_json, current_workspace
from farense.errors import DecisionRefused, FarenseError
from farense.release.decision import (
    DECISION_NAME,
    RELEASE_MANIFEST,
    REPORT_NAME,
    Decision,
    compare_and_decide,
    incumbent_from_production,
    iso,
    read_decision,
    report_from_run,
)
from farense.run.fsutil import (
    atomic_write_json,
    commit_dir,
    fsync_dir,
    fsync_file,
    read_json_object,
    sha256_file,
    staged_dir,
    tmp_sibling,
)
from farense.run.layout import (
    ADAPTERS_FILE,
    CONFIG_FILE,
    SUMMARY_FILE,
    TMP_MARK,
    ProductionPaths,
    RunPaths,
    is_temporary,
)
from farense.run.locks import RunLock

RELEASE_FORMAT = "farense.release/1"
HISTORY_NAME = "history.json"
LOCK_NAME = ".promotion.lock"

# Points where `hook(step)` is called, in order; tests kill the process at each of them.
STEP_RELEASE_BUILT = "release-built"  # releases/.tmp-<id> complete and fsynced, not yet renamed
STEP_RELEASE_COMMITTED = "release-committed"  # renamed to releases/<id>, current not yet touched
STEP_SYMLINK_CREATED = "symlink-created"  # current.tmp-<hex> exists, not yet renamed over current
STEP_SWITCHED = "switched"  # current points at the new release, history not yet written
STEPS = (STEP_RELEASE_BUILT, STEP_RELEASE_COMMITTED, STEP_SYMLINK_CREATED, STEP_SWITCHED)

Hook = Callable[[str], None]


def utc_now() -> datetime:
    """The clock release ids are made from; tests pass `now=` or patch this."""
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Release:
    """One immutable release directory, as its manifest describes it."""

    id: str
    path: Path
    run_name: str
    created_at: str
    previous: str | None
    forced: bool
    config_name: str
    config_fingerprint: str
    adapters_sha256: str
    manifest: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> "Release":
        path = Path(path)
        try:
            m = orjson.loads((path / RELEASE_MANIFEST).read_bytes())
        except FileNotFoundError:
            raise FarenseError(f"not a release (no {RELEASE_MANIFEST}): {path}") from None
        except orjson.JSONDecodeError as e:
            raise FarenseError(f"release manifest is not valid JSON: {path / RELEASE_MANIFEST} ({e})") from None
        if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not isinstance(m.get("files", {}), dict):
            raise FarenseError(f"release manifest is not a release's: {path / RELEASE_MANIFEST} (expected an object "
                               "with an id and files)")
        return cls(
            id=m["id"], path=path, run_name=m.get("run_name", ""), created_at=m.get("created_at", ""),
            previous=m.get("previous"), forced=bool(m.get("forced")), config_name=m.get("config_name", ""),
            config_fingerprint=m.get("config_fingerprint", ""),
            adapters_sha256=m.get("files", {}).get(f"adapters/{ADAPTERS_FILE}", {}).get("sha256", ""),
            manifest=m,
        )

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


# --------------------------------------------------------------------------- reading production


def current_release(production_dir: Path) -> Release | None:
    """The release production/current points at; None when nothing has been promoted."""
    prod = ProductionPaths(Path(production_dir))
    if not os.path.lexists(prod.current):
        return None
    if not prod.current.is_symlink():
        raise FarenseError(f"{prod.current} is not a symlink; farense manages it as a link to releases/<id>")
    target = os.readlink(prod.current)
    path = (prod.root / target) if not os.path.isabs(target) else Path(target)
    if not path.is_dir():
        raise FarenseError(f"{prod.current} points at {target}, which does not exist")
    return Release.read(path)


def current_target(production_dir: Path) -> Path | None:
    """The real directory production/current points at (wherever that is); None when there is no link."""
    current = ProductionPaths(Path(production_dir)).current
    return Path(os.path.realpath(current)) if current.is_symlink() else None


def list_releases(production_dir: Path) -> list[Release]:
    """Committed releases, oldest first (ids start with their UTC creation time)."""
    releases = ProductionPaths(Path(production_dir)).releases
    if not releases.is_dir():
        return []
    out = []
    for p in sorted(releases.iterdir(), key=lambda p: p.name):
        if p.is_dir() and not is_temporary(p.name) and (p / RELEASE_MANIFEST).exists():
            out.append(Release.read(p))
    return out


def read_history(production_dir: Path) -> list[dict[str, Any]]:
    """Every switch of `current` so far (an audit log; `current` itself is the truth)."""
    p = Path(production_dir) / HISTORY_NAME
    if not p.exists():
        return []
    return orjson.loads(p.read_bytes()).get("events", [])


def verify_release(release: Release) -> None:
    """Check every file against the manifest; a release that does not verify is never switched to."""
    problems = []
    for rel, meta in release.manifest.get("files", {}).items():
        f = release.path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != meta["size"]:
            problems.append(f"{rel}: size {f.stat().st_size}, manifest says {meta['size']}")
        elif sha256_file(f) != meta["sha256"]:
            problems.append(f"{rel}: SHA-256 differs from the manifest")
    if problems:
        raise FarenseError(f"release {release.id} does not verify ({release.path}): " + "; ".join(problems))


# --------------------------------------------------------------------------- primitives


def _production_lock(prod: ProductionPaths) -> RunLock:
    """One promotion or rollback at a time (never waits: the second one is refused)."""
    return RunLock(prod.root / LOCK_NAME, command="promote", timeout=0.0,
                   busy=lambda info: f"another promotion or rollback holds {prod.root / LOCK_NAME} "
                                     f"({info.describe()}); try again when it ends")


def clean_temporaries(production_dir: Path) -> list[Path]:
    """Remove what killed promotions left: releases/.tmp-* and current.tmp-* links. Call under the lock."""
    prod = ProductionPaths(Path(production_dir))
    removed = []
    if prod.releases.is_dir():
        for p in prod.releases.iterdir():
            if is_temporary(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()
                removed.append(p)
    if prod.root.is_dir():
        for p in prod.root.iterdir():
            if p.name.startswith(prod.current.name + TMP_MARK):
                p.unlink()
                removed.append(p)
    if removed:
        fsync_dir(prod.root)
        if prod.releases.is_dir():
            fsync_dir(prod.releases)
    return removed


def _switch(prod: ProductionPaths, release_id: str, hook: Hook) -> None:
    """Point `current` at releases/<id>: a new relative symlink renamed over the old one."""
    tmp = tmp_sibling(prod.current)
    os.symlink(f"{prod.releases.name}/{release_id}", tmp)
    hook(STEP_SYMLINK_CREATED)
    if os.path.lexists(prod.current) and not prod.current.is_symlink():
        tmp.unlink()
        raise FarenseError(f"{prod.current} exists and is not a symlink; move it away, farense will not replace it")
    os.replace(tmp, prod.current)
    fsync_dir(prod.root)


def _append_history(prod: ProductionPaths, event: dict[str, Any]) -> None:
    events = read_history(prod.root)
    events.append(event)
    atomic_write_json(prod.root / HISTORY_NAME, {"events": events})


def _copy_file(src: Path, dst: Path) -> dict[str, Any]:
    shutil.copyfile(src, dst)
    fsync_file(dst)
    os.chmod(dst, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # releases are read-only
    return {"size": dst.stat().st_size, "sha256": sha256_file(dst)}


def _copy_release_files(run: RunPaths, tmp: Path, decision_path: Path | None) -> dict[str, Any]:
    """The run's adapters, config, summary, evaluation and decision, copied read-only and fsynced."""
    (tmp / "adapters").mkdir()
    files: dict[str, Any] = {}
    for f in sorted(run.adapters.iterdir()):
        if f.is_file():
            files[f"adapters/{f.name}"] = _copy_file(f, tmp / "adapters" / f.name)
    fsync_dir(tmp / "adapters")
    copies = [(run.config, CONFIG_FILE), (run.summary, SUMMARY_FILE),
              (run.evaluation / REPORT_NAME, REPORT_NAME),
              (run.evaluation / "evaluation_summary.csv", "evaluation_summary.csv")]
    if decision_path is not None:
        copies.append((decision_path, DECISION_NAME))
    for src, name in copies:
        if src.is_file():
            files[name] = _copy_file(src, tmp / name)
    return files


def _write_read_only(path: Path, obj: Any) -> None:
    path.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    fsync_file(path)
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _no_hook(step: str) -> None:
    return None


# --------------------------------------------------------------------------- promote / rollback


def _refusal_reasons(run: RunPaths, decision: Decision | None, decision_path: Path) -> list[str]:
    if decision is None:
        return [f"no decision found at {decision_path} (run `farense compare` or `farense promote` without --decision)"]
    reasons = []
    recorded = decision.input_sha256("candidate", "evaluation_report")
    actual = sha256_file(run.evaluation / REPORT_NAME)
    if recorded != actual:
        reasons.append(
            f"{decision_path} was made from a different evaluation of {run.name} (its evaluation_report.json "
            f"changed since: SHA-256 {str(recorded)[:12]} recorded, {actual[:12]} now); decide again"
        )
    for r in decision.failed_rules:
        reasons.append(f"{r.name} failed: {r.explanation}")
    return reasons


@dataclass(frozen=True)
class DecisionChoice:
    """The decision a promotion follows, and whether it was made just now."""

    path: Path
    decision: Decision
    reused: bool


def ensure_decision(run_dir: Path, production_dir: Path, thresholds: DecisionConfig) -> DecisionChoice:
    """The run's decision.json when it was made from the run's current evaluation (e.g. by
    `farense compare v1 v2`); otherwise a new decision against what production serves now, written
    (with the comparison) into the run's evaluation directory."""
    run = RunPaths(Path(run_dir))
    path = run.evaluation / DECISION_NAME
    report = run.evaluation / REPORT_NAME
    if path.exists() and report.exists():
        existing = read_decision(path)
        if existing.input_sha256("candidate", "evaluation_report") == sha256_file(report):
            return DecisionChoice(path, existing, True)
    out = compare_and_decide(incumbent_from_production(production_dir), report_from_run(run.root), thresholds,
                             out_dir=run.evaluation)
    return DecisionChoice(out.files["decision"], out.decision, False)


def _release_id(run_name: str, short: str, when: datetime, releases: Path) -> str:
    base = f"{when.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{run_name}-{short}"
    rid, n = base, 1
    while (releases / rid).exists():
        n += 1
        rid = f"{base}-{n}"
    return rid


def _run_config(run: RunPaths) -> dict[str, Any]:
    """The run's config.json as an object; a clear error when it is missing or is not one."""
    for needed in (run.best_adapters, run.best_adapter_config, run.config, run.evaluation / REPORT_NAME):
        if not needed.is_file():
            raise FarenseError(f"cannot promote {run.name}: {needed} not found (train and evaluate the run first)")
    config = read_json_object(run.config)
    if config is None:
        raise FarenseError(f"cannot promote {run.name}: {run.config} is not a JSON object (the run's resolved config)")
    return config


def evaluated_adapters_problem(run: RunPaths, adapters_sha: str) -> str | None:
    """Why the run's evaluation report does not describe the adapters it has now; None when it does."""
    report_path = run.evaluation / REPORT_NAME
    report = read_json_object(report_path) or {}
    evaluated = report.get("adapters")
    recorded = evaluated.get("sha256") if isinstance(evaluated, dict) else None
    again = f"evaluate again: farense evaluate {run.root}"
    if not isinstance(recorded, str):
        return f"{report_path} does not record which adapters it evaluated (no adapters.sha256); {again}"
    if recorded != adapters_sha:
        return (f"the adapters changed since they were evaluated: {run.best_adapters} has SHA-256 "
                f"{adapters_sha[:12]}, {report_path} describes {recorded[:12]}; {again}")
    return None


def _run_lock(run: RunPaths) -> RunLock:
    """Held while a promotion reads the run: refused (even with --force) while the run is training."""
    return RunLock(run.lock, command="promote", timeout=0.0,
                   busy=lambda info: f"cannot promote {run.name} while it is training ({info.describe()}): its "
                                     "adapters may still change; promote when it ends (--force does not override this)")


def promote(
    run_dir: Path,
    decision_path: Path | None = None,
    production_dir: Path | None = None,
    *,
    force: bool = False,
    now: datetime | None = None,
    hook: Hook | None = None,
) -> Release:
    """Make the run's best adapters the production release, atomically.

    Refused (DecisionRefused, naming every failed rule) when the decision does not say "preferred and
    ready", was made from another evaluation than the run's current one, or the adapters are not the
    ones evaluated, unless `force`; refused while the run is training, whatever `force` says. When the
    current release already serves these exact adapters, it is returned unchanged (unless `force`).
    `decision_path` defaults to the run's evaluation/decision.json, `production_dir` to the config's
    resolved in the current workspace (never the one recorded in the run's config.json). `hook(step)`
    is called at each of STEPS (tests kill the process there).
    """
    run = RunPaths(Path(run_dir).resolve())
    config = _run_config(run)
    if production_dir is None:
        production_dir = config_from_json(run.config, workspace=current_workspace()).production_dir
    prod = ProductionPaths(Path(production_dir).resolve())
    decision_path = Path(decision_path) if decision_path is not None else run.evaluation / DECISION_NAME
    decision = read_decision(decision_path) if decision_path.exists() else None
    with _run_lock(run):  # the adapters stay what was hashed until the release holds its copy
        adapters_sha = sha256_file(run.best_adapters)
        reasons = _refusal_reasons(run, decision, decision_path)
        if (changed := evaluated_adapters_problem(run, adapters_sha)) is not None:
            reasons.insert(0, changed)
        if reasons and not force:
            raise DecisionRefused(
                f"promotion of {run.name} refused:\n" + "\n".join(f"  - {r}" for r in reasons)
                + "\nuse --force (promote(..., force=True)) to promote anyway"
            )
        prod.releases.mkdir(parents=True, exist_ok=True)
        with _production_lock(prod):
            return _release(run, prod, config, decision, decision_path, adapters_sha, reasons,
                            force=force, when=now or utc_now(), hook=hook or _no_hook)


def _release(run: RunPaths, prod: ProductionPaths, config: dict[str, Any], decision: Decision | None,
             decision_path: Path, adapters_sha: str, reasons: list[str], *, force: bool, when: datetime,
             hook: Hook) -> Release:
    """Build the release and switch `current` to it (under the production lock)."""
    clean_temporaries(prod.root)
    incumbent = current_release(prod.root)
    if incumbent is not None and incumbent.adapters_sha256 == adapters_sha and not force:
        return incumbent
    rid = _release_id(run.name, adapters_sha[:8], when, prod.releases)
    final = prod.releases / rid
    meta = config.get("_meta") if isinstance(config.get("_meta"), dict) else {}
    with staged_dir(final) as tmp:
        files = _copy_release_files(run, tmp, decision_path if decision is not None else None)
        if files.get(f"adapters/{ADAPTERS_FILE}", {}).get("sha256") != adapters_sha:
            raise FarenseError(f"cannot promote {run.name}: {run.best_adapters} changed while it was copied")
        report = read_json_object(tmp / REPORT_NAME) or {}
        manifest = {
            "format": RELEASE_FORMAT,
            "id": rid,
            "created_at": iso(when),
            "run_name": run.name,
            "run_dir": str(run.root),
            "config_name": config.get("name", ""),
            "config_fingerprint": meta.get("fingerprint", ""),
            "previous": incumbent.id if incumbent else None,
            "forced": bool(force and reasons),
            "refusal_overridden": reasons if force else [],
            "decision": None if decision is None else {
                "verdict": decision.verdict, "preferred": decision.preferred, "ready": decision.ready,
                "failed_rules": [r.name for r in decision.failed_rules], "decided_at": decision.decided_at},
            "metrics": report.get("summary", {}),
            "files": files,
        }
        commit_dir(tmp, final, synced=True, manifest=lambda d: _write_read_only(d / RELEASE_MANIFEST, manifest),
                   before_rename=lambda: hook(STEP_RELEASE_BUILT))
    hook(STEP_RELEASE_COMMITTED)

    _switch(prod, rid, hook)
    hook(STEP_SWITCHED)
    _append_history(prod, {"at": iso(when), "action": "promote", "release": rid,
                           "previous": manifest["previous"], "run_name": run.name, "forced": manifest["forced"]})
    return Release.read(final)


def rollback(
    production_dir: Path, *, to: str | None = None, now: datetime | None = None, hook: Hook | None = None
) -> Release:
    """Switch production/current back to the release that was current before it (or to `to`)."""
    prod = ProductionPaths(Path(production_dir).resolve())
    hook = hook or _no_hook
    if not prod.root.is_dir():  # never created by a rollback: a mistyped --production must not leave one
        raise FarenseError(f"nothing to roll back: no production directory at {prod.root}")
    with _production_lock(prod):
        clean_temporaries(prod.root)
        current = current_release(prod.root)
        if current is None:
            raise FarenseError(f"nothing to roll back: {prod.current} does not exist (no release was promoted)")
        target_id = to or current.previous
        if target_id is None:
            raise FarenseError(
                f"release {current.id} was the first one promoted to {prod.root}; there is no previous release "
                "to roll back to"
            )
        if target_id == current.id:
            return current
        releases = {r.path.name: r for r in list_releases(prod.root)}
        if target_id not in releases:  # ids only: a path (`../../x`) is never a release
            known = ", ".join(releases) or "none"
            raise FarenseError(f"no release {target_id!r} in {prod.releases} (--to takes a release id; "
                               f"releases: {known})")
        target = releases[target_id]
        verify_release(target)
        _switch(prod, target_id, hook)
        hook(STEP_SWITCHED)
        _append_history(prod, {"at": iso(now or utc_now()), "action": "rollback", "release": target_id,
                               "previous": current.id, "run_name": target.run_name, "forced": False})
        return target
