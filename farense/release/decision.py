"""Comparing two evaluated runs and deciding, with the seed's rules, which one production gets.

The seed compared V1 with V2 by hand. Here a `RunReport` is read from a run directory (or from a
production release), `compare` puts two side by side, and `decide` applies the rules with the
thresholds of the config's [decision] section:

    gap_below_max                        candidate gap  <  max_gap                 (preference)
    f1_at_least_min                      candidate F1   >= min_f1                  (preference)
    f1_not_meaningfully_below_incumbent  candidate F1   >= incumbent F1 - max_f1_drop
                                         (passes when there is no incumbent)       (preference)
    ready_for_production                 candidate F1   >= min_f1                  (readiness)

Comparisons treat values within TOLERANCE (1e-9) of a threshold as equal to it, so an F1 of
0.9299999999999999 (the mean of 0.92 and 0.94) meets min_f1 = 0.93 and a gap of
0.15000000000000002 (0.45 - 0.30) is not below max_gap = 0.15. Every rule is written into
decision.json with its inputs, threshold and outcome, beside the SHA-256 of each file it read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from farense.config import DecisionConfig
from farense.console import markdown_table
from farense.errors import FarenseError
from farense.overfitting import GapReading
from farense.run.fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from farense.run.layout import SUMMARY_FILE, ProductionPaths, RunPaths
from farense.run.summary import TrainingSummary

TOLERANCE = 1e-9
REPORT_NAME = "evaluation_report.json"
DECISION_NAME = "decision.json"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
RELEASE_MANIFEST = "release.json"
DECISION_FORMAT = "farense.decision/1"


def utc_now() -> datetime:
    """The clock decisions are stamped with; tests patch `farense.decision.utc_now`."""
    return datetime.now(timezone.utc)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _mtime(path: Path) -> str:
    return iso(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class InputFile:
    """A file a decision read, with what it held when read."""

    role: str  # candidate | incumbent
    kind: str  # evaluation_report | training_summary
    path: str
    sha256: str
    modified_at: str

    @classmethod
    def of(cls, role: str, kind: str, path: Path) -> "InputFile":
        return cls(role, kind, str(path), sha256_file(path), _mtime(path))

    def to_dict(self) -> dict[str, str]:
        return dict(role=self.role, kind=self.kind, path=self.path, sha256=self.sha256, modified_at=self.modified_at)


@dataclass(frozen=True)
class RunReport:
    """What compare and decide need about one evaluated run (or production release)."""

    name: str
    kind: str  # "run" or "release"
    path: Path
    evaluation_report: Path
    evaluation_sha256: str
    f1: float
    precision: float
    recall: float
    exact_match: float
    test_loss: float | None
    test_perplexity: float | None
    examples: int
    config_name: str = ""
    config_fingerprint: str = ""
    train_val_gap: float | None = None  # best_val_loss - train_loss_at_best (farense.overfitting)
    gap_status: str | None = None
    best_val_loss: float | None = None
    train_loss_at_best: float | None = None
    train_loss_steps_at_best: int | None = None
    best_step: int | None = None
    final_step: int | None = None
    early_stopped: bool | None = None
    early_stop_step: int | None = None
    training_time_seconds: float | None = None
    training_summary: Path | None = None
    training_summary_sha256: str | None = None
    release_id: str | None = None
    evaluated_at: str | None = None

    def input_files(self, role: str) -> list[InputFile]:
        out = [InputFile(role, "evaluation_report", str(self.evaluation_report), self.evaluation_sha256,
                         _mtime(self.evaluation_report))]
        if self.training_summary is not None and self.training_summary_sha256:
            out.append(InputFile(role, "training_summary", str(self.training_summary), self.training_summary_sha256,
                                 _mtime(self.training_summary)))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "release_id": self.release_id,
                "config_name": self.config_name, "config_fingerprint": self.config_fingerprint}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise FarenseError(f"{what} not found: {path}") from None
    except orjson.JSONDecodeError as e:
        raise FarenseError(f"{what} is not valid JSON: {path} ({e})") from None
    if not isinstance(data, dict):
        raise FarenseError(f"{what} is not a JSON object: {path} (got {type(data).__name__})")
    return data


REPORT_METRICS = ("f1", "precision", "recall", "exact_match")


def _metrics(report: dict[str, Any], report_path: Path) -> dict[str, Any]:
    """The report's summary: the four metrics as finite numbers, the optional ones numbers or None."""
    s = report.get("summary") or {}
    if not isinstance(s, dict):
        raise FarenseError(f"{report_path}: summary is {type(s).__name__}, expected an object "
                           "(was it written by farense evaluate?)")
    missing = [k for k in REPORT_METRICS if s.get(k) is None]
    if missing:
        raise FarenseError(f"{report_path}: summary lacks {', '.join(missing)} (was it written by farense evaluate?)")
    bad = [f"{k}={s[k]!r}" for k in REPORT_METRICS if not _finite_number(s[k])]
    bad += [f"{k}={s[k]!r}" for k in ("test_loss", "test_perplexity", "examples")
            if s.get(k) is not None and not _finite_number(s[k])]
    if bad:
        raise FarenseError(f"{report_path}: summary has {', '.join(bad)}; expected numbers "
                           "(was it written by farense evaluate?)")
    return s


