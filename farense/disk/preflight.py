"""The disk preflight before any model loads: will the run fit where it writes, with memory to spare?

Reads the estimate (farense.disk.estimate), the cleanup plan (farense.disk.cleanup) and the disk guard's
watermarks (farense.disk.diskguard); cleans by policy when short, else stops with DiskFull naming the
command that would free more. The report renders as a table for the CLI and the Prefect artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from farense.config import ExperimentConfig, format_size
from farense.console import markdown_table
from farense.disk.cleanup import apply_cleanup, plan_for_config, referenced_models
from farense.disk.diskguard import (
    DiskGuard,
    Level,
    Usage,
    UsageFn,
    disk_usage,
    existing_path,
    flood_floor,
    mount_point,
)
from farense.disk.estimate import estimate_run, side_by_side
from farense.errors import DiskFull, NotWritable
from farense.run.fsutil import write_problem
from farense.run.layout import RunPaths


@dataclass(frozen=True)
class PreflightRow:
    """One filesystem the run writes to: what it will write there against what is free."""

    filesystem: str  # mount point
    device: int
    items: tuple[str, ...]  # what the run writes there
    writes: int  # bytes the run writes (known items)
    headroom: int  # what must stay free: max(reserve, flood level)
    free: int
    total: int
    cleanup_could_free: int
    unknown: tuple[str, ...] = ()  # items whose size could not be estimated
    item_bytes: tuple[int | None, ...] = ()  # per item, in the order of `items`
    reserve: int = 0  # disk.reserve
    flood_floor: int = 0  # free bytes under which the flood level starts here

    @property
    def needed(self) -> int:
        return self.writes + self.headroom

    def needs(self) -> list[tuple[str, int | None, str]]:
        """(what, bytes, why) rows whose bytes add up to `needed`: each item, then what must stay free."""
        rows: list[tuple[str, int | None, str]] = [(name, b, "" if b is not None else "size unknown: counted as 0")
                                                   for name, b in zip(self.items, self.item_bytes)]
        which = "disk.reserve" if self.reserve >= self.flood_floor else "the flood level"
        rows.append((f"kept free ({which})", self.headroom,
                     f"the larger of disk.reserve ({format_size(self.reserve)}) and the free space at which the "
                     f"guard stops the run (flood level, {format_size(self.flood_floor)} here)"))
        return rows

    @property
    def short(self) -> bool:
        return self.free < self.needed

    @property
    def verdict(self) -> str:
        if self.short:
            return "short" if self.free + self.cleanup_could_free < self.needed else "short: cleanup needed"
        return "ok" + (" (sizes partly unknown)" if self.unknown else "")

    def to_dict(self) -> dict[str, Any]:
        return {"filesystem": self.filesystem, "items": list(self.items), "writes": self.writes,
                "headroom": self.headroom, "needed": self.needed, "free": self.free, "total": self.total,
                "cleanup_could_free": self.cleanup_could_free, "unknown": list(self.unknown), "verdict": self.verdict}


@dataclass(frozen=True)
class MemoryCheck:
    model_bytes: int | None
    available: int
    total: int
    warning: str | None


@dataclass
class PreflightReport:
    """The preflight's answer: rows per filesystem, the estimate, memory, and any cleanup it ran."""

    config_name: str
    run_dir: Path
    rows: list[PreflightRow]
    estimate: Any  # estimate.RunEstimate
    memory: MemoryCheck
    warnings: list[str] = field(default_factory=list)
    cleanup: Any = None  # cleanup.CleanupResult when the preflight applied the policy
    cleanup_plan: Any = None  # cleanup.CleanupPlan

    @property
    def ok(self) -> bool:
        return not any(r.short for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_name,
            "run_dir": str(self.run_dir),
            "ok": self.ok,
            "rows": [r.to_dict() for r in self.rows],
            "estimate": self.estimate.to_dict(),
            "memory": {"model_bytes": self.memory.model_bytes, "available": self.memory.available,
                       "total": self.memory.total, "warning": self.memory.warning},
            "warnings": list(self.warnings),
            "cleanup": self.cleanup.to_dict() if self.cleanup is not None else None,
            "cleanup_could_free": self.cleanup_plan.total_bytes if self.cleanup_plan is not None else 0,
        }


# Beside the weights: activations, LoRA and optimizer tensors, the tokenizer, the runtime.
MEMORY_OVERHEAD = 1.3


def check_memory(model_bytes: int | None, *, memory: Callable[[], Any] | None = None) -> MemoryCheck:
    """Warn (never refuse) when available memory looks short for the model's weights."""
    import psutil

    vm = (memory or psutil.virtual_memory)()
    warning = None
    if model_bytes is not None and model_bytes * MEMORY_OVERHEAD > vm.available:
        warning = (f"memory: the model's weights need about {format_size(model_bytes)} "
                   f"(x{MEMORY_OVERHEAD} with activations and optimizer: {format_size(model_bytes * MEMORY_OVERHEAD)}), "
                   f"but only {format_size(vm.available)} of {format_size(vm.total)} is available; training may "
                   "swap or be killed. Close other programs, quantize (model.quantize_bits = 4) or lower batch_size.")
    return MemoryCheck(model_bytes, int(vm.available), int(vm.total), warning)


