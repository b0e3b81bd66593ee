"""Successive halving as pure functions over the decision log: rungs, promotions, stops, the winner,
the same decisions however often the log is replayed, and ASHA's promotions before a rung is full."""

from __future__ import annotations

from typing import Any, Callable

from farense.release.halving import (
    PROMOTE,
    REPORT,
    STOP,
    WINNER,
    Halving,
    decide,
    next_jobs,
    rung_steps,
    stopped_per_rung,
    trial_statuses,
)


def _simulate(h: Halving, value: Callable[[str, int], float], concurrent: int = 1,
              events: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the campaign on made-up losses: `concurrent` jobs in flight, the oldest finishing first."""
    events = list(events or [])
    running: list[Any] = []
    while True:
        events += decide(h, events)
        for job in next_jobs(h, events, [j.trial for j in running])[: concurrent - len(running)]:
            running.append(job)
        if not running:
            return events
        job = running.pop(0)
        events.append({"kind": REPORT, "trial": job.trial, "rung": job.rung, "step": job.step,
                       "value": value(job.trial, job.step)})


def _loss(trial: str, step: int) -> float:
    # Trial i improves at rate i%5 ... a fixed landscape where the best early is not always best late.
    i = int(trial[1:])
    return 5.0 - step * (0.01 + 0.02 * ((i * 3) % 8)) / 4


def test_rung_steps() -> None:
    assert rung_steps(4, 24, 2) == [4, 8, 16, 24]
    assert rung_steps(3, 24, 2) == [3, 6, 12, 24]
    assert rung_steps(8, 8, 3) == [8]


def test_synchronous_halving_keeps_half_at_each_rung_and_picks_the_best() -> None:
    trials = tuple(f"t{i}" for i in range(8))
    h = Halving(trials, tuple(rung_steps(4, 24, 2)), eta=2)
    events = _simulate(h, _loss)
    stops = [e for e in events if e["kind"] == STOP]
    assert stopped_per_rung(h, events) == {0: 4, 1: 2, 2: 1}
    assert len(stops) == 7
    winner = [e for e in events if e["kind"] == WINNER]
    full = min(trials, key=lambda t: _loss(t, 24))
    assert len(winner) == 1 and winner[0]["trial"] == full
    steps = sum(e["step"] - ([0] + list(h.rungs))[e["rung"]] for e in events if e["kind"] == REPORT)
    assert steps == 8 * 4 + 4 * 4 + 2 * 8 + 1 * 8  # 72 of 192 steps
    statuses = {s.trial: s.status for s in trial_statuses(h, events)}
    assert statuses[full] == "winner" and sum(v.startswith("stopped") for v in statuses.values()) == 7


def test_replaying_the_log_after_any_prefix_gives_the_same_decisions() -> None:
    trials = tuple(f"t{i}" for i in range(8))
    h = Halving(trials, tuple(rung_steps(4, 24, 2)), eta=2)
    whole = _simulate(h, _loss)
    for cut in range(len(whole)):
        assert _simulate(h, _loss, events=whole[:cut]) == whole  # a restart continues the same log
        assert decide(h, whole) == []


def test_decisions_in_the_log_are_never_taken_back() -> None:
    h = Halving(("t0", "t1"), (4, 8), eta=2)
    events = [{"kind": REPORT, "trial": "t0", "rung": 0, "step": 4, "value": 1.0},
              {"kind": REPORT, "trial": "t1", "rung": 0, "step": 4, "value": 2.0},
              {"kind": PROMOTE, "trial": "t1", "rung": 0},  # made earlier (say, by another rule): kept
              {"kind": STOP, "trial": "t0", "rung": 0, "value": 1.0}]
    assert decide(h, events) == []
    assert [j.trial for j in next_jobs(h, events)] == ["t1"]


def test_a_rung_waits_for_every_trial_in_synchronous_mode_but_not_in_asha() -> None:
    trials = ("t0", "t1", "t2", "t3")
    events = [{"kind": REPORT, "trial": t, "rung": 0, "step": 4, "value": v} for t, v in (("t0", 1.0), ("t1", 2.0))]
    sync = Halving(trials, (4, 8), eta=2)
    assert decide(sync, events) == []
    asha = Halving(trials, (4, 8), eta=2, synchronous=False)
    assert decide(asha, events) == [{"kind": PROMOTE, "trial": "t0", "rung": 0}]
    # ASHA: the promoted trial trains at rung 1 before the trials not started yet.
    events += decide(asha, events)
    assert [(j.trial, j.rung) for j in next_jobs(asha, events)] == [("t0", 1), ("t2", 0), ("t3", 0)]


def test_asha_with_several_workers_ends_with_one_winner_and_fewer_steps() -> None:
    trials = tuple(f"t{i}" for i in range(8))
    h = Halving(trials, tuple(rung_steps(4, 24, 2)), eta=2, synchronous=False)
    events = _simulate(h, _loss, concurrent=3)
    assert sum(e["kind"] == WINNER for e in events) == 1
    steps = sum(e["step"] - ([0] + list(h.rungs))[e["rung"]] for e in events if e["kind"] == REPORT)
    assert steps <= 0.45 * 8 * 24
    assert all(s.status != "pending" for s in trial_statuses(h, events))