def _training_fields(d: Any) -> dict[str, Any]:
    """The training summary's keys present in `d`, each of its declared type (a damaged value reads as unknown)."""
    if not isinstance(d, dict):
        return {}
    typed = TrainingSummary.from_json(d).to_json()
    return {k: typed[k] for k in d if k in typed}


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _report_from_files(
    name: str, kind: str, path: Path, report_path: Path, summary_path: Path | None, release_id: str | None = None
) -> RunReport:
    report = _read_json(report_path, "evaluation report")
    s = _metrics(report, report_path)
    training = _training_fields(report.get("training"))
    summary_sha = None
    if summary_path is not None and summary_path.exists():
        training.update(_training_fields(_read_json(summary_path, "training summary")))
        summary_sha = sha256_file(summary_path)
    else:
        summary_path = None
    return RunReport(
        name=name,
        kind=kind,
        path=path,
        evaluation_report=report_path,
        evaluation_sha256=sha256_file(report_path),
        f1=float(s["f1"]),
        precision=float(s["precision"]),
        recall=float(s["recall"]),
        exact_match=float(s["exact_match"]),
        test_loss=s.get("test_loss"),
        test_perplexity=s.get("test_perplexity"),
        examples=int(s.get("examples") or 0),
        config_name=_text(report.get("config_name", training.get("config_name"))),
        config_fingerprint=_text(report.get("config_fingerprint", training.get("fingerprint"))),
        train_val_gap=training.get("train_val_gap"),
        gap_status=training.get("gap_status"),
        best_val_loss=training.get("best_val_loss"),
        train_loss_at_best=training.get("train_loss_at_best"),
        train_loss_steps_at_best=training.get("train_loss_steps_at_best"),
        best_step=training.get("best_step"),
        final_step=training.get("final_step"),
        early_stopped=training.get("early_stopped"),
        early_stop_step=training.get("early_stop_step"),
        training_time_seconds=training.get("training_time_seconds"),
        training_summary=summary_path,
        training_summary_sha256=summary_sha,
        release_id=release_id,
        evaluated_at=_text(report.get("created_at")) or None,
    )


def report_from_run(run_dir: Path) -> RunReport:
    """The evaluated run at `run_dir` (its evaluation/evaluation_report.json and training_summary.json)."""
    paths = RunPaths(Path(run_dir))
    report_path = paths.evaluation / REPORT_NAME
    if not report_path.exists():
        raise FarenseError(f"run {paths.name} has not been evaluated: {report_path} not found (run `farense evaluate {paths.root}`)")
    return _report_from_files(paths.name, "run", paths.root, report_path, paths.summary)