def output_dirs(config: ExperimentConfig) -> dict[str, Path]:
    """Every directory a run writes to, by the name a person knows it by."""
    return {"output.runs_dir": config.runs_dir, "the run directory": config.run_dir,
            "its checkpoints": RunPaths(config.run_dir).checkpoints, "output.production_dir": config.production_dir,
            "the workspace's .farense": Path(config.workspace) / ".farense"}


def check_writable(config: ExperimentConfig) -> None:
    """Before any model loads: each output directory takes a real write, or NotWritable names those that do not."""
    require_writable(output_dirs(config), f"{config.name} (nothing was loaded or written)",
                     "or point output.runs_dir / output.production_dir elsewhere")


def require_writable(dirs: dict[str, Path], doing: str, alternative: str = "or use another workspace") -> None:
    """NotWritable, in one line, naming each of `dirs` (by the name a person knows it by) where a probe write fails;
    directories not created yet are probed where they would be created."""
    failed: dict[tuple[Path, str], list[str]] = {}
    for what, path in dirs.items():
        problem = write_problem(path)
        if problem is not None:
            failed.setdefault(problem, []).append(what)
    if failed:
        where = "; ".join(f"{p}: not writable, {why} (for {', '.join(names)})" for (p, why), names in failed.items())
        them = "it" if sum(map(len, failed.values())) == 1 else "them"
        raise NotWritable(f"cannot write for {doing}: {where}; make {them} writable {alternative}")


def cleanup_command(config: ExperimentConfig, *, hf_cache: bool = False) -> str:
    cmd = f"farense cleanup --runs-dir {config.runs_dir} --production-dir {config.production_dir} --apply"
    return cmd + (" --hf-cache" if hf_cache else "")


def preflight(
    config: ExperimentConfig,
    *,
    usage: UsageFn = disk_usage,
    now: float | None = None,
    allow_cleanup: bool = True,
    older_than_days: float | None = None,
    include_hf_cache: bool = False,
    include_fused: bool = False,
    allow_network: bool = False,
    memory: Callable[[], Any] | None = None,
    estimate: Any = None,
    hf_cache_dir: Path | None = None,
    alongside: Sequence[ExperimentConfig] = (),
) -> PreflightReport:
    """Before any model is loaded: will the run fit? Cleans by policy if short, else raises DiskFull.

    `alongside`: runs that train at the same time as this one; their writes and memory count too.
    The DiskFull carries `.report` (the table) and names the command that would free space.
    """
    check_writable(config)
    est = estimate or estimate_run(config, include_fused=include_fused, cache_dir=hf_cache_dir,
                                   allow_network=allow_network)
    if alongside:
        est = side_by_side(est, [(c.run_name, estimate_run(c, include_fused=include_fused, cache_dir=hf_cache_dir,
                                                            allow_network=allow_network)) for c in alongside])
    refs = referenced_models(config.runs_dir) | {config.model.path} if include_hf_cache else set()
    plan_kw: dict[str, Any] = dict(older_than_days=older_than_days, now=now, include_hf_cache=include_hf_cache,
                                   referenced_models=refs, hf_cache_dir=hf_cache_dir)
    plan = plan_for_config(config, **plan_kw)
    rows = _rows(config, est, plan, usage)
    report = PreflightReport(config.name, config.run_dir, rows, est,
                             check_memory(est.model_memory_bytes, memory=memory), list(est.notes), None, plan)
    if any(r.short for r in rows) and allow_cleanup and plan.items:
        report.cleanup = apply_cleanup(plan)
        report.warnings += [f"cleanup: {e}" for e in report.cleanup.errors]
        report.cleanup_plan = plan_for_config(config, **plan_kw)
        report.rows = _rows(config, est, report.cleanup_plan, usage)
    if report.memory.warning:
        report.warnings.append(report.memory.warning)
    report.warnings += _watermark_warnings(config, report.rows, usage)
    if not report.ok:
        err = DiskFull(_short_message(config, report, include_hf_cache))
        err.report = report  # type: ignore[attr-defined]
        raise err
    return report


