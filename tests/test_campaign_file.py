"""The campaign file: trials from a grid or a list, each with the full budget's schedule, and one
error that lists every problem before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from farense.errors import ConfigError
from farense.release.campaign_file import load_campaign

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_campaign_has_eight_trials_on_one_schedule(tmp_path: Path) -> None:
    c = load_campaign(REPO / "configs" / "campaigns" / "lr-rank.toml", overlays=["tiny"], workspace=tmp_path)
    assert [t.name for t in c.trials] == [f"t{i:02d}" for i in range(8)]
    assert c.rungs == (5, 10, 20, 40) and c.halving.synchronous
    assert {t.config.training.iters for t in c.trials} == {40}
    assert {t.config.lora.rank for t in c.trials} == {4, 8}
    assert len({t.config.fingerprint for t in c.trials}) == 8
    assert all(t.config.run_dir.parent == c.directory for t in c.trials)
    assert c.directory.name == "campaign-lr-rank"


def test_explicit_trials_name_their_configs(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[trials]]\nconfig = "v1"\n[[trials]]\nconfig = "v2"\nset = {"lora.rank" = 4}\n'
                    "[halving]\nbudget = 100\nmin_resource = 45\n")
    c = load_campaign(path, overlays=["tiny"], workspace=tmp_path)
    assert [(t.name, t.config.lora.rank) for t in c.trials] == [("v1", 8), ("v2", 4)]
    assert c.rungs == (45, 90, 100)


def test_without_halving_every_trial_keeps_its_own_schedule_and_farense_run_is_that_campaign(tmp_path: Path) -> None:
    from farense.config import load_config
    from farense.release.campaign_file import configs_campaign
    from farense.release.trials import campaign_status

    shipped = load_campaign(REPO / "configs" / "campaigns" / "v1-v2.toml", overlays=["demo"], workspace=tmp_path)
    assert not shipped.halves and [t.name for t in shipped.trials] == ["v1", "v2"]
    assert shipped.directory.name == "campaign-v1-v2" and shipped.promote

    path = tmp_path / "v1v2.toml"
    path.write_text('[[trials]]\nconfig = "v1"\n[[trials]]\nconfig = "v2"\nset = {"lora.rank" = 4}\n')
    c = load_campaign(path, overlays=["tiny"], workspace=tmp_path)
    v1, v2 = (load_config(n, overlays=["tiny"], workspace=tmp_path) for n in ("v1", "v2"))
    assert not c.halves and c.rungs == ()
    assert [(t.name, t.config.training.iters, t.config.lora.rank) for t in c.trials] == [
        ("v1", v1.training.iters, v1.lora.rank), ("v2", v2.training.iters, 4)]
    assert [r["status"] for r in campaign_status(c)] == ["not started", "not started"]

    # `farense run v1 v2`: the same campaign from the command line, each config in its own run directory.
    simplest = configs_campaign(["v1", "v2"], overlays=["tiny"], workspace=tmp_path)
    assert not simplest.halves and simplest.name == "v1-v2"
    assert [(t.name, t.config.run_dir, t.config.fingerprint) for t in simplest.trials] == [
        ("v1", v1.run_dir, v1.fingerprint), ("v2", v2.run_dir, v2.fingerprint)]
    with pytest.raises(ConfigError, match="each config may appear once"):
        configs_campaign(["v1", "v1"], overlays=["tiny"], workspace=tmp_path)
    with pytest.raises(ConfigError, match="v9"):
        configs_campaign(["v1", "v9"], overlays=["tiny"], workspace=tmp_path)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('base = "v2"\ncolour = 1\n[halving]\nbudget = 24\nmin_resource = 6\neta = 1\nmode = "fast"\n'
                    'metric = "f1"\n')
    with pytest.raises(ConfigError) as e:
        load_campaign(path, overlays=["tiny"], workspace=tmp_path)
    text = str(e.value)
    assert str(path) in text
    for expected in ("colour: unknown key", "halving.eta: expected an integer >= 2, got 1",
                     "halving.mode: expected one of sync, async", "halving.metric: expected one of val_loss"):
        assert expected in text


def test_a_bad_trial_config_and_rungs_off_validation_steps_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('base = "v2"\nset = {"validation.every_steps" = 4, "checkpoint.every_steps" = 4}\n[search]\n"lora.rank" = [0, 4]\n'
                    "[halving]\nbudget = 24\nmin_resource = 6\n")
    with pytest.raises(ConfigError) as e:
        load_campaign(path, overlays=["tiny"], workspace=tmp_path)
    text = str(e.value)
    assert "trial t00: lora.rank: expected an integer >= 1, got 0" in text
    assert "trial t01: validation.every_steps (4) must divide every rung's step [6, 12]" in text