def report_from_release(release_dir: Path) -> RunReport:
    """A production release, read from its own copies of the evaluation and training summary."""
    release_dir = Path(release_dir)
    manifest = _read_json(release_dir / RELEASE_MANIFEST, "release manifest")
    return _report_from_files(
        manifest.get("run_name", release_dir.name), "release", release_dir, release_dir / REPORT_NAME,
        release_dir / SUMMARY_FILE, release_id=manifest.get("id", release_dir.name),
    )


def incumbent_from_production(production_dir: Path) -> RunReport | None:
    """The release production/current points at, or None when nothing is in production yet."""
    current = ProductionPaths(Path(production_dir)).current
    if not os.path.lexists(current):
        return None
    return report_from_release(current.resolve())


def load_report(path: Path) -> RunReport:
    """A run directory, a release directory, or a production directory (its current release)."""
    path = Path(path)
    if (path / RELEASE_MANIFEST).exists():
        return report_from_release(path)
    if os.path.lexists(ProductionPaths(path).current):
        inc = incumbent_from_production(path)
        assert inc is not None
        return inc
    return report_from_run(path)


PRODUCTION = "production"  # the incumbent named by default: what production/current serves


def incumbent_dir(spec: str, config_run_dir: Callable[[str], Path]) -> Path | None:
    """Where the incumbent `spec` names lives: None for production, else a run, release or production
    directory given as a path, or the run directory of a config name (`config_run_dir` resolves it)."""
    if spec == PRODUCTION:
        return None
    p = Path(spec)
    return p.resolve() if p.is_dir() else config_run_dir(spec)


def load_incumbent(spec: str, production_dir: Path, config_run_dir: Callable[[str], Path]) -> RunReport | None:
    """The report a candidate is compared with; None when `spec` is production and nothing was promoted."""
    where = incumbent_dir(spec, config_run_dir)
    return incumbent_from_production(production_dir) if where is None else load_report(where)


def check_incumbent(spec: str, config_run_dir: Callable[[str], Path]) -> None:
    """Fail before training if the run to compare with has no evaluation (production may be empty)."""
    where = incumbent_dir(spec, config_run_dir)
    if where is not None and not (RunPaths(where).evaluation / REPORT_NAME).is_file():
        raise FarenseError(
            f"compare_with={spec!r}: {where} has no evaluation report; train and evaluate it first "
            f"(e.g. run this flow with config={spec!r})"
        )


