"""Several trials training at once (run_campaign_parallel) make the same decisions as one at a time:
a fake trainer writes each trial's metrics, so this is fast and needs no model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson

from farense.config import ExperimentConfig
from farense.release.campaign_file import load_campaign
from farense.release.trials import campaign_status, run_campaign, run_campaign_parallel
from farense.run.layout import RunPaths

REPO = Path(__file__).resolve().parent.parent


class FakeTrainer:
    """Appends validation rows up to the asked step; each trial's loss is fixed by its name."""

    def __init__(self) -> None:
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def __call__(self, config: ExperimentConfig, stop_at_step: int) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        paths = RunPaths(config.run_dir)
        paths.root.mkdir(parents=True, exist_ok=True)
        done = len(paths.metrics_jsonl.read_bytes().splitlines()) if paths.metrics_jsonl.exists() else 0
        i = int(config.run_name[1:])
        with open(paths.metrics_jsonl, "ab") as f:
            for step in range(done + 1, stop_at_step + 1):
                f.write(orjson.dumps({"step": step, "val_loss": 1 + ((i * 5) % 8) / 10 - step / 1000}) + b"\n")
        time.sleep(0.05)
        with self.lock:
            self.now -= 1


def _decisions(events: list[dict[str, Any]]) -> list[tuple]:
    return sorted((e["kind"], e["trial"], e.get("rung"), e.get("value")) for e in events)


def test_three_trials_at_once_make_the_same_decisions_as_one_at_a_time(tmp_path: Path) -> None:
    file = REPO / "configs" / "campaigns" / "lr-rank.toml"
    one = load_campaign(file, overlays=["tiny"], workspace=tmp_path / "one")
    many = load_campaign(file, overlays=["tiny"], workspace=tmp_path / "many")
    sequential, parallel = FakeTrainer(), FakeTrainer()
    a = run_campaign(one, train=sequential, log=lambda m: None)
    b = run_campaign_parallel(many, train=parallel, slots=3, log=lambda m: None)
    assert sequential.most == 1 and parallel.most == 3
    assert a.winner is not None and b.winner.name == a.winner.name
    assert _decisions(b.events) == _decisions(a.events)
    assert b.stopped_per_rung == a.stopped_per_rung == {0: 4, 1: 2, 2: 1}
    assert campaign_status(many) == campaign_status(one)


def test_the_finalists_are_the_trials_of_the_last_comparison(tmp_path: Path) -> None:
    """8 trials, eta 2: 4 reach rung 1, 2 reach rung 2 and meet there; the winner alone goes on to the
    end. Those two are the finalists whose F1 the campaign's table shows."""
    from farense.release.trials import finalists

    spec = load_campaign(REPO / "configs" / "campaigns" / "lr-rank.toml", overlays=["tiny"], workspace=tmp_path)
    outcome = run_campaign(spec, train=FakeTrainer(), log=lambda m: None)
    at_rung_2 = sorted({e["trial"] for e in outcome.events if e["kind"] == "report" and e["rung"] == 2})
    names = [t.name for t in finalists(outcome)]
    assert len(names) == 2 and names == at_rung_2 and outcome.winner.name in names
