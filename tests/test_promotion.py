"""Promotion: immutable releases, an atomic `current` switch that survives SIGKILL, rollback, refusal."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from test_decision import make_fake_run

from farense.config import DecisionConfig
from farense.errors import DecisionRefused, FarenseError, RunLocked
from farense.release.decision import (
    compare_and_decide,
    decide,
    incumbent_from_production,
    load_report,
    report_from_run,
)
from farense.release.promotion import (
    LOCK_NAME,
    STEPS,
    Release,
    current_release,
    list_releases,
    promote,
    read_history,
    rollback,
    verify_release,
)
from farense.run.fsutil import sha256_file

T = DecisionConfig(max_gap=0.15, min_f1=0.93, max_f1_drop=0.01)
T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def decided_run(ws: Path, name: str, *, incumbent: Path | None = None, **kw) -> Path:
    """A fake evaluated run with its decision.json (against `incumbent`, a run or production dir)."""
    run = make_fake_run(ws, name, adapters=f"adapters of {name}".encode() * 50, **kw)
    inc = load_report(incumbent) if incumbent is not None else None
    compare_and_decide(inc, report_from_run(run), T, out_dir=run / "evaluation")
    return run


@pytest.fixture
def ws(tmp_path) -> Path:
    return tmp_path


def prod_of(ws: Path) -> Path:
    return ws / "production"


def test_promote_builds_an_immutable_release_and_switches_current(ws):
    run = decided_run(ws, "v2")
    rel = promote(run, None, prod_of(ws), now=T0)
    assert rel.id == f"20250601T120000Z-v2-{sha256_file(run / 'adapters' / 'adapters.safetensors')[:8]}"
    current = prod_of(ws) / "current"
    assert current.is_symlink() and os.readlink(current) == f"releases/{rel.id}"  # relative: the dir can move
    assert current_release(prod_of(ws)).id == rel.id
    names = sorted(str(p.relative_to(rel.path)) for p in rel.path.rglob("*") if p.is_file())
    assert names == ["adapters/adapter_config.json", "adapters/adapters.safetensors", "config.json", "decision.json",
                     "evaluation_report.json", "release.json", "training_summary.json"]
    assert (rel.path / "adapters" / "adapters.safetensors").read_bytes() == (run / "adapters" / "adapters.safetensors").read_bytes()
    m = rel.manifest
    assert m["format"] == "farense.release/1" and m["previous"] is None and m["forced"] is False
    assert m["decision"]["preferred"] and m["metrics"]["f1"] == 0.95
    assert set(m["files"]) == set(names) - {"release.json"}
    verify_release(rel)
    assert not os.access(rel.path / "config.json", os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE((rel.path / "config.json").stat().st_mode) == 0o444
    assert [e["action"] for e in read_history(prod_of(ws))] == ["promote"]
    assert [r.id for r in list_releases(prod_of(ws))] == [rel.id]


def test_production_dir_defaults_to_the_runs_config_in_the_current_workspace(ws, monkeypatch):
    run = decided_run(ws, "v2")
    monkeypatch.setenv("FARENSE_WORKSPACE", str(ws))
    rel = promote(run, now=T0)
    assert rel.path.parent.parent == (ws / "production").resolve()  # v2.toml: production_dir = "production"


def test_promote_acts_on_the_current_workspace_never_the_one_the_run_recorded(tmp_path, capsys, monkeypatch):
    """Issue 13.2: a run copied from ws1 into ws2 and promoted in ws2 switches ws2's production, not ws1's."""
    import shutil

    from farense.cli import main

    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    monkeypatch.setenv("FARENSE_WORKSPACE", str(ws1))  # restored after the test (main sets it)
    run1 = decided_run(ws1, "v2")
    assert main(["--workspace", str(ws1), "promote", str(run1)]) == 0
    before = os.readlink(ws1 / "production" / "current")
    shutil.copytree(run1, ws2 / "runs" / "v2", symlinks=True)
    (ws2 / "runs" / "v2" / "adapters" / "adapters.safetensors").write_bytes(b"other adapters" * 30)
    assert main(["--workspace", str(ws2), "promote", str(ws2 / "runs" / "v2"), "--force"]) == 0
    assert os.readlink(ws1 / "production" / "current") == before
    assert current_release(ws2 / "production").run_name == "v2"
    assert "ws2/production" in capsys.readouterr().out


def test_promotion_refuses_adapters_other_than_the_evaluated_ones(ws, capsys):
    """Issue 13.3: evaluate at step 30, resume to 60, promote: refused, the report describes other adapters."""
    from farense.cli import main

    run = decided_run(ws, "v2")
    (run / "adapters" / "adapters.safetensors").write_bytes(b"step-60 adapters" * 40)  # trained on after evaluation
    with pytest.raises(DecisionRefused, match=r"adapters changed since they were evaluated.*farense evaluate"):
        promote(run, None, prod_of(ws), now=T0)
    assert main(["promote", str(run), "--production", str(prod_of(ws))]) == 4
    assert "adapters changed since they were evaluated" in capsys.readouterr().err
    assert not (prod_of(ws) / "current").exists()
    rel = promote(run, None, prod_of(ws), force=True, now=T0)
    assert rel.forced and "adapters changed" in rel.manifest["refusal_overridden"][0]


def test_promotion_is_refused_while_the_run_is_training_even_with_force(ws):
    """Issue 13.3: the run lock held (a trainer) means the adapters may still change: no promotion."""
    from farense.run.locks import RunLock

    run = decided_run(ws, "v2")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from farense.run.locks import RunLock
        RunLock(sys.argv[1], command="train").acquire()
        print("locked", flush=True)
        time.sleep(60)
        """), str(run / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for force in (False, True):
            with pytest.raises(RunLocked, match=r"while it is training.*--force does not override"):
                promote(run, None, prod_of(ws), force=force, now=T0)
        assert not (prod_of(ws) / "current").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run / "run.lock"):
        pass
    assert promote(run, None, prod_of(ws), now=T0).run_name == "v2"