# --------------------------------------------------------------------------- comparison


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_seconds(v: float | None) -> str:
    if v is None:
        return "-"
    m, s = divmod(int(round(v)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# (key, label, direction): +1 higher is better, -1 lower is better, 0 not ranked
METRICS: tuple[tuple[str, str, int], ...] = (
    ("f1", "F1", +1),
    ("precision", "precision", +1),
    ("recall", "recall", +1),
    ("exact_match", "exact match", +1),
    ("test_loss", "test loss", -1),
    ("test_perplexity", "test perplexity", -1),
    ("train_val_gap", "train/validation gap", -1),
    ("gap_status", "gap status", 0),
    ("best_step", "best step", 0),
    ("final_step", "steps run", 0),
    ("early_stopped", "early stopped", 0),
    ("training_time_seconds", "training time", 0),
    ("examples", "test examples", 0),
)


@dataclass(frozen=True)
class ComparisonRow:
    key: str
    label: str
    a: Any
    b: Any
    delta: float | None  # b - a for numbers
    better: str | None  # "a", "b", "same" or None when not ranked


@dataclass(frozen=True)
class Comparison:
    """Two runs side by side: A (the incumbent, e.g. V1 or production) and B (the candidate)."""

    a: RunReport
    b: RunReport
    rows: tuple[ComparisonRow, ...]
    created_at: str

    def row(self, key: str) -> ComparisonRow:
        return next(r for r in self.rows if r.key == key)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "farense.comparison/1",
            "created_at": self.created_at,
            "a": self.a.describe() | {"evaluation_sha256": self.a.evaluation_sha256},
            "b": self.b.describe() | {"evaluation_sha256": self.b.evaluation_sha256},
            "rows": [
                {"key": r.key, "label": r.label, "a": r.a, "b": r.b, "delta": r.delta, "better": r.better}
                for r in self.rows
            ],
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        headers = ["metric", _label(self.a), _label(self.b), "delta (B - A)", "better"]
        rows = []
        for r in self.rows:
            if r.key == "training_time_seconds":
                a, b = _fmt_seconds(r.a), _fmt_seconds(r.b)
                delta = "-" if r.delta is None else ("+" if r.delta >= 0 else "-") + _fmt_seconds(abs(r.delta))
            else:
                a, b = _fmt(r.a), _fmt(r.b)
                delta = "-" if r.delta is None else f"{r.delta:+.4f}" if isinstance(r.delta, float) else f"{r.delta:+d}"
            better = {"a": _label(self.a), "b": _label(self.b), "same": "="}.get(r.better or "", "")
            rows.append([r.label, a, b, delta, better])
        return headers, rows

    def to_markdown(self) -> str:
        headers, rows = self.table()
        return f"## {_label(self.a)} vs {_label(self.b)}\n\n" + markdown_table(headers, rows) + "\n"


def _label(r: RunReport) -> str:
    return f"production ({r.release_id})" if r.kind == "release" else r.name


def compare(a: RunReport, b: RunReport) -> Comparison:
    """Put A (incumbent) and B (candidate) side by side, saying which is better where it is ranked."""
    rows = []
    for key, label, direction in METRICS:
        va, vb = getattr(a, key), getattr(b, key)
        delta: float | None = None
        better: str | None = None
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            delta = vb - va
            if direction:
                if abs(delta) <= TOLERANCE:
                    better = "same"
                else:
                    better = "b" if (delta > 0) == (direction > 0) else "a"
        rows.append(ComparisonRow(key, label, va, vb, delta, better))
    return Comparison(a, b, tuple(rows), iso(utc_now()))


# --------------------------------------------------------------------------- decision


def at_least(value: float, threshold: float) -> bool:
    """value >= threshold, values within TOLERANCE of the threshold counting as equal."""
    return value >= threshold - TOLERANCE


def strictly_below(value: float, threshold: float) -> bool:
    """value < threshold, values within TOLERANCE of the threshold counting as equal (so not below)."""
    return value < threshold - TOLERANCE


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # "preference" or "readiness"
    inputs: dict[str, Any]
    threshold: float
    comparison: str
    passed: bool
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inputs": self.inputs, "threshold": self.threshold,
                "comparison": self.comparison, "passed": self.passed, "explanation": self.explanation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rule":
        return cls(d["name"], d["kind"], d["inputs"], d["threshold"], d["comparison"], d["passed"], d["explanation"])


@dataclass(frozen=True)
class Decision:
    """The outcome of the rules for one candidate, with everything needed to audit it later."""

    candidate: dict[str, Any]
    incumbent: dict[str, Any] | None
    thresholds: dict[str, float]
    rules: tuple[Rule, ...]
    inputs: tuple[InputFile | dict[str, Any], ...]
    decided_at: str
    tolerance: float = TOLERANCE

    @property
    def preferred(self) -> bool:
        """Every preference rule passed: the candidate beats (or replaces) the incumbent."""
        return all(r.passed for r in self.rules if r.kind == "preference")

    @property
    def ready(self) -> bool:
        """F1 reaches the production threshold."""
        return all(r.passed for r in self.rules if r.kind == "readiness")

    @property
    def promote(self) -> bool:
        return self.preferred and self.ready

    @property
    def failed_rules(self) -> list[Rule]:
        return [r for r in self.rules if not r.passed]

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)

    def input_sha256(self, role: str, kind: str) -> str | None:
        for f in self.inputs:
            d = f.to_dict() if isinstance(f, InputFile) else f
            if d["role"] == role and d["kind"] == kind:
                return d["sha256"]
        return None

    @property
    def verdict(self) -> str:
        name = self.candidate.get("name", "candidate")
        if self.promote:
            return f"{name} is preferred and ready for production"
        why = "; ".join(f"{r.name}: {r.explanation}" for r in self.failed_rules)
        state = "preferred but not ready for production" if self.preferred else "not preferred"
        return f"{name} is {state} ({why})"

    @property
    def short_verdict(self) -> str:
        """The verdict in a few words, for a card or a subject line: 'v2: not preferred, not ready (gap, F1)'."""
        name = self.candidate.get("name", "candidate")
        if self.promote:
            return f"{name}: preferred and ready for production"
        state = ("preferred" if self.preferred else "not preferred") + (", ready" if self.ready else ", not ready")
        failed = list(dict.fromkeys(_RULE_SHORT.get(r.name, r.name) for r in self.failed_rules))
        return f"{name}: {state} ({', '.join(failed)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DECISION_FORMAT,
            "decided_at": self.decided_at,
            "candidate": self.candidate,
            "incumbent": self.incumbent,
            "thresholds": self.thresholds,
            "tolerance": self.tolerance,
            "rules": [r.to_dict() for r in self.rules],
            "preferred": self.preferred,
            "ready": self.ready,
            "promote": self.promote,
            "failed_rules": [r.name for r in self.failed_rules],
            "verdict": self.verdict,
            "inputs": [f.to_dict() if isinstance(f, InputFile) else f for f in self.inputs],
        }

    def to_markdown(self) -> str:
        rows = [[r.name, r.kind, r.comparison, "pass" if r.passed else "FAIL", r.explanation] for r in self.rules]
        return (f"## Decision: {self.short_verdict}\n\n"
                + markdown_table(["rule", "kind", "condition", "result", "explanation"], rows) + "\n\n"
                + "Preference rules decide whether the candidate replaces the incumbent; readiness, whether it "
                  "may serve production. Promotion needs both.\n")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Decision":
        if d.get("format") != DECISION_FORMAT:
            raise FarenseError(f"not a farense decision (format {d.get('format')!r}, expected {DECISION_FORMAT!r})")
        return cls(
            candidate=d["candidate"], incumbent=d.get("incumbent"), thresholds=d["thresholds"],
            rules=tuple(Rule.from_dict(r) for r in d["rules"]), inputs=tuple(d.get("inputs", ())),
            decided_at=d["decided_at"], tolerance=d.get("tolerance", TOLERANCE),
        )