def _rows(config: ExperimentConfig, est: Any, plan: Any, usage: UsageFn) -> list[PreflightRow]:
    by_dev: dict[int, dict[str, Any]] = {}
    for item in est.items:
        where = existing_path(item.path)
        dev = os.stat(where).st_dev
        g = by_dev.setdefault(dev, {"path": where, "items": [], "bytes": [], "writes": 0, "unknown": []})
        g["items"].append(item.name)
        g["bytes"].append(item.bytes)
        if item.bytes is None:
            g["unknown"].append(item.name)
        else:
            g["writes"] += item.bytes
    could: dict[int, int] = {}
    for ci in plan.items:
        try:
            dev = os.stat(ci.path, follow_symlinks=False).st_dev
        except OSError:
            continue
        could[dev] = could.get(dev, 0) + ci.bytes
    rows = []
    for dev, g in by_dev.items():
        u = usage(g["path"])
        reserve, flood = int(config.disk.reserve), flood_floor(config.disk, u)
        rows.append(PreflightRow(str(mount_point(g["path"])), dev, tuple(g["items"]), g["writes"], max(reserve, flood),
                                 u.free, u.total, could.get(dev, 0), tuple(g["unknown"]), tuple(g["bytes"]),
                                 reserve, flood))
    return rows


def _watermark_warnings(config: ExperimentConfig, rows: list[PreflightRow], usage: UsageFn) -> list[str]:
    """Where the run will end at the low or high level: pruning will happen, say so now."""
    out = []
    guard = DiskGuard(config.disk, Path("."), usage=usage)
    for r in rows:
        if r.short:
            continue
        u = usage(Path(r.filesystem))
        after = Usage(u.total, u.used + r.writes, max(u.free - r.writes, 0))
        level = guard.raw_level(after)
        if level in (Level.LOW, Level.HIGH):
            out.append(f"{r.filesystem}: after this run {format_size(after.free)} will be free "
                       f"({after.used_percent:.1f}% used), at the {level.value} watermark: the guard will prune "
                       "checkpoints during the run")
    return out


def _short_message(config: ExperimentConfig, report: PreflightReport, hf_cache: bool) -> str:
    lines = [f"not enough disk space to start {config.name} (nothing was loaded or written):"]
    for r in report.rows:
        if r.short:
            lines.append(f"  {r.filesystem}: needs {format_size(r.needed)} ({format_size(r.writes)} for "
                         f"{', '.join(r.items)} + {format_size(r.headroom)} kept free: reserve or flood level), "
                         f"{format_size(r.free)} free, short by {format_size(r.needed - r.free)}")
    if report.cleanup is not None:
        lines.append(f"  the cleanup policy already ran and freed {format_size(report.cleanup.bytes_freed)}")
    could = report.cleanup_plan.total_bytes if report.cleanup_plan is not None else 0
    lines.append(f"  cleanup could free {format_size(could)} more: {cleanup_command(config, hf_cache=hf_cache)}"
                 + ("" if hf_cache else " (add --hf-cache to also drop unused models from the Hugging Face cache)"))
    lines.append("  or free space by other means, or move output.runs_dir to a larger disk, then start again.")
    return "\n".join(lines)


PREFLIGHT_HEADERS = ("filesystem", "needs", "free", "cleanup could free", "verdict")


def preflight_rows(report: PreflightReport) -> list[list[str]]:
    return [[r.filesystem, format_size(r.needed), format_size(r.free), format_size(r.cleanup_could_free), r.verdict]
            for r in report.rows]


NEEDS_HEADERS = ("what", "size", "bytes", "where / why")


def needs_rows(report: PreflightReport, row: PreflightRow) -> list[list[str]]:
    """One filesystem's needs, item by item and what stays free, then their total: the rows add up."""
    where = {i.name: f"{i.path}: {i.detail}" if i.detail else str(i.path) for i in report.estimate.items}
    lines = [[what, format_size(b or 0), f"{b or 0:,}", why or where.get(what, "")] for what, b, why in row.needs()]
    return lines + [["needs (total)", format_size(row.needed), f"{row.needed:,}", ""]]


def render_preflight(report: PreflightReport) -> str:
    """The preflight as Markdown (for Prefect artifacts and logs)."""
    parts = [f"## Disk preflight: {report.config_name} ({'ok' if report.ok else 'SHORT'})", "",
             markdown_table(PREFLIGHT_HEADERS, preflight_rows(report))]
    for row in report.rows:
        rows = needs_rows(report, row)
        parts += ["", f"### What the run needs on {row.filesystem}", "",
                  markdown_table(NEEDS_HEADERS, [*rows[:-1], [f"**{c}**" if c else c for c in rows[-1]]])]
    ck = report.estimate.checkpoint_bytes
    if ck is not None:
        parts += ["", f"One checkpoint: {format_size(ck)} ({report.estimate.lora_parameters:,} LoRA parameters; "
                      f"adapters {format_size(report.estimate.adapter_bytes)}, optimizer "
                      f"{format_size(report.estimate.optimizer_bytes)})."]
    if report.cleanup is not None:
        parts += ["", f"Cleanup ran first: freed {format_size(report.cleanup.bytes_freed)} "
                      f"({len(report.cleanup.deleted)} items)."]
    if report.warnings:
        parts += ["", "### Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(parts) + "\n"