def test_refused_when_the_decision_says_no_and_says_why(ws):
    run = decided_run(ws, "v2", f1=0.90, gap=0.2, gap_status="MODERADO")
    with pytest.raises(DecisionRefused) as e:
        promote(run, None, prod_of(ws), now=T0)
    msg = str(e.value)
    assert "promotion of v2 refused" in msg
    assert "gap_below_max failed: gap 0.2000 >= 0.15 (MODERADO)" in msg
    assert "f1_at_least_min failed: F1 0.9000 < 0.93" in msg
    assert "ready_for_production failed" in msg and "--force" in msg
    assert e.value.exit_code == 4
    assert not (prod_of(ws) / "current").exists()
    forced = promote(run, None, prod_of(ws), force=True, now=T0)
    assert current_release(prod_of(ws)).id == forced.id
    assert forced.forced and any("gap_below_max" in r for r in forced.manifest["refusal_overridden"])


def test_refused_without_a_decision_or_with_a_stale_one(ws):
    run = make_fake_run(ws, "v2")
    with pytest.raises(DecisionRefused, match="no decision found"):
        promote(run, None, prod_of(ws))
    compare_and_decide(None, report_from_run(run), T, out_dir=run / "evaluation")
    report = run / "evaluation" / "evaluation_report.json"
    report.write_bytes(report.read_bytes().replace(b'"examples":10', b'"examples":11'))  # evaluated again
    with pytest.raises(DecisionRefused, match="different evaluation of v2"):
        promote(run, None, prod_of(ws))


