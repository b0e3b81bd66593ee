"""Owns running a campaign's trials: the decision log on disk, training a trial to a rung, the loop.

Why: a campaign must survive SIGKILL at any moment like a single run does. Its only state besides
the trials' own runs is campaign_log.json in the campaign directory (written atomically): the
trials, and the events (reports at rungs, promotions, stops, the winner) from which
farense.release.halving decides. A trial is trained to a rung by an ordinary run of its config
(the full budget's schedule) that stops cleanly at the rung's step (checkpoint written, exactly
like a preemption); going on later is an ordinary resume. Before training, the run's own files
are read: a trial already at or past its rung (killed after training, before the log was written)
is not trained again, so no trial's step count goes backwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from farense.config import ExperimentConfig
from farense.errors import ConfigError, Preempted
from farense.release.campaign_file import CampaignSpec, Trial
from farense.release.halving import (
    REPORT,
    STOP,
    WINNER,
    Train,
    decide,
    next_jobs,
    stopped_per_rung,
    trial_statuses,
)
from farense.run.checkpoint import CheckpointStore
from farense.run.fsutil import atomic_write_bytes, read_json_object
from farense.run.layout import RunPaths
from farense.run.metrics import read_metrics
from farense.run.summary import TrainingSummary
from farense.signals import PreemptionFlag
from farense.train.runner import run_training

LOG_NAME = "campaign_log.json"
Log = Callable[[str], None]
# train(config, stop_at_step): train or resume the run until that step (or its end).
TrainFn = Callable[[ExperimentConfig, int], None]


class DecisionLog:
    """campaign_log.json: the campaign's fingerprint, its trials and the append-only list of events."""

    def __init__(self, spec: CampaignSpec):
        self.spec = spec
        self.path = spec.directory / LOG_NAME
        body = read_json_object(self.path)
        if body is not None and body.get("fingerprint") != spec.fingerprint:
            raise ConfigError(
                f"{self.path} belongs to a campaign with other trials or rules (fingerprint "
                f"{body.get('fingerprint')}, now {spec.fingerprint}); its decisions would not hold. Restore "
                f"the campaign file, or give the campaign another name.", source=spec.source)
        self.events: list[dict[str, Any]] = list(body["events"]) if body else []
        if body is None:
            self._write()

    def append(self, events: Sequence[dict[str, Any]]) -> None:
        if events:
            now = time.time()
            self.events.extend({**e, "at": now} for e in events)
            self._write()

    def _write(self) -> None:
        s = self.spec
        body = {"campaign": s.name, "fingerprint": s.fingerprint, "source": s.source, "rungs": list(s.rungs),
                "eta": s.eta, "mode": s.mode, "metric": s.metric,
                "trials": {t.name: {"params": t.params, "run_dir": str(t.config.run_dir)} for t in s.trials},
                "events": self.events}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")


def train_in_process(config: ExperimentConfig, stop_at_step: int, *, log: Log = lambda m: None) -> None:
    """Train or resume `config` and stop cleanly after step `stop_at_step` (a checkpoint there),
    or at its own end; the rung stop is a preemption the campaign asked for."""
    flag = PreemptionFlag()

    def at_step(step: int, row: dict[str, Any], model: Any) -> None:
        if step >= stop_at_step:
            flag.request()

    try:
        run_training(config, preemption=flag, on_step_end=at_step, log=log, progress_bar=False)
    except Preempted:
        if not flag.requested:
            raise


@dataclass(frozen=True)
class RunProgress:
    """What a trial's run files say: the newest checkpoint, whether it ended, its metrics."""

    checkpoint_step: int
    finished: bool
    rows: list[dict[str, Any]]

    @classmethod
    def read(cls, config: ExperimentConfig) -> "RunProgress":
        paths = RunPaths(config.run_dir)
        summary = TrainingSummary.read(paths.summary)
        finished = bool(summary and summary.finished and summary.fingerprint == config.fingerprint)
        infos = CheckpointStore(paths.checkpoints).list() if paths.checkpoints.is_dir() else []
        rows = read_metrics(paths.metrics_jsonl, warn=None) if paths.metrics_jsonl.exists() else []
        # Killed between a checkpoint and its metrics row: the checkpoint's manifest has the step's validation.
        seen = {int(r["step"]) for r in rows}
        rows += [{"step": i.step, "val_loss": i.meta["val_loss"]} for i in infos
                 if i.step not in seen and i.meta.get("val_loss") is not None]
        return cls(max((i.step for i in infos), default=0), finished, rows)

    def best_val(self, up_to: int) -> float | None:
        vals = [r["val_loss"] for r in self.rows if "val_loss" in r and r["step"] <= up_to]
        return min(vals) if vals else None

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)