# What a failed rule is called in a short verdict.
_RULE_SHORT = {"gap_below_max": "gap", "f1_at_least_min": "F1", "ready_for_production": "F1",
               "f1_not_meaningfully_below_incumbent": "F1 below incumbent"}


def _gap_rule(c: RunReport, t: DecisionConfig) -> Rule:
    gap = c.train_val_gap
    reading = GapReading.of(c.best_val_loss, c.train_loss_at_best, c.train_loss_steps_at_best)
    inputs = {"train_val_gap": gap, "gap_status": c.gap_status, "best_val_loss": c.best_val_loss,
              "train_loss_at_best": c.train_loss_at_best, "train_loss_steps_at_best": c.train_loss_steps_at_best}
    if not _finite(gap):
        return Rule("gap_below_max", "preference", inputs, t.max_gap, "train_val_gap < max_gap", False,
                    "no finite train/validation gap recorded (training_summary.json missing or without validation)")
    passed = strictly_below(gap, t.max_gap)
    rel = "<" if passed else ">="
    # The losses the gap is made of, as the log and the training summary show them; the gap alone when the
    # record does not have them (older summaries) or they do not make this gap (a hand-edited file).
    if reading is None or abs(reading.gap - gap) > TOLERANCE:
        said = f"gap {gap:.4f}"
    else:
        said = f"at the best step, {reading.describe()}"
    return Rule("gap_below_max", "preference", inputs, t.max_gap, "train_val_gap < max_gap", passed,
                f"{said} {rel} {t.max_gap}" + (f" ({c.gap_status})" if c.gap_status else ""))


def _f1_rule(name: str, kind: str, c: RunReport, t: DecisionConfig) -> Rule:
    passed = at_least(c.f1, t.min_f1)
    rel = ">=" if passed else "<"
    return Rule(name, kind, {"f1": c.f1}, t.min_f1, "f1 >= min_f1", passed, f"F1 {c.f1:.4f} {rel} {t.min_f1}")