def test_second_promotion_keeps_the_previous_release_and_rollback_returns_to_it(ws):
    v1 = decided_run(ws, "v1", config="v1")
    r1 = promote(v1, None, prod_of(ws), now=T0)
    # V2 decided against what production serves now
    v2 = decided_run(ws, "v2", incumbent=prod_of(ws), f1=0.945)
    d = orjson.loads((v2 / "evaluation" / "decision.json").read_bytes())
    assert d["incumbent"]["release_id"] == r1.id and d["promote"]
    r2 = promote(v2, None, prod_of(ws), now=T0 + timedelta(hours=1))
    assert r2.previous == r1.id and current_release(prod_of(ws)).id == r2.id
    assert [r.id for r in list_releases(prod_of(ws))] == [r1.id, r2.id]

    back = rollback(prod_of(ws), now=T0 + timedelta(hours=2))
    assert back.id == r1.id and current_release(prod_of(ws)).id == r1.id
    assert r2.path.is_dir()  # nothing is deleted
    with pytest.raises(FarenseError, match="first one promoted.*no previous release"):
        rollback(prod_of(ws))
    assert rollback(prod_of(ws), to=r2.id).id == r2.id
    assert [(e["action"], e["release"], e["previous"]) for e in read_history(prod_of(ws))] == [
        ("promote", r1.id, None), ("promote", r2.id, r1.id), ("rollback", r1.id, r2.id), ("rollback", r2.id, r1.id)]
    with pytest.raises(FarenseError, match="no release 'nope'"):
        rollback(prod_of(ws), to="nope")


def test_rollback_with_nothing_in_production(ws):
    with pytest.raises(FarenseError, match="nothing to roll back"):
        rollback(prod_of(ws))


def test_rollback_refuses_a_release_that_does_not_verify(ws):
    r1 = promote(decided_run(ws, "v1", config="v1"), None, prod_of(ws), now=T0)
    promote(decided_run(ws, "v2"), None, prod_of(ws), now=T0 + timedelta(hours=1))
    target = r1.path / "adapters" / "adapters.safetensors"
    os.chmod(target, 0o644)
    target.write_bytes(b"bit rot")
    with pytest.raises(FarenseError, match="does not verify.*adapters/adapters.safetensors"):
        rollback(prod_of(ws))
    assert current_release(prod_of(ws)).run_name == "v2"


def test_same_adapters_are_not_promoted_twice(ws):
    run = decided_run(ws, "v2")
    r1 = promote(run, None, prod_of(ws), now=T0)
    again = promote(run, None, prod_of(ws), now=T0 + timedelta(minutes=1))
    assert again.id == r1.id and len(list_releases(prod_of(ws))) == 1
    forced = promote(run, None, prod_of(ws), force=True, now=T0)  # same second: the id gets a suffix
    assert forced.id == r1.id + "-2" and forced.previous == r1.id


def test_incumbent_is_read_from_the_production_release(ws):
    promote(decided_run(ws, "v1", config="v1", f1=0.97), None, prod_of(ws), now=T0)
    inc = incumbent_from_production(prod_of(ws))
    assert inc.kind == "release" and inc.f1 == 0.97 and inc.train_val_gap == 0.10
    cand = report_from_run(make_fake_run(ws, "v2", f1=0.955))
    d = decide(cand, inc, T)
    assert not d.preferred and "trails production" in d.rule("f1_not_meaningfully_below_incumbent").explanation
    assert incumbent_from_production(ws / "empty") is None


def test_concurrent_promotion_is_refused_while_the_lock_is_held(ws):
    run = decided_run(ws, "v2")
    prod_of(ws).mkdir()
    fd = os.open(prod_of(ws) / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RunLocked, match="another promotion or rollback"):
            promote(run, None, prod_of(ws))
    finally:
        os.close(fd)
    assert promote(run, None, prod_of(ws)).run_name == "v2"