def run_job(trial: Trial, job: Train, train: TrainFn, log: Log) -> dict[str, Any]:
    """Bring `trial` to the job's step (unless its files say it is there or finished); its report."""
    before = RunProgress.read(trial.config)
    if before.finished or before.checkpoint_step >= job.step:
        log(f"{trial.name}: already at step {before.checkpoint_step if not before.finished else before.last_step}"
            f"{' (finished)' if before.finished else ''}; not trained again")
    else:
        log(f"{trial.name}: training to step {job.step} (rung {job.rung}) from step {before.checkpoint_step}")
        train(trial.config, job.step)
    after = RunProgress.read(trial.config)
    step = min(job.step, after.last_step)
    value = after.best_val(job.step)
    if value is None:
        raise RuntimeError(f"{trial.name}: no validation loss up to step {job.step} in {trial.config.run_dir}")
    return {"kind": REPORT, "trial": trial.name, "rung": job.rung, "step": step, "value": value,
            "finished": after.finished and after.last_step < job.step}


def clean_stopped(spec: CampaignSpec, events: Sequence[dict[str, Any]]) -> None:
    """A stopped trial keeps its latest and best checkpoints only (the disk guard's high-watermark rule)."""
    by_name = {t.name: t for t in spec.trials}
    for e in events:
        if e["kind"] == STOP:
            where = RunPaths(by_name[e["trial"]].config.run_dir).checkpoints
            store = CheckpointStore(where)
            infos = store.list() if where.is_dir() else []
            if infos:  # none: nothing to prune (its run's checkpoints already gone)
                store.prune_to_minimum(CheckpointStore.recorded_best(infos)[0])


@dataclass(frozen=True)
class CampaignOutcome:
    spec: CampaignSpec
    events: list[dict[str, Any]]

    @property
    def winner(self) -> Trial | None:
        names = [e["trial"] for e in self.events if e["kind"] == WINNER]
        return next((t for t in self.spec.trials if names and t.name == names[-1]), None)

    @property
    def stopped_per_rung(self) -> dict[int, int]:
        return stopped_per_rung(self.spec.halving, self.events)


def run_campaign(spec: CampaignSpec, *, train: TrainFn | None = None, log: Log = print) -> CampaignOutcome:
    """Train the campaign's trials one at a time, rung by rung, until it has a winner; resumes from its log."""
    book = DecisionLog(spec)
    train = train or (lambda config, step: train_in_process(config, step))
    by_name = {t.name: t for t in spec.trials}
    h = spec.halving
    while True:
        decisions = decide(h, book.events)
        book.append(decisions)
        clean_stopped(spec, decisions)
        for e in decisions:
            log(_describe(e, spec))
        jobs = next_jobs(h, book.events)
        if not jobs:
            return CampaignOutcome(spec, list(book.events))
        job = jobs[0]
        book.append([run_job(by_name[job.trial], job, train, log)])


