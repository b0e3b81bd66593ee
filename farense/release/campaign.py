"""Owns a campaign: several configs trained one after the other (V1 then V2) and the choice between them.

Why: the seed compared V1 and V2 by hand. A campaign decides with the seed's rules: each config is
decided against the one before it (V2 against V1), the last one preferred over its predecessor
wins; a config that is not preferred leaves the win to its predecessor if that one passed its own
rules. The winner is promoted only if it is ready (F1 >= min_f1). The table puts the base model
(no adapters) beside every config, so a person sees what fine-tuning bought.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

from farense.console import markdown_table
from farense.release.decision import (
    DECISION_NAME,
    Decision,
    read_decision,
    report_from_run,
)
from farense.run.fsutil import atomic_write_bytes
from farense.run.layout import RunPaths

CAMPAIGN_JSON = "campaign.json"
CAMPAIGN_MD = "campaign.md"
BASE_DIR = ".base-model"  # under the runs directory; a dot keeps it out of run listings and cleanup
BASE_REPORT = "evaluation_report.json"
TABLE_HEADERS = ("model", "best val loss", "train/val gap", "gap status", "F1", "precision", "recall",
                 "exact match", "test loss")


@dataclass(frozen=True)
class CampaignEntry:
    """One trained config of the campaign and the decision made for it."""

    name: str
    run_dir: str
    decision_path: str


@dataclass(frozen=True)
class CampaignDecision:
    """Which config wins, whether it is ready, and every reason, in the order they were weighed."""

    winner: str | None
    winner_run_dir: str | None
    winner_decision: str | None  # the decision.json that allows (or refuses) promoting the winner
    ready: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def verdict(self) -> str:
        if self.winner is None:
            return "no config passed the rules; nothing to promote"
        return f"{self.winner} wins" + (", ready for production" if self.ready else ", not ready for production")


def choose_winner(entries: Sequence[CampaignEntry]) -> CampaignDecision:
    """Walk the configs in order: each later one must be preferred over the one before it to win."""
    decisions = [read_decision(Path(e.decision_path)) for e in entries]
    reasons: list[str] = []
    winner: int | None = 0 if decisions[0].preferred else None
    reasons.append(_line(entries[0].name, decisions[0], "by its own rules"))
    for i in range(1, len(entries)):
        d = decisions[i]
        reasons.append(_line(entries[i].name, d, f"against {entries[i - 1].name}"))
        if d.preferred:  # preferred over its predecessor (which passed its own rules or not)
            winner = i
    if winner is None:
        return CampaignDecision(None, None, None, False, tuple(reasons))
    e, d = entries[winner], decisions[winner]
    return CampaignDecision(e.name, e.run_dir, e.decision_path, d.ready, tuple(reasons))


def _line(name: str, d: Decision, against: str) -> str:
    rules = "; ".join(f"{r.name} {'pass' if r.passed else 'FAIL'} ({r.explanation})" for r in d.rules)
    state = "preferred" if d.preferred else "not preferred"
    return f"{name} ({against}): {state}, {'ready' if d.ready else 'not ready'}. {rules}"


def base_report_path(runs_dir: Path) -> Path:
    """Where the base model's evaluation (no adapters) of a campaign lives."""
    return Path(runs_dir) / BASE_DIR / BASE_REPORT


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def table_rows(base_report: dict[str, Any] | None, entries: Sequence[CampaignEntry]) -> list[list[str]]:
    """Base model, then each config: validation loss, gap and status, F1, precision, recall, exact match."""
    rows: list[list[str]] = []
    if base_report is not None:
        s = base_report["summary"]
        rows.append(["base model (no adapters)", "-", "-", "-", *(_fmt(s.get(k)) for k in
                     ("f1", "precision", "recall", "exact_match", "test_loss"))])
    for e in entries:
        r = report_from_run(Path(e.run_dir))
        summary = _read_summary(Path(e.run_dir))
        rows.append([e.name, _fmt(summary.get("best_val_loss")), _fmt(r.train_val_gap), r.gap_status or "-",
                     _fmt(r.f1), _fmt(r.precision), _fmt(r.recall), _fmt(r.exact_match), _fmt(r.test_loss)])
    return rows


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return orjson.loads(RunPaths(run_dir).summary.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def write_campaign(runs_dir: Path, rows: list[list[str]], decision: CampaignDecision,
                   entries: Sequence[CampaignEntry], timings: dict[str, float]) -> tuple[Path, Path]:
    """campaign.json and campaign.md beside the runs: the table, the decision, its reasons, timings."""
    body = {"table": {"headers": list(TABLE_HEADERS), "rows": rows},
            "winner": decision.winner, "ready": decision.ready, "verdict": decision.verdict,
            "reasons": list(decision.reasons), "runs": [e.__dict__ for e in entries],
            "stage_seconds": timings}
    jpath, mpath = Path(runs_dir) / CAMPAIGN_JSON, Path(runs_dir) / CAMPAIGN_MD
    atomic_write_bytes(jpath, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
    atomic_write_bytes(mpath, campaign_markdown(rows, decision).encode())
    return jpath, mpath


def campaign_markdown(rows: list[list[str]], decision: CampaignDecision) -> str:
    """The table and the decision with its reasons, as Markdown (artifact and campaign.md)."""
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    return (f"## Campaign\n\n{markdown_table(TABLE_HEADERS, rows)}\n\n**Decision: {decision.verdict}**\n\n"
            f"{reasons}\n")


def decision_path_of(run_dir: str | Path) -> str:
    """The decision.json a run's evaluation step wrote."""
    return str(RunPaths(Path(run_dir)).evaluation / DECISION_NAME)
