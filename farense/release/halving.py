"""Owns successive halving: rungs, which trial trains next and to which step, who stops, who wins.

Why: a campaign of N configs should not train N full runs. Each trial reports its validation loss
at rungs (optimizer steps min_resource * eta**k, then the full budget); at each rung only the best
1/eta go on, the others stop there. Everything here is a pure function of the campaign's decision
log (a list of events), so a campaign killed at any moment and started again takes the same
decisions, and decisions already in the log are never changed.

Two modes over the same rule (a trial at rung k goes on if it is among the best floor(n/eta) of
the n trials that reported at rung k):
- synchronous: rung k is decided once every trial that can reach it has reported (classic
  successive halving; deterministic, for small campaigns and tests);
- asynchronous (ASHA): a trial is promoted as soon as it is among the best of those reported so
  far, so free workers never wait for a rung to fill.
Written here rather than with Optuna: the rule is a few lines over our own log, and Optuna's
pruners would own a study database besides the log and decide inside the trainer's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

# Event kinds in the decision log.
REPORT = "report"  # a trial reached a rung: {"trial", "rung", "step", "value", "finished"}
PROMOTE = "promote"  # a trial goes on to rung+1: {"trial", "rung"}
STOP = "stop"  # a trial stops at a rung: {"trial", "rung", "value"}
WINNER = "winner"  # {"trial", "value"}


def rung_steps(min_resource: int, budget: int, eta: int) -> list[int]:
    """Optimizer steps of the rungs: min_resource * eta**k while below the budget, then the budget."""
    steps, r = [], min_resource
    while r < budget:
        steps.append(r)
        r *= eta
    return [*steps, budget]


@dataclass(frozen=True)
class Halving:
    """The rung schedule and the rule: trials (in order), rungs' steps, eta, and the mode."""

    trials: tuple[str, ...]
    rungs: tuple[int, ...]
    eta: int
    synchronous: bool = True


@dataclass(frozen=True)
class Train:
    """Train (or resume) `trial` until optimizer step `step`, then report at `rung`."""

    trial: str
    rung: int
    step: int


@dataclass
class _State:
    reports: dict[int, dict[str, float]]  # rung -> trial -> value
    finished: set[str]  # trials whose run ended by itself (early stopping) before the budget
    promoted: dict[int, set[str]]  # rung -> trials promoted from it
    stopped: dict[str, int]  # trial -> rung it stopped at
    winner: str | None


def replay(events: Iterable[dict[str, Any]]) -> _State:
    """The campaign's state from its decision log."""
    s = _State({}, set(), {}, {}, None)
    for e in events:
        kind, trial = e["kind"], e.get("trial")
        if kind == REPORT:
            s.reports.setdefault(e["rung"], {})[trial] = float(e["value"])
            if e.get("finished"):
                s.finished.add(trial)
        elif kind == PROMOTE:
            s.promoted.setdefault(e["rung"], set()).add(trial)
        elif kind == STOP:
            s.stopped[trial] = e["rung"]
        elif kind == WINNER:
            s.winner = trial
    return s


def _ranked(values: dict[str, float], order: Sequence[str]) -> list[str]:
    """Best (lowest) first; ties go to the trial listed first, so the choice is deterministic."""
    return sorted(values, key=lambda t: (values[t], order.index(t)))


def _entitled(s: _State, trial: str, rung: int) -> bool:
    """Whether `trial` may train towards `rung` (every trial may reach rung 0)."""
    return trial not in s.stopped and (rung == 0 or trial in s.promoted.get(rung - 1, set()))


def _closed(h: Halving, s: _State, rung: int) -> bool:
    """Every trial has reported at `rung` or stopped below it: no more reports can come there."""
    reported = s.reports.get(rung, {})
    return all(t in reported or s.stopped.get(t, len(h.rungs)) < rung for t in h.trials)


def decide(h: Halving, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decisions the log calls for now (promotions, stops, the winner), in a fixed order; [] if none."""
    s = replay(events)
    if s.winner is not None:
        return []
    out: list[dict[str, Any]] = []
    for rung in range(len(h.rungs) - 1):
        reported = s.reports.get(rung, {})
        closed = _closed(h, s, rung)
        if h.synchronous and not closed:
            break  # synchronous: a rung is decided only when it is full
        keep = _ranked(reported, h.trials)[: max(1, len(reported) // h.eta)] if closed else \
            _ranked(reported, h.trials)[: len(reported) // h.eta]
        done = s.promoted.get(rung, set()) | {t for t, r in s.stopped.items() if r == rung}
        for t in keep:
            if t not in done:
                out.append({"kind": PROMOTE, "trial": t, "rung": rung})
                s.promoted.setdefault(rung, set()).add(t)
        if closed:
            for t in _ranked(reported, h.trials):
                if t not in s.promoted.get(rung, set()) and t not in s.stopped:
                    out.append({"kind": STOP, "trial": t, "rung": rung, "value": reported[t]})
                    s.stopped[t] = rung
    top = len(h.rungs) - 1
    if _closed(h, s, top) and s.reports.get(top):
        best = _ranked(s.reports[top], h.trials)[0]
        out.append({"kind": WINNER, "trial": best, "value": s.reports[top][best]})
    return out


def next_jobs(h: Halving, events: Sequence[dict[str, Any]], running: Iterable[str] = ()) -> list[Train]:
    """What may train now, highest rung first (finishing a promising trial beats starting a new one),
    then in trial order; trials in `running` are left out. Call `decide` first: its decisions count."""
    s, busy = replay(events), set(running)
    if s.winner is not None:
        return []
    jobs: list[Train] = []
    for rung in reversed(range(len(h.rungs))):
        for t in h.trials:
            if t in busy or t in s.reports.get(rung, {}) or not _entitled(s, t, rung):
                continue
            if rung and t not in s.reports.get(rung - 1, {}):
                continue
            jobs.append(Train(t, rung, h.rungs[rung]))
            busy.add(t)
    return jobs


@dataclass(frozen=True)
class TrialStatus:
    """One trial as the log tells it: the highest rung reached, its last reported value, its status."""

    trial: str
    rung: int | None
    step: int | None
    value: float | None
    status: str  # pending, running-rung-k, stopped, finished, winner


def trial_statuses(h: Halving, events: Sequence[dict[str, Any]]) -> list[TrialStatus]:
    s = replay(events)
    out = []
    for t in h.trials:
        reached = [r for r in s.reports if t in s.reports[r]]
        rung = max(reached) if reached else None
        value = s.reports[rung][t] if rung is not None else None
        step = h.rungs[rung] if rung is not None else None
        if s.winner == t:
            status = "winner"
        elif t in s.stopped:
            status = f"stopped at rung {s.stopped[t]}"
        elif rung == len(h.rungs) - 1:
            status = "finished"
        elif rung is None:
            status = "pending"
        else:
            status = f"reached rung {rung}"
        out.append(TrialStatus(t, rung, step, value, status))
    return out


def stopped_per_rung(h: Halving, events: Sequence[dict[str, Any]]) -> dict[int, int]:
    """How many trials stopped at each rung (for the notification)."""
    counts: dict[int, int] = {}
    for rung in replay(events).stopped.values():
        counts[rung] = counts.get(rung, 0) + 1
    return dict(sorted(counts.items()))