def _drop_rule(c: RunReport, inc: RunReport | None, t: DecisionConfig) -> Rule:
    cond = "f1 - incumbent_f1 >= -max_f1_drop"
    if inc is None:
        return Rule("f1_not_meaningfully_below_incumbent", "preference", {"f1": c.f1, "incumbent_f1": None},
                    t.max_f1_drop, cond, True, "no incumbent to compare with")
    delta = c.f1 - inc.f1
    passed = at_least(delta, -t.max_f1_drop)
    inputs = {"f1": c.f1, "incumbent_f1": inc.f1, "delta": delta, "incumbent": _label(inc)}
    if passed:
        text = f"F1 {c.f1:.4f} vs {_label(inc)} {inc.f1:.4f} (delta {delta:+.4f}, allowed drop {t.max_f1_drop})"
    else:
        text = f"F1 {c.f1:.4f} trails {_label(inc)} {inc.f1:.4f} by {-delta:.4f}, more than {t.max_f1_drop}"
    return Rule("f1_not_meaningfully_below_incumbent", "preference", inputs, t.max_f1_drop, cond, passed, text)


def decide(candidate: RunReport, incumbent: RunReport | None, thresholds: DecisionConfig) -> Decision:
    """Apply the seed's rules to a candidate (against an incumbent, if there is one)."""
    rules = (
        _gap_rule(candidate, thresholds),
        _f1_rule("f1_at_least_min", "preference", candidate, thresholds),
        _drop_rule(candidate, incumbent, thresholds),
        _f1_rule("ready_for_production", "readiness", candidate, thresholds),
    )
    inputs = candidate.input_files("candidate") + (incumbent.input_files("incumbent") if incumbent else [])
    return Decision(
        candidate=candidate.describe() | {"evaluation_sha256": candidate.evaluation_sha256},
        incumbent=(incumbent.describe() | {"evaluation_sha256": incumbent.evaluation_sha256}) if incumbent else None,
        thresholds={"max_gap": thresholds.max_gap, "min_f1": thresholds.min_f1, "max_f1_drop": thresholds.max_f1_drop},
        rules=rules,
        inputs=tuple(inputs),
        decided_at=iso(utc_now()),
    )


def write_decision(decision: Decision, path: Path) -> Path:
    """decision.json, atomically."""
    atomic_write_json(path, decision.to_json())
    return path


def read_decision(path: Path) -> Decision:
    return Decision.from_json(_read_json(Path(path), "decision"))


def write_comparison(comparison: Comparison, directory: Path, decision: Decision | None = None) -> tuple[Path, Path]:
    """comparison.json and comparison.md (with the decision's rules, when given) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    j, m = directory / COMPARISON_JSON, directory / COMPARISON_MD
    payload = comparison.to_json()
    md = comparison.to_markdown()
    if decision is not None:
        payload["decision"] = {"verdict": decision.verdict, "preferred": decision.preferred, "ready": decision.ready}
        md += "\n" + decision.to_markdown()
    atomic_write_json(j, payload)
    atomic_write_bytes(m, md.encode())
    return j, m


@dataclass(frozen=True)
class ComparisonOutcome:
    comparison: Comparison | None
    decision: Decision
    files: dict[str, Path] = field(default_factory=dict)


def compare_and_decide(
    incumbent: RunReport | None, candidate: RunReport, thresholds: DecisionConfig, *, out_dir: Path | None = None
) -> ComparisonOutcome:
    """Compare (when there is an incumbent) and decide; with out_dir, write comparison.json/.md and
    decision.json there (the candidate's evaluation directory)."""
    decision = decide(candidate, incumbent, thresholds)
    comparison = compare(incumbent, candidate) if incumbent is not None else None
    files: dict[str, Path] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if comparison is not None:
            files["comparison_json"], files["comparison_md"] = write_comparison(comparison, out_dir, decision)
        files["decision"] = write_decision(decision, out_dir / DECISION_NAME)
    return ComparisonOutcome(comparison, decision, files)