# --------------------------------------------------------------------------- SIGKILL between steps

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from farense.release.promotion import promote
    run, prod, stop_at, marker = sys.argv[1:5]

    def hook(step):
        if step == stop_at:
            Path(marker).write_text(step)
            time.sleep(120)  # the parent SIGKILLs us here

    promote(Path(run), None, Path(prod), hook=hook)
    """
)


@pytest.mark.parametrize("step", STEPS)
def test_promotion_killed_between_steps_leaves_a_whole_release_in_production(ws, step):
    old = promote(decided_run(ws, "v1", config="v1"), None, prod_of(ws), now=T0)
    new_run = decided_run(ws, "v2")
    marker = ws / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(new_run), str(prod_of(ws)), step, str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, f"promotion exited with {proc.returncode} before {step}"
            assert time.monotonic() < deadline, f"promotion never reached {step}"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    cur = current_release(prod_of(ws))
    if step == "switched":  # the swap itself is one rename: past it, production is the new release, whole
        assert cur.run_name == "v2" and cur.previous == old.id
        verify_release(cur)
        assert [e["release"] for e in read_history(prod_of(ws))] == [old.id]  # the log lags; current is the truth
        assert rollback(prod_of(ws)).id == old.id
        return
    assert cur.id == old.id
    verify_release(cur)
    leftovers = [p.name for p in (prod_of(ws) / "releases").iterdir() if ".tmp-" in p.name]
    leftovers += [p.name for p in prod_of(ws).iterdir() if p.name.startswith("current.tmp-")]
    assert leftovers if step != "release-committed" else not leftovers
    # The next promotion cleans up and succeeds.
    again = promote(new_run, None, prod_of(ws), now=T0 + timedelta(days=1))
    assert current_release(prod_of(ws)).id == again.id and again.previous == old.id
    assert not [p for p in (prod_of(ws) / "releases").iterdir() if ".tmp-" in p.name]
    assert not [p for p in prod_of(ws).iterdir() if p.name.startswith("current.tmp-")]
    assert Release.read(again.path).run_name == "v2"


# --------------------------------------------------------------------------- the commands


def test_commands_compare_promote_rollback(ws, capsys):
    from farense.cli import main

    prod = str(prod_of(ws))
    v1 = make_fake_run(ws, "v1", f1=0.9602, precision=0.9402, recall=0.9810, gap=2.27, gap_status="CRÍTICO",
                       config="v1", adapters=b"v1" * 100)
    v2 = make_fake_run(ws, "v2", f1=0.955, gap=0.12, adapters=b"v2" * 100)

    # V1 alone: decided against an empty production, refused (gap 2.27), then forced.
    assert main(["promote", str(v1), "--production", prod]) == 4
    err = capsys.readouterr().err
    assert "refused" in err and "gap_below_max failed: gap 2.2700 >= 0.15 (CRÍTICO)" in err and "--force" in err
    assert main(["promote", str(v1), "--production", prod, "--force"]) == 0
    assert "promoted despite the decision" in capsys.readouterr().err

    assert main(["compare", str(v1), str(v2)]) == 0
    out = capsys.readouterr().out
    assert "F1\t0.9602\t0.9550\t-0.0052\tv1" in out  # plain tab-separated output off a terminal
    assert "v2 is preferred and ready for production" in out
    for name in ("comparison.json", "comparison.md", "decision.json"):
        assert (v2 / "evaluation" / name).is_file()

    assert main(["promote", str(v2), "--production", prod]) == 0
    out = capsys.readouterr().out
    assert "using " in out and "v2 vs v1" in out and "promoted v2" in out and "farense rollback" in out
    assert current_release(prod_of(ws)).run_name == "v2"
    assert main(["promote", str(v2), "--production", prod]) == 0
    assert "already in production" in capsys.readouterr().out

    assert main(["compare", "production", str(v2), "--production", prod, "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert data["comparison"]["a"]["kind"] == "release" and data["decision"]["promote"]

    assert main(["releases", "--production", prod, "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert [(r["run_name"], r["current"], r["forced"]) for r in listed] == [("v1", False, True), ("v2", True, False)]

    assert main(["rollback", "--production", prod]) == 0
    assert "rolled back" in capsys.readouterr().out
    assert current_release(prod_of(ws)).run_name == "v1"
    assert main(["rollback", "--production", prod]) == 1
    assert "no previous release" in capsys.readouterr().err


def test_command_resolves_a_config_name_to_its_run(ws, capsys, monkeypatch):
    from farense.cli import main

    monkeypatch.chdir(ws)
    monkeypatch.setenv("FARENSE_WORKSPACE", str(ws))
    monkeypatch.setenv("FARENSE_CONFIG_DIR", str(Path(__file__).resolve().parent.parent / "configs"))
    make_fake_run(ws, "v2")  # at <ws>/runs/v2, where configs/v2.toml puts it
    assert main(["promote", "v2"]) == 0
    assert current_release(ws / "production").run_name == "v2"
    assert main(["promote", "v1"]) == 1
    assert "no run of v1" in capsys.readouterr().err


def test_ensure_decision_reuses_a_fresh_one_and_otherwise_decides_against_production(ws):
    from farense.release.promotion import ensure_decision

    r1 = promote(decided_run(ws, "v1", config="v1", f1=0.97), None, prod_of(ws), now=T0)
    v2 = make_fake_run(ws, "v2", f1=0.955)
    made = ensure_decision(v2, prod_of(ws), T)
    assert not made.reused and made.decision.incumbent["release_id"] == r1.id
    assert not made.decision.preferred  # trails production's 0.97 by more than 0.01
    assert (v2 / "evaluation" / "comparison.md").is_file()
    again = ensure_decision(v2, prod_of(ws), T)
    assert again.reused and again.decision.decided_at == made.decision.decided_at
    report = v2 / "evaluation" / "evaluation_report.json"
    report.write_bytes(report.read_bytes().replace(b'"f1":0.955', b'"f1":0.975'))  # evaluated again
    redone = ensure_decision(v2, prod_of(ws), T)
    assert not redone.reused and redone.decision.promote


def test_promote_of_a_missing_or_broken_run_says_what_is_wrong(ws, capsys):
    """Issue 13.11: a missing run is named as such (not "Config is not well-formed")."""
    from farense.cli import main

    assert main(["promote", str(ws / "runs" / "nope"), "--production", str(prod_of(ws))]) == 1
    err = capsys.readouterr().err
    assert "no run directory at" in err and "nope" in err and "Config is not well-formed" not in err
    run = decided_run(ws, "v2")
    (run / "config.json").write_bytes(b"[1, 2, 3]")
    assert main(["promote", str(run), "--production", str(prod_of(ws))]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "expected a JSON object" in err and "Traceback" not in err


def test_rollback_takes_release_ids_only_and_releases_marks_what_current_points_at(ws, capsys):
    """Issue 13.4: `--to ../../x` never points production/current outside releases/; `releases` marks the
    release `current` really points at, and says so when it points at none of them."""
    import shutil

    from farense.cli import main

    prod = prod_of(ws)
    r1 = promote(decided_run(ws, "v1", config="v1"), None, prod, now=T0)
    r2 = promote(decided_run(ws, "v2", incumbent=prod), None, prod, force=True, now=T0 + timedelta(hours=1))
    evil = ws / "elsewhere" / "evilrel"
    shutil.copytree(r1.path, evil)  # a whole, verifying release outside releases/
    rel_path = os.path.relpath(evil, prod / "releases")
    for to in (rel_path, str(evil), "../current", f"{r1.id}/.."):
        assert main(["rollback", "--production", str(prod), "--to", to]) == 1
        assert "--to takes a release id" in capsys.readouterr().err
        assert os.readlink(prod / "current") == f"releases/{r2.id}"

    assert main(["releases", "--production", str(prod), "--json"]) == 0
    assert [(r["id"], r["current"]) for r in orjson.loads(capsys.readouterr().out)] == [(r1.id, False), (r2.id, True)]
    os.replace(prod / "current", prod / "current.old")
    os.symlink(os.path.relpath(evil, prod), prod / "current")  # as the old --to made it: r1's manifest, elsewhere
    assert main(["releases", "--production", str(prod), "--json"]) == 0
    out = capsys.readouterr()
    assert [r["current"] for r in orjson.loads(out.out)] == [False, False]
    assert "none of the releases listed" in out.err and str(evil) in out.err


def test_rollback_of_a_missing_production_directory_creates_nothing(tmp_path, capsys):
    """Issue 13.11: `rollback --production /nonexistent` says so and leaves no directory behind."""
    from farense.cli import main

    missing = tmp_path / "no" / "such" / "production"
    assert main(["rollback", "--production", str(missing)]) == 1
    assert "no production directory at" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