def run_campaign_parallel(spec: CampaignSpec, *, train: TrainFn, slots: int, log: Log = print) -> CampaignOutcome:
    """run_campaign with up to `slots` trials training at once (threads; `train` may hand the work to
    other machines, e.g. a deployment's workers). Reports are logged as trainings end; the rule waits
    for a full rung (sync) or promotes as it goes (ASHA) exactly as with one slot, so a sync campaign
    makes the same decisions whatever the order reports arrive in."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    book, h = DecisionLog(spec), spec.halving
    by_name = {t.name: t for t in spec.trials}
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="campaign-trial") as pool:
        while True:
            decisions = decide(h, book.events)
            book.append(decisions)
            clean_stopped(spec, decisions)
            for e in decisions:
                log(_describe(e, spec))
            for job in next_jobs(h, book.events, running=running.values())[:slots - len(running)]:
                running[pool.submit(run_job, by_name[job.trial], job, train, log)] = job.trial
            if not running:
                return CampaignOutcome(spec, list(book.events))
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                del running[f]
                book.append([f.result()])


def campaign_message(outcome: CampaignOutcome) -> tuple[str, str]:
    """The notification at a campaign's end (subject, body): the winner, and how many trials were
    stopped at which rung."""
    spec, winner = outcome.spec, outcome.winner
    value = next((e["value"] for e in reversed(outcome.events) if e["kind"] == WINNER), None)
    stops = outcome.stopped_per_rung
    lines = [f"winner: {winner.name} ({_params(winner.params)}), best val loss {value:.4f}" if winner and value is not None
             else "no winner"]
    lines += [f"stopped at rung {r} (step {spec.rungs[r]}): {n} of {len(spec.trials)}" for r, n in stops.items()]
    if not stops:
        lines.append("no trial stopped early")
    subject = f"farense: campaign {spec.name}: " + (f"{winner.name} wins" if winner else "no winner")
    return subject, "\n".join(lines)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "base"


def _describe(e: dict[str, Any], spec: CampaignSpec) -> str:
    at = f"rung {e.get('rung')} (step {spec.rungs[e['rung']]})" if "rung" in e else ""
    value = f", best val loss {e['value']:.4f}" if "value" in e else ""
    return {"promote": f"{e['trial']} goes on from {at}", "stop": f"{e['trial']} stops at {at}{value}",
            "winner": f"{e['trial']} wins{value}"}.get(e["kind"], str(e))


def campaign_status(spec: CampaignSpec) -> list[dict[str, Any]]:
    """One row per trial from the log and the runs: params, rung reached, best val loss, steps trained, status."""
    if not spec.halves:  # every trial trains fully: its run's own files say where it is
        return [_list_trial_row(t) for t in spec.trials]
    body = read_json_object(spec.directory / LOG_NAME) or {}
    events = body.get("events", [])
    rows = []
    for s, t in zip(trial_statuses(spec.halving, events), spec.trials):
        progress = RunProgress.read(t.config)
        rows.append({"trial": t.name, "params": t.params, "rung": s.rung, "best_val_loss": s.value,
                     "steps": progress.last_step, "status": s.status})
    return rows


def _list_trial_row(t: Trial) -> dict[str, Any]:
    progress = RunProgress.read(t.config)
    status = ("finished" if progress.finished else f"at step {progress.checkpoint_step}" if progress.checkpoint_step
              else "not started")
    return {"trial": t.name, "params": t.params, "rung": None, "best_val_loss": progress.best_val(progress.last_step),
            "steps": progress.last_step, "status": status}


def campaign_table(spec: CampaignSpec) -> list[dict[str, Any]]:
    """campaign_status's rows with each trial's train/val gap (its training_summary.json) beside them."""
    rows = []
    for row, t in zip(campaign_status(spec), spec.trials):
        summary = TrainingSummary.read(RunPaths(t.config.run_dir).summary)
        rows.append({**row, "gap": summary.train_val_gap if summary else None})
    return rows


def campaign_curves(spec: CampaignSpec) -> dict[str, list[tuple[int, float]]]:
    """Each trial's validation loss per step, from its run's metrics."""
    return {t.name: sorted((int(r["step"]), float(r["val_loss"])) for r in RunProgress.read(t.config).rows
                           if r.get("val_loss") is not None) for t in spec.trials}


def stopped_at_step(outcome: CampaignOutcome) -> dict[str, int]:
    """The step of the rung where each stopped trial stopped."""
    return {e["trial"]: outcome.spec.rungs[e["rung"]] for e in outcome.events if e["kind"] == STOP}


def finalists(outcome: CampaignOutcome) -> list[Trial]:
    """The trials of the campaign's last comparison: those reported at the highest rung that more than
    one trial reached (the winner went on from there); the campaign's table gives each of them an F1."""
    by_rung: dict[int, set[str]] = {}
    for e in outcome.events:
        if e["kind"] == REPORT:
            by_rung.setdefault(int(e["rung"]), set()).add(e["trial"])
    contested = [r for r, names in by_rung.items() if len(names) > 1]
    names = by_rung[max(contested)] if contested else {outcome.winner.name} if outcome.winner else set()
    return [t for t in outcome.spec.trials if t.name in names]


def trained_steps(spec: CampaignSpec) -> int:
    """Optimizer steps the trials' runs went through (their metrics), for the budget's accounting."""
    return sum(RunProgress.read(t.config).last_step for t in spec.trials)


def log_path(spec: CampaignSpec) -> Path:
    return spec.directory / LOG_NAME
