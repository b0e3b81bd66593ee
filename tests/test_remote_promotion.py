"""Promotion and rollback with the object store as production's home, against a real S3 server: the
release goes to the store, `production/current` moves there by compare-and-swap before it moves here,
and of two machines (real processes) promoting at once exactly one wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from s3_server import S3Server, aws_env
from test_promotion import decided_run

from farense.cli import main
from farense.release.promotion import current_release, read_history
from farense.run.fsutil import sha256_file
from farense.run.objectstore import ObjectStore
from farense.run.remote_releases import RemoteReleases

pytest_plugins = ["conftest_s3"]

ROOT = Path(__file__).resolve().parent.parent


def url(server: S3Server, store: ObjectStore) -> str:
    return f"s3://{server.bucket}/{store.location.prefix}"


def on_store(store: ObjectStore) -> RemoteReleases:
    return RemoteReleases(store, store.key("production"))


def farense(server: S3Server, store: ObjectStore, *args: str) -> int:
    with aws_env(server.env):
        return main([*args, "--remote", url(server, store)])


def test_promote_writes_the_release_to_the_store_then_switches_here(s3_server, s3_store, tmp_path, capsys):
    run = decided_run(tmp_path / "a", "v2")
    prod = tmp_path / "a" / "production"
    assert farense(s3_server, s3_store, "promote", str(run), "--production", str(prod)) == 0
    here = current_release(prod)
    pointer, _ = on_store(s3_store).current()  # type: ignore[misc]
    assert here is not None and pointer.release_id == here.id and pointer.previous is None
    remote = on_store(s3_store).get_release(here.id)
    assert remote is not None and remote.manifest == here.manifest  # the local release.json, uploaded as is
    assert remote.files["adapters/adapters.safetensors"]["sha256"] == sha256_file(run / "adapters" / "adapters.safetensors")
    assert f"current -> {here.id}" in capsys.readouterr().out

    assert farense(s3_server, s3_store, "promote", str(run), "--production", str(prod)) == 0  # the same adapters
    assert "already in production" in capsys.readouterr().out
    assert [r.id for r in on_store(s3_store).list_releases()] == [here.id]


def promote_process(server: S3Server, store: ObjectStore, run: Path, prod: Path, barrier: Path) -> subprocess.Popen[str]:
    env = {**os.environ, **server.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FARENSE_BARRIER": f"promote-cas:2:{barrier}"}
    return subprocess.Popen([sys.executable, "-m", "farense", "promote", str(run), "--production", str(prod),
                             "--remote", url(server, store)], env=env, cwd=run.parent.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_machines_promoting_at_once_one_wins_and_the_loser_is_not_switched(s3_server, s3_store, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    machines = {m: (decided_run(tmp_path / m, f"cand-{m}"), tmp_path / m / "production") for m in ("a", "b")}
    procs = {m: promote_process(s3_server, s3_store, run, prod, barrier) for m, (run, prod) in machines.items()}
    results = {m: (p.wait(timeout=120), *p.communicate()) for m, p in procs.items()}
    assert len(os.listdir(barrier)) == 2  # both had read production/current before either moved it
    winners = [m for m, (rc, _, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (winner,) = winners
    (loser,) = set(machines) - {winner}
    pointer, _ = on_store(s3_store).current()  # type: ignore[misc]
    won = current_release(machines[winner][1])
    assert won is not None and pointer.release_id == won.id and pointer.previous is None
    rc, _, err = results[loser]  # it lost the compare-and-swap, or saw the winner's pointer just before it
    assert rc == 1 and err.startswith("farense: error: ") and f"points at {won.id}" in err
    assert "production here" in err and "was not switched" in err and "Traceback" not in err
    assert current_release(machines[loser][1]) is None  # the loser's production never switched
    assert won.id.endswith(f"cand-{winner}-" + won.adapters_sha256[:8])


def test_rollback_moves_the_store_then_here_fetching_the_release(s3_server, s3_store, tmp_path, capsys):
    run_a, prod_a = decided_run(tmp_path / "a", "first"), tmp_path / "a" / "production"
    run_b, prod_b = decided_run(tmp_path / "b", "second"), tmp_path / "b" / "production"
    assert farense(s3_server, s3_store, "promote", str(run_a), "--production", str(prod_a)) == 0
    assert farense(s3_server, s3_store, "promote", str(run_b), "--production", str(prod_b)) == 0
    first, second = current_release(prod_a), current_release(prod_b)
    assert first is not None and second is not None and second.previous == first.id  # decided against the store's
    capsys.readouterr()

    assert farense(s3_server, s3_store, "releases", "--production", str(prod_a), "--json") == 0
    out = capsys.readouterr()
    listed = orjson.loads(out.out)
    assert [(r["id"], r["current"], r["current_here"]) for r in listed] == [(first.id, False, True),
                                                                            (second.id, True, False)]
    assert f"the store's is {second.id}" in out.err

    assert farense(s3_server, s3_store, "rollback", "--production", str(prod_b)) == 0  # machine b never had `first`
    assert on_store(s3_store).current()[0].release_id == first.id  # type: ignore[index]
    back = current_release(prod_b)
    assert back is not None and back.id == first.id and back.manifest == first.manifest
    assert (back.adapters / "adapters.safetensors").read_bytes() == (run_a / "adapters" / "adapters.safetensors").read_bytes()
    assert read_history(prod_b)[-1]["action"] == "rollback"

    assert farense(s3_server, s3_store, "rollback", "--production", str(prod_a), "--to", "../../etc") == 1
    assert "no release '../../etc' on the store" in capsys.readouterr().err
